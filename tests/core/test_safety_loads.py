"""Loading never runs pickled code: every ``torch.load`` in the packages passes ``weights_only=True``.

``torch.load`` defaulted to full unpickling before torch 2.6 and pyproject allows torch >= 2.4,
so a call without the flag executes arbitrary code from a tampered file on older installs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dopsd_ref", "toy_models", "paper_repro")


def unsafe_torch_loads(source: str) -> list[int]:
    """Line numbers of ``torch.load(...)`` calls that do not pass ``weights_only=True``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                and f.value.id == "torch"):
            continue
        flag = [k for k in node.keywords if k.arg == "weights_only"]
        if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is True):
            bad.append(node.lineno)
    return bad


def test_scanner_flags_a_plain_torch_load():
    """The scanner itself: a plain call and weights_only=False are flagged, the safe call is not."""
    src = "import torch\na = torch.load(p)\nb = torch.load(p, weights_only=False)\nc = torch.load(p, weights_only=True)\n"
    assert unsafe_torch_loads(src) == [2, 3]


def test_every_torch_load_in_the_packages_is_weights_only():
    """No module of dopsd_ref, toy_models or paper_repro unpickles arbitrary objects."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            lines = unsafe_torch_loads(path.read_text())
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    assert not found, f"torch.load without weights_only=True: {found}"


def test_recipe_state_formats_load_with_weights_only(tmp_path):
    """The pretraining resume state (model, EMA, AdamW state, counters) and the distillation
    trajectory cache (tensors, strings, None, floats) are plain containers that load with
    ``weights_only=True`` unchanged."""
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "ema": model.state_dict(), "opt": opt.state_dict(),
             "ema_updates": 3, "step": 7, "wall_s": 1.5}
    torch.save(state, tmp_path / "state.pt")
    back = torch.load(tmp_path / "state.pt", weights_only=True)
    assert back["step"] == 7 and torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    cache = [{"tokens": torch.ones(2, 3, dtype=torch.long), "ref": None, "route": "tokens",
              "states": torch.randn(5, 2, 3), "guidance": 3.0}]
    torch.save(cache, tmp_path / "cache.pt")
    got = torch.load(tmp_path / "cache.pt", weights_only=True)
    assert got[0]["route"] == "tokens" and got[0]["ref"] is None and torch.equal(got[0]["states"], cache[0]["states"])
