"""The experiment suite's statistics and a tiny end-to-end run."""

import json

import pytest

from toy_models.experiments import SUITES, mean_ci, run_suite, suite


def test_mean_ci_t_interval():
    """mean_ci returns the sample mean and the 95% t half-width s·t/√n."""
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and h == pytest.approx(4.303 * 1.0 / 3**0.5)
    assert mean_ci([5.0])[0] == 5.0


def test_suites_are_defined():
    """Every documented suite names D-OPSD first (the reference of the paired differences)."""
    assert SUITES == ("concept", "style", "domain", "ablations", "scopes")
    for name in SUITES:
        _, variants = suite(name)
        assert variants[0].changes.get("method") == "dopsd"
        assert len({v.name for v in variants}) == len(variants)
    with pytest.raises(ValueError, match="unknown suite"):
        suite("everything")


@pytest.mark.slow
def test_tiny_concept_suite_end_to_end(tmp_path):
    """A 2-step concept suite on a tiny model writes a table with paired differences."""
    import torch

    from toy_models.dit import toy_dit_xs

    torch.manual_seed(0)
    toy_dit_xs().save_pretrained(tmp_path / "tiny")
    rows = run_suite("concept", 1, 1, 2, tmp_path / "out", "cpu", str(tmp_path / "tiny"), progress=False)
    assert set(rows) == {"D-OPSD", "SFT", "SFT, 32 steps", "off-policy distillation", "SFT on teacher samples"}
    md = (tmp_path / "out" / "concept" / "results.md").read_text()
    assert "paired difference" in md and "| SFT |" in md
    data = json.loads((tmp_path / "out" / "concept" / "results.json").read_text())
    assert data["rows"]["D-OPSD"]["concept_acc"]["diff_vs_ref"] == 0.0
