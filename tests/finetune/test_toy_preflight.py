"""The toy teacher pre-flight on the shipped weights: a teacher that carries the concept and one that does not.

Measured on the shipped weights (``python -m toy_models.finetune preflight --data concept:ell
[--teacher_route encoder]``, 12 targets × 4 seeds): tokens route, x0 distance gain +17.7%
overall with the interval clearly above zero, teacher samples 1.00 vs student 0.00 concept
accuracy; encoder route, gain +1.0% (below the 5% margin), teacher samples 0.06. The
thresholds below are deliberately loose around those numbers.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.preflight import TeacherNotBetterWarning, toy_preflight, warn_if_not_better


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_held_out_ell_tokens_teacher_is_clearly_better():
    """The reference-token teacher carries the held-out L: its x0 predictions on the student's own
    roll-outs are closer to the (moved) targets than the student's, and its samples show the L
    while the untrained student's do not."""
    res = toy_preflight(FinetuneConfig(data="concept:ell", device="cpu"), seeds=4)
    assert res.better and res.x0.verdict == "teacher better"
    assert res.x0.overall.gain > 0.08 and res.x0.overall.n == 48
    assert res.teacher_acc >= 0.8 and res.student_acc <= 0.2 and res.accuracy.better
    assert res.grid().shape == (12 * (1 + 2 * 4), 3, 16, 16)  # targets row + per seed teacher, student rows
    assert warn_if_not_better(res) is True


def test_encoder_route_teacher_is_not_better_and_the_cli_says_so(tmp_path, capsys):
    """The encoder-route teacher does not carry the L in the shipped toy: the verdict is "not better",
    the CLI prints it with the numbers, writes the grid and the JSON, warns, and ``--strict`` exits 3."""
    from toy_models.finetune.__main__ import main

    rc = main(["preflight", "--data", "concept:ell", "--teacher_route", "encoder", "--device", "cpu",
               "--out", str(tmp_path), "--strict"])
    out, err = capsys.readouterr()
    assert rc == 3
    assert "verdict: teacher not better" in out and "concept accuracy of samples" in out
    assert "warning: teacher pre-flight" in err
    report = json.loads((tmp_path / "preflight.json").read_text())
    assert report["verdict"] == "teacher not better" and report["teacher_acc"] <= 0.3
    assert report["x0"]["overall"]["gain"] < 0.05
    assert (tmp_path / "preflight.png").stat().st_size > 0
    with pytest.warns(TeacherNotBetterWarning):
        assert warn_if_not_better(SimpleNamespace(better=False)) is False


def test_train_runs_the_preflight_on_request(tmp_path, capsys):
    """``train --preflight`` prints the pre-flight verdict (and its warning) before training, then trains."""
    from toy_models.finetune.__main__ import main

    rc = main(["train", "--data", "concept:ell", "--teacher_route", "encoder", "--num_targets", "4", "--steps", "1",
               "--batch_size", "2", "--device", "cpu", "--out", str(tmp_path / "run"), "--no-progress",
               "--preflight", "--preflight_seeds", "1"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.index("verdict: teacher") < out.index("trained dopsd for 1 steps")
    assert "n = 4 samples" in out and "warning: teacher pre-flight" in err
    assert (tmp_path / "run" / "preflight.png").exists()
