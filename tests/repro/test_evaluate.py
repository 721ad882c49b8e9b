"""Evaluation scripts: clear failures without weights, exact metric math, real multi-seed generation.

* Every metric loader raises ``MissingWeightsError`` naming the weights (or package) it needs
  when they are not available locally, and never downloads by default.
* CLIP-T/CLIP-I are cosines, DINO-D is 1 − cosine of mean-pooled tokens, the Fréchet distance
  matches its closed form for diagonal covariances, paired differences pair by (prompt, seed).
* ``generate`` drives the real pipeline (tiny Z-Image) at guidance 0 and is seed-deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("loader,needle", [
    ("load_clip", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    ("load_dino", "facebook/dinov3-vits16-pretrain-lvd1689m"),
    ("load_lpips", "alexnet"),
    ("load_fid", "inception"),
])
def test_metric_loaders_fail_clearly_without_weights(loader, needle, monkeypatch, tmp_path):
    from paper_repro import evaluate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(evaluate.MissingWeightsError) as err:
        getattr(evaluate, loader)()
    assert needle.lower() in str(err.value).lower()


def test_clip_scores_with_tiny_clip_model():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from paper_repro.evaluate import ClipModel, clip_scores

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    clip = ClipModel(CLIPModel(cfg).eval(), CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32))
    from PIL import Image

    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)) for i in range(3)]
    emb = clip.images(imgs)
    assert emb.shape == (3, 8)
    s = clip_scores(emb, text_emb=emb, ref_emb=emb[:1])
    torch.testing.assert_close(s["clip_t"], torch.ones(3))  # an embedding is cos-1 with itself
    assert s["clip_i"][0] == pytest.approx(1.0) and (s["clip_i"].abs() <= 1).all()


def test_metric_math():
    from paper_repro.evaluate import dino_distance, frechet_distance, paired_difference

    a = torch.randn(4, 10, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dino_distance(a, a), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(dino_distance(a, -a), 2 * torch.ones(4))
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    closed = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)
    x = rng.normal(size=(200, 5))
    s = np.cov(x, rowvar=False)
    assert abs(frechet_distance(x.mean(0), s, x.mean(0), s)) < 1e-8
    r = paired_difference({"p0_s30": 0.5, "p0_s31": 0.7, "p1_s30": 0.1}, {"p0_s30": 0.4, "p0_s31": 0.5})
    assert r["n"] == 2 and r["mean_diff"] == pytest.approx(0.15) and r["std_err"] == pytest.approx(0.05)


def test_generate_multi_seed_with_real_pipeline(tmp_path, zimage_pipe):
    from paper_repro.evaluate import generate

    idx = generate(zimage_pipe, ["a photo of sks dog", "red cat"], [30, 31], tmp_path / "a", "zimage", steps=2,
                   height=16, width=16)
    assert [(e["prompt_idx"], e["seed"]) for e in idx] == [(0, 30), (0, 31), (1, 30), (1, 31)]
    assert json.loads((tmp_path / "a" / "index.json").read_text()) == idx
    generate(zimage_pipe, ["a photo of sks dog"], [30], tmp_path / "b", "zimage", steps=2, height=16, width=16)
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "a" / "p000_s30.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "p000_s30.png"))
    c = np.asarray(Image.open(tmp_path / "a" / "p000_s31.png"))
    assert a.shape == (16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
