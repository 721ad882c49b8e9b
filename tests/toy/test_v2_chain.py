"""The toy world v2 chain (``toy_models/recipes/v2_chain.sh``) is one continuous lineage.

The script is run with ``DRY_RUN=1``, which prints each stage's command and runs nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from toy_models.world.mixture import MIXTURES

SCRIPT = Path(__file__).resolve().parents[2] / "toy_models" / "recipes" / "v2_chain.sh"


def _stages(runs: str = "runs") -> list[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("INIT", "STOP_AFTER", "PYTHON")}
    env.update(DRY_RUN="1", RUNS=runs)
    out = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=True).stdout
    stages = []
    for line in out.splitlines():
        argv = shlex.split(line)
        assert argv[0] == "-m", line
        args: dict[str, str] = {"module": argv[1]}
        key = None
        for a in argv[2:]:
            if a.startswith("--"):
                key = a[2:]
                args[key] = "true"
            else:
                args[key] = a
        stages.append(args)
    return stages


def test_every_stage_continues_the_previous_one_with_rope():
    """Each pre-training stage starts from the previous stage's output (the first from the v1
    base), keeps 2-D RoPE on (``--rope``: leaving it out of one continuation silently turns
    RoPE off for the rest of the chain), uses a known mixture and its own seed, and keeps its
    resumable state in its own folder; the distillation starts from the last base with that
    base's mixture, and acceptance measures that base and the distilled model."""
    stages = _stages("some/runs")
    pre = [s for s in stages if s["module"] == "toy_models.recipes.pretrain"]
    distill, accept = stages[len(pre):]
    assert len(pre) >= 2 and [s["module"] for s in stages[:len(pre)]] == ["toy_models.recipes.pretrain"] * len(pre)
    assert pre[0]["init"] == "toy_models/weights/toy-dit-base"
    for prev, cur in zip(pre, pre[1:]):
        assert cur["init"] == prev["out"], cur
    for s in pre:
        assert s.get("rope") == "true", s
        assert s["mixture"] in MIXTURES, s
        assert s["out"].startswith("some/runs/") and s["state"] == s["out"] + "/state.pt", s
    assert len({s["seed"] for s in pre}) == len(pre)
    assert distill["module"] == "toy_models.recipes.distill"
    assert distill["base"] == pre[-1]["out"] and distill["mixture"] == pre[-1]["mixture"]
    assert distill["negative"] == "concept_token" and distill["ref-aligned"] == "0.0"
    assert accept["module"] == "toy_models.recipes.acceptance"
    assert accept["base"] == pre[-1]["out"] and accept["turbo"] == distill["out"]
    assert accept["n"] == "256" and accept["out"].startswith("some/runs/")


def test_stop_after_names_a_stage():
    """A STOP_AFTER that is not a stage name is refused (exit 2, naming the stages) before
    anything runs, instead of silently running the whole chain."""
    env = {**os.environ, "STOP_AFTER": "c3x-base", "RUNS": "/nonexistent/runs"}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "not a stage" in r.stderr and "c3i-base" in r.stderr


def test_refuses_to_start_from_a_rope_model(tmp_path):
    """The chain adds RoPE to the v1 base; an INIT that has RoPE already (the v2 base, once
    shipped) is refused before anything runs, with a message that names the v1 base."""
    init = tmp_path / "base"
    init.mkdir()
    (init / "config.json").write_text('{"depth": 3, "rope": true}')
    env = {**os.environ, "INIT": str(init), "RUNS": str(tmp_path / "runs"), "PYTHON": "false"}
    env.pop("STOP_AFTER", None)
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "v1 base" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
