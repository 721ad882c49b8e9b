"""Run every tutorial in full mode and copy the README's figures into ``docs/figures/``.

    python tutorials/make_figures.py            # all six (about half an hour on 2 CPU cores)
    python tutorials/make_figures.py 04 05      # some of them
    python tutorials/make_figures.py demo       # copy the main job's figures from outputs/demo

Each tutorial runs as a subprocess (full mode, ``DOPSD_TUTORIAL_OUT=outputs/tutorials``);
the wall-clock of each is printed and written to ``docs/figures/timings.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "tutorials"
DEST = REPO / "docs" / "figures"
# tutorial -> the figures the README shows
FIGURES = {
    "01_flow_matching_few_steps": ["samples_base_vs_turbo.png"],
    "02_why_sft_breaks": ["sft_samples_train_prompts.png", "offpolicy_states.png"],
    "03_in_context_teacher": ["contexts.png"],
    "04_dopsd_from_scratch": ["loss_and_accuracy.png", "rollout_after.png", "samples_before_after.png"],
    "05_ablations": ["teacher_modes.png", "memory.png"],
    "06_toy_to_real": ["conventions.png"],
}


DEMO = ["curves.png", "targets.png", "samples_sft_train.png", "samples_sft_long_train.png", "samples_dopsd_train.png",
        "samples_sft_unseen.png", "samples_dopsd_unseen.png"]


def copy_demo(folder: Path = REPO / "outputs" / "demo") -> int:
    """Copy the main job's figures (``python -m toy_models.demo`` writes them) as ``demo_*.png``."""
    for fig in DEMO:
        if not (folder / fig).exists():
            print(f"[figures] {folder / fig} missing: run `python -m toy_models.demo` first")
            return 1
        shutil.copyfile(folder / fig, DEST / f"demo_{fig}")
    print(f"[figures] copied the demo's {len(DEMO)} figures from {folder}")
    return 0


def main(argv: list[str]) -> int:
    DEST.mkdir(parents=True, exist_ok=True)
    if argv == ["demo"]:
        return copy_demo()
    chosen = [t for t in FIGURES if not argv or any(t.startswith(a) for a in argv)]
    timings_path = DEST / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    env = {**os.environ, "DOPSD_TUTORIAL_FAST": "0", "DOPSD_TUTORIAL_OUT": str(OUT)}
    for name in chosen:
        t0 = time.time()
        print(f"[figures] {name} (full mode) ...", flush=True)
        run = subprocess.run([sys.executable, str(REPO / "tutorials" / f"{name}.py")], env=env, cwd=REPO)
        if run.returncode != 0:
            print(f"[figures] {name} failed (exit {run.returncode})")
            return run.returncode
        timings[name] = round(time.time() - t0, 1)
        for fig in FIGURES[name]:
            src = OUT / name / fig
            if not src.exists():
                print(f"[figures] {name}: expected figure {src} was not written")
                return 1
            shutil.copyfile(src, DEST / f"{name[:2]}_{fig}")
        print(f"[figures] {name}: {timings[name]:.0f} s; copied {', '.join(FIGURES[name])}", flush=True)
        timings_path.write_text(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
