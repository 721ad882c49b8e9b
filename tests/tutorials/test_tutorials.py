"""Every tutorial runs top to bottom in fast mode.

Each ``tutorials/0X_*.py`` is executed as a script in a subprocess (as a reader would run it),
with ``DOPSD_TUTORIAL_FAST=1``, ``MPLBACKEND=Agg``, a temporary working directory and a
temporary figure folder; the test fails if the script raises, and checks that it wrote PNG
figures. Tutorials that use the shipped toy weights are skipped, with the missing folders
named, until those weights exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TUTORIALS = REPO / "tutorials"
WEIGHTS = REPO / "toy_models" / "weights"

# tutorial -> the toy weight folders it loads (tutorial 6 uses tiny real-architecture models only)
NEEDS = {
    "01_flow_matching_few_steps.py": ("toy-dit-base", "toy-dit-turbo4", "toy-evaluator"),
    "02_why_sft_breaks.py": ("toy-dit-turbo4", "toy-evaluator"),
    "03_in_context_teacher.py": ("toy-dit-turbo4", "toy-evaluator"),
    "04_dopsd_from_scratch.py": ("toy-dit-turbo4", "toy-evaluator"),
    "05_ablations.py": ("toy-dit-turbo4", "toy-evaluator"),
    "06_toy_to_real.py": (),
}
TIMEOUT_S = 600  # fast mode targets ≤ 2 min on 2 free cores; generous for loaded CI machines


def test_every_tutorial_is_listed():
    found = sorted(p.name for p in TUTORIALS.glob("0*.py"))
    assert found == sorted(NEEDS), f"tutorials on disk {found} != tutorials under test {sorted(NEEDS)}"


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_tutorial_runs_in_fast_mode(name: str, tmp_path: Path) -> None:
    missing = [w for w in NEEDS[name] if not (WEIGHTS / w / "model.safetensors").is_file()]
    if missing:
        pytest.skip(f"{name} needs the shipped toy weights {missing} under toy_models/weights/ "
                    f"(not trained yet; see toy_models/README.md for the recipes)")
    if name == "06_toy_to_real.py":
        pytest.importorskip("diffusers")
        pytest.importorskip("transformers")
        pytest.importorskip("peft")
    out = tmp_path / "figures"
    env = {
        **os.environ,
        "DOPSD_TUTORIAL_FAST": "1",
        "MPLBACKEND": "Agg",
        "DOPSD_TUTORIAL_OUT": str(out),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("DOPSD_TOY_WEIGHTS", None)  # the tutorials must run on the shipped weights
    proc = subprocess.run([sys.executable, str(TUTORIALS / name)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    pngs = sorted(out.rglob("*.png"))
    assert pngs, f"{name} wrote no PNG figure under {out}"
    assert not list(tmp_path.glob("outputs")), f"{name} wrote into its working directory instead of DOPSD_TUTORIAL_OUT"


def test_tutorials_are_jupytext_percent_notebooks() -> None:
    """Each tutorial opens as a notebook: percent cells, markdown prose, and it reads the fast-mode flag."""
    for name in NEEDS:
        text = (TUTORIALS / name).read_text()
        assert "# %% [markdown]" in text and "\n# %%\n" in text, f"{name}: not in jupytext percent format"
        assert "DOPSD_TUTORIAL_FAST" in text, f"{name}: fast mode not documented at its top"
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(TUTORIALS / "06_toy_to_real.py")
    kinds = {c.cell_type for c in nb.cells}
    assert kinds == {"markdown", "code"}, kinds
