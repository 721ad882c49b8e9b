"""The main-job script end to end on a tiny random model (slow: several evaluations)."""

import json

import pytest


@pytest.mark.slow
def test_demo_writes_table_grids_and_curves(tmp_path):
    """The demo trains SFT and D-OPSD, evaluates base/SFT/D-OPSD and writes results.md,
    results.json, the curves and every sample grid."""
    import torch

    from toy_models.demo import main
    from toy_models.models.dit import toy_dit_xs

    torch.manual_seed(0)
    toy_dit_xs().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "demo"
    result = main(["--model", str(tmp_path / "tiny"), "--steps", "2", "--eval-every", "1", "--seeds", "1",
                   "--sft-factor", "2", "--out", str(out), "--device", "cpu"])
    matched = [r for r in result["rows"] if " @ step " in r]
    assert set(result["rows"]) - set(matched) == {"base", "base, 32 steps", "SFT", "SFT, 32 steps", "SFT, 2× steps",
                                                  "D-OPSD"}
    named = {n for r in matched for n in (r.split("matched to ")[1][:-1].split("; ") if r.startswith("D-OPSD @")
                                          else [r.split(" @ ")[0]])}
    assert named == {"SFT", "SFT, 2× steps"}  # every SFT run is matched, a checkpoint at most once
    for f in ("results.md", "results.json", "curves.png", "targets.png", "teacher_samples.png",
              "samples_sft_train.png", "samples_sft_long_train.png", "samples_dopsd_unseen.png"):
        assert (out / f).stat().st_size > 0, f
    assert "| D-OPSD |" in (out / "results.md").read_text()
    assert json.loads((out / "results.json").read_text())["curves"]["D-OPSD"][0]["step"] == 0


def test_matched_checkpoint_picks_closest_accuracy():
    """SFT is compared with D-OPSD at the logged SFT checkpoint whose concept accuracy is
    closest to D-OPSD's (earliest on ties; the step-0 evaluation never counts)."""
    from toy_models.demo import matched_checkpoint

    log = [{"step": 0, "concept_acc": 0.8}, {"step": 1, "loss": 1.0}, {"step": 10, "concept_acc": 0.3},
           {"step": 20, "concept_acc": 0.7}, {"step": 30, "concept_acc": 0.9}]
    assert matched_checkpoint(log, 0.75)["step"] == 20
    assert matched_checkpoint(log, 0.95)["step"] == 30
    assert matched_checkpoint([{"step": 0, "concept_acc": 0.5}], 0.5) is None


def test_matched_rows_merge_runs_matched_to_one_checkpoint():
    """Two SFT runs matched to the same D-OPSD checkpoint give one row naming both; a run that
    ends above D-OPSD is itself matched at its own checkpoint."""
    from toy_models.demo import METRICS, matched_rows

    metrics = {k: 0.0 for k, _ in METRICS}
    rows = {"D-OPSD": {**metrics, "concept_acc": 0.9}, "SFT": {**metrics, "concept_acc": 0.6},
            "SFT, 4× steps": {**metrics, "concept_acc": 0.7}, "SFT, 8× steps": {**metrics, "concept_acc": 0.95}}
    logs = {"D-OPSD": [{**metrics, "step": 25, "concept_acc": 0.3}, {**metrics, "step": 50, "concept_acc": 0.65}],
            "SFT, 8× steps": [{**metrics, "step": 100, "concept_acc": 0.88}]}
    got = matched_rows(rows, logs, ["SFT", "SFT, 4× steps", "SFT, 8× steps"])
    assert set(got) == {"D-OPSD @ step 50 (matched to SFT; SFT, 4× steps)", "SFT, 8× steps @ step 100 (matched to D-OPSD)"}


def test_retention_vs_base_is_the_paired_difference_over_generation_seeds():
    """Retention is each model's known-prompt metric minus the base's on the same generation
    seed, averaged, with the 95% t-interval of those differences."""
    from toy_models.demo import retention_vs_base
    from toy_models.studies.experiments import mean_ci

    per_seed = {"base": [{"known_acc": 0.9, "known_fid": 10.0}, {"known_acc": 0.8, "known_fid": 12.0}],
                "SFT": [{"known_acc": 0.5, "known_fid": 20.0}, {"known_acc": 0.6, "known_fid": 30.0}]}
    got = retention_vs_base(per_seed, ["SFT"])["SFT"]
    assert got["known_acc"]["diff_vs_base"] == pytest.approx(-0.3)
    assert got["known_fid"]["diff_vs_base"] == pytest.approx(14.0)
    assert got["known_acc"]["ci"] == pytest.approx(mean_ci([-0.4, -0.2])[1])


@pytest.mark.slow
def test_demo_ungated_lora_option_measures_retention(tmp_path):
    """The default scope is the ungated LoRA (active for every prompt, the paper's setting) for
    both methods, and the results report retention on known prompts as measured differences to
    the base; with --scope prompt_gated known prompts equal the base's (difference exactly 0)."""
    from finetune_fixtures import tiny_model

    from toy_models.demo import main

    tiny_model().save_pretrained(tmp_path / "tiny")
    common = ["--model", str(tmp_path / "tiny"), "--steps", "2", "--eval-every", "2", "--seeds", "2", "--sft-factor", "1",
              "--device", "cpu", "--lr", "0.05"]
    lora = main(common + ["--out", str(tmp_path / "lora")])
    gated = main(common + ["--scope", "prompt_gated", "--out", str(tmp_path / "gated")])
    assert lora["settings"]["scope"] == "lora" and gated["settings"]["scope"] == "prompt_gated"
    assert lora["settings"]["lr"] == gated["settings"]["lr"] == 0.05  # --lr overrides the scope default
    md = (tmp_path / "lora" / "results.md").read_text()
    assert "--scope" not in md.split("`")[1] and "retention is measured" in md and "| D-OPSD |" in md
    assert "--scope prompt_gated" in (tmp_path / "gated" / "results.md").read_text()
    assert "by construction" in (tmp_path / "gated" / "results.md").read_text()
    for name in ("SFT", "D-OPSD"):
        assert gated["retention"][name]["known_fid"]["diff_vs_base"] == 0.0
    assert any(lora["retention"][n]["known_fid"]["diff_vs_base"] != 0.0 for n in ("SFT", "D-OPSD"))


def test_retention_lines_say_how_retention_is_obtained():
    """The results text says retention is by construction for the rare-token-local scopes and
    measured for the others (ungated LoRA, cross-attention, all parameters)."""
    from toy_models.demo import retention_lines

    r = {"D-OPSD": {"known_acc": {"diff_vs_base": -0.1, "ci": 0.05}, "known_fid": {"diff_vs_base": 2.0, "ci": float("nan")}}}
    for scope in ("prompt_gated", "token_kv"):
        assert "by construction" in "\n".join(retention_lines(r, scope, 3))
    for scope in ("lora", "cross_attn", "full"):
        text = "\n".join(retention_lines(r, scope, 3))
        assert "retention is measured" in text and "| D-OPSD | -0.100 ± 0.050 | +2.000 |" in text
