"""The main-job script end to end on a tiny random model (slow: several evaluations)."""

import json

import pytest


@pytest.mark.slow
def test_demo_writes_table_grids_and_curves(tmp_path):
    """The demo trains SFT and D-OPSD, evaluates base/SFT/D-OPSD and writes results.md,
    results.json, the curves and every sample grid."""
    import torch

    from toy_models.demo import main
    from toy_models.dit import toy_dit_xs

    torch.manual_seed(0)
    toy_dit_xs().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    result = main(["--model", str(tmp_path / "tiny"), "--steps", "2", "--eval-every", "1", "--seeds", "1",
                   "--out", str(out), "--device", "cpu"])
    assert set(result["rows"]) == {"base", "base, 32 steps", "SFT", "SFT, 32 steps", "D-OPSD"}
    for f in ("results.md", "results.json", "curves.png", "targets.png", "teacher_samples.png",
              "samples_sft_train.png", "samples_dopsd_unseen.png"):
        assert (out / f).stat().st_size > 0, f
    assert "| D-OPSD |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["curves"]["dopsd"][0]["step"] == 0
