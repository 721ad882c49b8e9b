"""The teacher pre-flight on tiny real components (random weights: the verdict itself is not the point).

* The target is the image's latent in the roll-out's own state space: mapping it back the way
  the pipelines decode gives exactly the VAE's latent of the image.
* The verdict follows the teacher: a teacher whose x0 prediction is the target is "better" at
  every step; the student graded by itself is "not better".
* The CLIs run end to end: ``paper_repro.preflight`` prints the verdict with its numbers and
  writes ``preflight.json`` / ``preflight.png``; ``paper_repro.train --preflight`` does so before
  training.
"""

from __future__ import annotations

import json

import pytest
import torch

from .helpers import make_folder, tiny_config

CONFIGS = {"zimage": "paper_repro/configs/tiny_zimage.yaml", "flux2": "paper_repro/configs/tiny_flux2.yaml"}


def _images(tr, bucket_first=True):
    idx = [i for i, s in enumerate(tr.dataset.samples) if s.bucket == tr.dataset.samples[0].bucket]
    loaded = [tr.dataset.load(i) for i in idx]
    shape, h, w = tr._latent_shape(len(idx), tr.dataset.samples[idx[0]].bucket)
    return [x[0] for x in loaded], [x[1] for x in loaded], shape, h, w


@pytest.mark.parametrize("backbone", ["zimage", "flux2"])
def test_target_is_the_image_latent_in_the_state_space(tmp_path, backbone):
    """Z-Image: y/scaling + shift = mode(VAE(image)); FLUX.2: unpack, un-normalise and unpatchify
    y (the pipeline's latent output path) = mode(VAE(image)); shapes are the roll-out's."""
    from paper_repro.adapters import flux2_packed_to_pipeline_latents
    from paper_repro.data import pil_to_tensor
    from paper_repro.preflight import encode_targets
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config(backbone, make_folder(tmp_path / "data"), tmp_path / "run"))
    pil, _, shape, h, w = _images(tr)
    y = encode_targets(tr, pil, h, w)
    assert tuple(y.shape) == shape
    vae = tr.comps.vae
    with torch.no_grad():
        mode = vae.encode(torch.stack([pil_to_tensor(im) for im in pil])).latent_dist.mode()
    back = (y / vae.config.scaling_factor + vae.config.shift_factor if backbone == "zimage"
            else flux2_packed_to_pipeline_latents(y, h, w, vae))
    torch.testing.assert_close(back, mode, rtol=1e-5, atol=1e-5)


def test_verdict_follows_the_teacher(tmp_path, monkeypatch):
    """An oracle teacher (v = (x − y)/σ, so x̂0 = y) is better at every step with zero distance;
    the student as its own teacher is not better (identical distances)."""
    from paper_repro.preflight import encode_targets, repro_preflight
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("zimage", make_folder(tmp_path / "data"), tmp_path / "run"))
    real = tr.velocity_fns

    def oracle_fns(prompts, images, h, w):
        student, _ = real(prompts, images, h, w)
        y = encode_targets(tr, images, h, w)
        return student, lambda x, s: (x - y) / s.view(-1, 1, 1, 1)

    monkeypatch.setattr(tr, "velocity_fns", oracle_fns)
    good = repro_preflight(tr, seeds=2, render=False)
    assert good.better and all(c.better for c in good.report.steps)
    assert float(good.report.d_teacher.max()) < 1e-10 and good.report.overall.n == 2 * len(tr.dataset)
    monkeypatch.setattr(tr, "velocity_fns", lambda p, i, h, w: (real(p, i, h, w)[0],) * 2)
    same = repro_preflight(tr, seeds=2, render=False)
    assert not same.better and not any(c.better for c in same.report.steps)
    torch.testing.assert_close(same.report.d_student, same.report.d_teacher)


@pytest.mark.parametrize("backbone", ["zimage", "flux2"])
def test_preflight_cli_on_tiny_components(tmp_path, capsys, backbone):
    """``python -m paper_repro.preflight --config tiny_<backbone>.yaml`` prints per-step and overall
    verdicts for the K = 4 grid over pairs × seeds samples and writes the JSON and the PNG grid."""
    from paper_repro.preflight import main

    data = make_folder(tmp_path / "data")
    res = main(["--config", CONFIGS[backbone], "--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'run'}",
                "--seeds", "2"])
    out = capsys.readouterr().out
    assert "verdict: teacher" in out and f"teacher pre-flight: {backbone}" in out
    rep = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert len(rep["steps"]) == 4 and rep["overall"]["n"] == 2 * 4 and rep["verdict"] == res.report.verdict
    assert all(len(g) == 4 for g in rep["grids"])
    assert (tmp_path / "run" / "preflight.png").stat().st_size > 0
    assert res.images is not None and res.images.shape[0] % 3 == 0


def test_train_runs_the_preflight_first(tmp_path, capsys):
    """``paper_repro.train --preflight`` prints the pre-flight verdict, then trains."""
    from paper_repro.train import main

    data = make_folder(tmp_path / "data")
    tr = main(["--config", CONFIGS["flux2"], "--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'run'}",
               "--set", "train.steps=1", "--preflight", "--preflight-seeds", "1", "--preflight-max-pairs", "2"])
    out = capsys.readouterr().out
    assert tr.step == 1
    assert out.index("verdict: teacher") < out.index('"step": 1')
    assert "n = 2 samples" in out and (tmp_path / "run" / "preflight.json").exists()
