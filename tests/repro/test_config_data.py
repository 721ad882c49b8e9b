"""Configs reproduce the released recipe and reject bad fields by name; folder buckets are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_folder

CONFIGS = Path(__file__).resolve().parents[2] / "paper_repro" / "configs"


def test_released_recipe_configs():
    from paper_repro.config import load_config
    from paper_repro.grids import training_grid

    z = load_config(CONFIGS / "zimage_turbo_lora.yaml")
    f = load_config(CONFIGS / "flux2_klein_lora.yaml")
    for c in (z, f):
        assert (c.lora.rank, c.lora.alpha) == (64, 128)
        assert c.train.weight_decay == 0.0 and c.train.max_grad_norm == 1.0 and c.train.ema_decay == 0.9999
        assert c.train.num_rollout_steps == 4 and c.train.betas == (0.9, 0.999)
        assert c.train.mixed_precision == "bf16" and c.train.gradient_checkpointing
    assert z.train.lr == 1e-4 and f.train.lr == 2e-5
    assert training_grid("zimage", 4).tolist() == [1.0, 0.9, 0.75, 0.5]
    g = training_grid("flux2", 4, image_seq_len=64 * 64)  # 1024 px -> 4096 packed tokens
    assert g[0] == 1.0 and g.shape == (4,) and bool((g[1:] < g[:-1]).all())
    assert load_config(CONFIGS / "zimage_turbo_full.yaml").train.mode == "full"


def test_flux2_grid_matches_diffusers_scheduler():
    """Our FLUX.2 grid equals FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=empirical mu)."""
    import numpy as np
    import torch
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from paper_repro.grids import flux2_grid
    from paper_repro.tiny import klein_scheduler

    for k, seq in [(4, 4096), (4, 1024), (8, 256), (2, 5000)]:
        sch = klein_scheduler()
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=compute_empirical_mu(seq, k))
        torch.testing.assert_close(flux2_grid(k, seq).float(), sch.sigmas[:-1].float(), atol=1e-6, rtol=0)


def test_config_errors_name_the_field(tmp_path):
    from paper_repro.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: zimage, tiny: true}\ndata: {root: x}\n")
    with pytest.raises(ValueError, match="train.ema_decay"):
        load_config(p, ["train.ema_decay=1.0"])
    with pytest.raises(ValueError, match="model.backbone"):
        load_config(p, ["model.backbone=sd3"])
    with pytest.raises(ValueError, match="unknown field.*train"):
        load_config(p, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config(p, ["train.mixed_precision=fp16"])
    p.write_text("model: {backbone: zimage}\ndata: {root: x}\n")
    with pytest.raises(ValueError, match="model.pretrained"):
        load_config(p)


def test_buckets_and_folder_dataset(tmp_path):
    from paper_repro.data import BucketBatchPlan, FolderDataset, make_buckets, nearest_bucket

    b = make_buckets(1024)
    assert (1024, 1024) in b and all(h % 16 == 0 and w % 16 == 0 for h, w in b)
    assert all(abs(h * w / 1024**2 - 1) < 0.05 for h, w in b)
    assert nearest_bucket(600, 800, b)[1] > nearest_bucket(600, 800, b)[0]  # landscape -> wide bucket
    root = make_folder(tmp_path / "d", sizes=((32, 32), (32, 32), (32, 32), (20, 44)))
    ds = FolderDataset(root, resolution=16, multiple=4, caption_prefix="[V]")
    assert ds.samples[0].caption == "[V] a photo of sks dog"
    img, cap = ds.load(3)
    assert (img.height, img.width) == ds.samples[3].bucket and img.width > img.height
    plan = BucketBatchPlan(ds, batch_size=1, world_size=2, seed=0)
    for step in range(6):
        r0, r1 = plan.batch(step, 0), plan.batch(step, 1)
        assert ds.samples[r0[0]].bucket == ds.samples[r1[0]].bucket  # one bucket per global batch
        assert plan.batch(step, 0) == r0  # pure function of (seed, step, rank)
    (root / "img1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="img1.txt"):
        FolderDataset(root, resolution=16, multiple=4)
