"""The command line: one command, a per-invariant report, exit status = verdict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dopsd_ref.conformance", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_passes_reference_and_fails_broken_with_nonzero_exit() -> None:
    """Invariant: the CLI exits 0 when every invariant passes (roll-out and EMA) and
    non-zero when any fails, printing the failed invariant's name on a FAIL line."""
    ok = _run("--impl", "dopsd_ref.conformance.examples.zimage:rollout", "--convention", "zimage",
              "--ema", "dopsd_ref.conformance.examples.ema:ema")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "CONFORMS" in ok.stdout and "FAIL " not in ok.stdout
    bad = _run("--impl", "dopsd_ref.conformance.gallery:teacher_receives_grad", "--ema",
               "dopsd_ref.conformance.gallery:ema_wrong_direction")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    fails = [ln for ln in bad.stdout.splitlines() if ln.startswith("FAIL")]
    assert any("teacher_gets_no_gradient" in ln for ln in fails)
    assert any("ema_direction" in ln for ln in fails)
