"""Shared plumbing of the tutorials: fast mode, output folder, weights, figures.

Nothing of the method lives here: the tutorials call ``dopsd_ref``, ``toy_models`` and
``paper_repro`` directly. This module only

* makes the repository importable when the project is not installed (``python tutorials/…``);
* reads the environment variables documented in ``tutorials/README.md``::

    DOPSD_TUTORIAL_FAST=1        fast mode: fewer steps/seeds (≤ 2 min per tutorial on 2 CPU cores)
    DOPSD_TUTORIAL_OUT=DIR       where figures go (default: outputs/tutorials/, git-ignored)
    DOPSD_TUTORIAL_THREADS=N     torch CPU threads (default: 1 in fast mode, torch's choice otherwise)
    DOPSD_TOY_WEIGHTS=DIR        folder holding toy-dit-base/, toy-dit-turbo4/, toy-evaluator/
                                 (default: toy_models/weights/, the shipped weights)

* saves figures as PNG (and shows them when run interactively, e.g. in Jupyter).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tutorials/01_….py` without `pip install -e .`
    try:
        import dopsd_ref  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        # subprocesses (e.g. toy_models.studies.bench's memory cases) must find the packages too
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)

import matplotlib  # noqa: E402

INTERACTIVE = "ipykernel" in sys.modules or hasattr(sys, "ps1")
if not INTERACTIVE and "MPLBACKEND" not in os.environ:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

FAST = os.environ.get("DOPSD_TUTORIAL_FAST", "0").strip().lower() in ("1", "true", "yes")
OUT_ROOT = Path(os.environ.get("DOPSD_TUTORIAL_OUT", str(REPO / "outputs" / "tutorials")))
WEIGHTS = Path(os.environ.get("DOPSD_TOY_WEIGHTS", str(REPO / "toy_models" / "weights")))
BASE, TURBO, EVALUATOR = "toy-dit-base", "toy-dit-turbo4", "toy-evaluator"

# Tiny models gain little from intra-op threads, and on a busy 2-core machine two contending
# threads made a fast-mode tutorial ~10x slower than one; so fast mode uses one thread unless told.
if os.environ.get("DOPSD_TUTORIAL_THREADS"):
    torch.set_num_threads(int(os.environ["DOPSD_TUTORIAL_THREADS"]))
elif FAST:
    torch.set_num_threads(1)


def pick(fast, full):
    """``fast`` in fast mode, ``full`` otherwise."""
    return fast if FAST else full


def out_dir(name: str) -> Path:
    """The tutorial's figure folder (created)."""
    d = OUT_ROOT / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def weights_path(name: str) -> Path:
    """Folder of one set of toy weights; a clear error if it is not there yet."""
    p = WEIGHTS / name
    if not (p / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{p} holds no model.safetensors. The tutorials use the shipped toy weights "
            f"(see toy_models/README.md for the recipes that train them), or set DOPSD_TOY_WEIGHTS."
        )
    return p


def load_toy(name: str):
    """A shipped toy model (``ToyDiT`` for base/turbo, ``ToyEvaluator`` for the evaluator), eval mode."""
    if name == EVALUATOR:
        from toy_models.eval.evaluator import ToyEvaluator

        return ToyEvaluator.from_pretrained(weights_path(name)).eval()
    from toy_models.models.dit import ToyDiT

    return ToyDiT.from_pretrained(weights_path(name)).eval()


def save(fig, path: Path) -> Path:
    """Save ``fig`` as PNG; show it when interactive, close it otherwise."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"[figure] {path}")
    if INTERACTIVE:
        plt.show()
    else:
        plt.close(fig)
    return path


def to_rgb(x: torch.Tensor):
    """[3, H, W] in [−1, 1] → an [H, W, 3] array in [0, 1] for ``imshow``."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def image_rows(rows: list[torch.Tensor], row_labels: list[str], col_labels: list[str] | None = None,
               title: str | None = None, size: float = 1.1):
    """A figure with one row of images per tensor [N, 3, H, W] (values outside [−1, 1] are clipped)."""
    n = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n + 1.6, size * len(rows) + (0.5 if title else 0.1)),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < r.shape[0]:
                ax.imshow(to_rgb(r[j]), interpolation="nearest")
            if i == 0 and col_labels and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
        axes[i, 0].set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def banner(name: str) -> None:
    print(f"[{name}] mode: {'FAST (DOPSD_TUTORIAL_FAST=1)' if FAST else 'full'}; "
          f"figures -> {OUT_ROOT / name}; torch threads: {torch.get_num_threads()}")
