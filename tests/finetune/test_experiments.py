"""The experiment suite's statistics and a tiny end-to-end run."""

import json

import pytest

from toy_models.studies.experiments import SUITES, mean_ci, run_suite, suite


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

    from toy_models.models.dit import toy_dit_xs

    torch.manual_seed(0)
    toy_dit_xs().save_pretrained(tmp_path / "tiny")
    rows = run_suite("concept", 1, 1, 2, tmp_path / "out", "cpu", str(tmp_path / "tiny"), progress=False)
    assert set(rows) == {"D-OPSD", "SFT", "SFT, 32 steps", "off-policy distillation", "SFT on teacher samples"}
    md = (tmp_path / "out" / "concept" / "results.md").read_text()
    assert "paired difference" in md and "| SFT |" in md
    data = json.loads((tmp_path / "out" / "concept" / "results.json").read_text())
    assert data["rows"]["D-OPSD"]["concept_acc"]["diff_vs_ref"] == 0.0


# ---- the protocol commands (lora_table, full_table, curves, lr_sweep, options) ----

from toy_models.studies.experiments import COMMANDS, frontier_at, normalized_auc, paired_summary, steps_to_threshold  # noqa: E402


def test_paired_summary_clusters_by_training_seed():
    """The paired difference is averaged within each training seed and its 95% interval is
    the t-interval over the training seeds (generation seeds of one model are not independent);
    with one training seed it falls back to the generation seeds. A method paired with itself
    differs by exactly 0."""
    rows = lambda vals: [{"train_seed": ts, "gen_seed": g, "m": v} for (ts, g), v in vals.items()]  # noqa: E731
    ref = rows({(0, 0): 1.0, (0, 1): 2.0, (1, 0): 3.0, (1, 1): 4.0, (2, 0): 0.0, (2, 1): 0.0})
    other = rows({(0, 0): 2.0, (0, 1): 2.0, (1, 0): 3.0, (1, 1): 6.0, (2, 0): 1.0, (2, 1): 2.0})
    out = paired_summary({"ref": ref, "other": other}, "ref", ("m",))
    per_train_seed = [0.5, 1.0, 1.5]  # mean difference within each training seed
    assert out["other"]["m"]["diff_vs_ref"] == pytest.approx(1.0)
    assert out["other"]["m"]["diff_ci"] == pytest.approx(mean_ci(per_train_seed)[1])
    assert out["ref"]["m"]["diff_vs_ref"] == 0.0
    assert out["other"]["m"]["mean"] == pytest.approx(16 / 6)
    one = paired_summary({"ref": ref[:2], "other": other[:2]}, "ref", ("m",))
    assert one["other"]["m"]["diff_ci"] == pytest.approx(mean_ci([1.0, 0.0])[1])


def test_curve_statistics():
    """Steps to threshold is the first evaluated step at or above it (None if never); the
    normalized AUC is the trapezoid mean of the curve over the step span (a constant curve c
    gives c); the frontier is the best retention among runs at or above a fidelity."""
    assert steps_to_threshold([0, 10, 20], [0.1, 0.8, 0.9], 0.8) == 10
    assert steps_to_threshold([0, 10], [0.1, 0.2], 0.8) is None
    assert normalized_auc([0, 10, 30], [0.5, 0.5, 0.5]) == pytest.approx(0.5)
    assert normalized_auc([0, 10, 20], [0.0, 1.0, 1.0]) == pytest.approx(0.75)
    assert normalized_auc([10, 20, 40], [1.0, 1.0, 1.0]) == pytest.approx(1.0)  # resumed curves start later
    assert frontier_at([(0.9, 0.2), (0.6, 0.8), (0.95, 0.4)], 0.85) == 0.4
    assert frontier_at([(0.2, 0.9)], 0.5) != frontier_at([(0.2, 0.9)], 0.5)  # NaN: no run reaches it


EXPECTED_ROWS = {
    "lora_table": ["base (no fine-tuning)", "SFT", "SFT on teacher samples", "off-policy distillation",
                   "DreamBooth (prior preservation)", "D-OPSD", "SFT, prompt-gated LoRA", "D-OPSD, prompt-gated LoRA"],
    "full_table": ["base (no fine-tuning)", "SFT", "D-OPSD"],
    "options": ["D-OPSD (λ = 0, K = 4)", "+ reconstruction loss λ = 0.1", "+ reconstruction loss λ = 1",
                "K curriculum 2 → 4 at step 1", "K = 2 throughout"],
    "curves": ["D-OPSD", "SFT", "SFT on teacher samples", "off-policy distillation", "teacher = live copy",
               "teacher = frozen base", "teacher = EMA 0.9", "teacher = EMA 0.9999"],
    "lr_sweep": ["D-OPSD, lr 0.001", "D-OPSD, lr 0.01", "SFT, lr 0.001", "SFT, lr 0.01"],
    "retention": ["base (no fine-tuning)", "SFT", "DreamBooth (prior preservation)", "D-OPSD",
                  "D-OPSD + on-policy prior batch", "D-OPSD, σ = 1 step not trained"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_protocol_command_fast_mode_writes_its_table(tmp_path, tiny_model_dir, command):
    """Each protocol command in --fast mode trains its rows, writes <command>.md (with the exact
    command that produced it and every row), <command>.json (the same command, per-seed values)
    and, for curves and lr_sweep, the PNG plot."""
    from toy_models.studies.experiments import main

    out = tmp_path / "results"
    argv = [command, "--fast", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"]
    main(argv)
    md = (out / f"{command}.md").read_text()
    assert f"`python -m toy_models.studies.experiments {' '.join(argv)}`" in md and "fast smoke mode" in md
    for row in EXPECTED_ROWS[command]:
        assert f"| {row} |" in md, row
    data = json.loads((out / f"{command}.json").read_text())
    assert data["command"] == "python -m toy_models.studies.experiments " + " ".join(argv)
    if command in ("curves", "lr_sweep"):
        assert (out / f"{command}.png").stat().st_size > 0 and f"]({command}.png)" in md
    if command == "curves":
        assert [r["step"] for r in data["logs"]["D-OPSD"][0]] == [0, 1, 2]
    elif command == "lr_sweep":
        assert "## Matched fidelity" in md and len(data["matched"]) == 3
    else:
        ref = {"lora_table": "D-OPSD", "full_table": "D-OPSD", "options": "D-OPSD (λ = 0, K = 4)",
               "retention": "D-OPSD"}[command]
        assert data["rows"][ref]["concept_acc"]["diff_vs_ref"] == 0.0
        assert {"concept_dino_d", "known_acc", "known_fid"} <= set(data["rows"][ref])
        if command == "retention":
            assert "known_leak" in data["rows"][ref] and "| known prompts drawn as the concept ↓ |" in md


def test_lr_sweep_records_a_diverged_run_and_goes_on(tmp_path, tiny_model_dir, monkeypatch):
    """A learning rate whose loss turns NaN is recorded as diverged (n/a, excluded from the
    frontier) and the sweep still trains and reports every other run."""
    import toy_models.studies.experiments as E
    from dopsd_ref import NonFiniteLossError

    orig = E._train

    def train(proto, cfg, targets, evaluate=None):
        if cfg.method == "dopsd" and cfg.lr > 5e-3:
            raise NonFiniteLossError("loss is nan at optimizer step 1")
        return orig(proto, cfg, targets, evaluate)

    monkeypatch.setattr(E, "_train", train)
    proto = E.Protocol(train_seeds=1, gen_seeds=1, steps=1, device="cpu", model=str(tiny_model_dir), fast=True,
                       progress=False)
    E.lr_sweep(proto, tmp_path, "cmd", "lora", (1e-3, 1e-2))
    md = (tmp_path / "lr_sweep.md").read_text()
    assert "| D-OPSD, lr 0.01 | n/a | n/a |" in md
    assert "| SFT, lr 0.01 | " in md and "| SFT, lr 0.01 | n/a" not in md


def test_table_command_lr_sets_every_row_and_names_the_file(tmp_path, tiny_model_dir):
    """--lr trains every row of a table command at that learning rate (overriding the table's
    own, e.g. full_table's 1e-4) and writes <command>_lr<lr>.md/.json, leaving <command>.md alone."""
    from toy_models.studies.experiments import main

    out = tmp_path / "results"
    main(["full_table", "--fast", "--lr", "0.002", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"])
    data = json.loads((out / "full_table_lr0.002.json").read_text())
    assert {c["lr"] for c in data["configs"].values()} == {0.002} and data["base_config"]["lr"] == 0.002
    assert not (out / "full_table.md").exists() and "--lr 0.002" in (out / "full_table_lr0.002.md").read_text()


def test_curves_lr_and_groups(tmp_path, tiny_model_dir):
    """curves --lr --groups strategies trains only the strategy runs at that learning rate and
    writes curves_lr<lr>.md/.json/.png; an unknown group is refused by name."""
    from toy_models.studies.experiments import main

    out = tmp_path / "results"
    common = ["--fast", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cpu"]
    main(["curves", "--lr", "0.002", "--groups", "strategies", *common])
    data = json.loads((out / "curves_lr0.002.json").read_text())
    assert set(data["logs"]) == {"D-OPSD", "SFT", "SFT on teacher samples", "off-policy distillation"}
    assert data["config"]["lr"] == 0.002 and (out / "curves_lr0.002.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["curves", "--groups", "students", *common])
