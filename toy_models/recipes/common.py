"""Helpers shared by the recipes: threads, EMA, LR schedule, flow-matching loss, logs.

Three helpers here look like parts of ``dopsd_ref`` and are deliberately kept apart, because
the shipped weights were trained with them and their recipes must reproduce those weights:

- :func:`training_sigmas` draws the same distribution as
  ``dopsd_ref.losses.sample_training_sigmas(kind="mixed")`` (half logit-normal, half
  uniform) but in another order of random draws and in float32, so the core's function
  would give the recipes another random stream;
- :func:`fm_loss_sum` is ``B ×`` ``dopsd_ref.losses.flow_matching_loss`` up to float
  rounding (a sum of per-sample means rather than one mean), the form the recipes'
  sub-batch accumulation needs;
- :class:`EMA` warms its decay up as ``min(d, (1 + n) / (10 + n))`` after ``n`` updates (so
  early averages are not dominated by the random initial weights), unlike the fine-tuning
  teacher ``dopsd_ref.teachers.Teacher``, whose EMA is the method's and has no warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import Tensor, nn

from dopsd_ref.conventions import noise_state, velocity_target


def base_parser(desc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=desc)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=out, help="output model folder (HF style)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave default)")
    return p


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


class EMA:
    """Exponential moving average of parameters: ``θ̄ ← d_n·θ̄ + (1 − d_n)·θ`` with the
    warm-up ``d_n = min(d, (1 + n) / (10 + n))`` at the n-th update (see module doc)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - d)


def lr_at(step: int, total: int, lr: float, warmup: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac·lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def training_sigmas(n: int, gen: torch.Generator) -> Tensor:
    """Half logit-normal(0, 1), half uniform σ in (0, 1)."""
    ln = torch.sigmoid(torch.randn(n, generator=gen))
    un = torch.rand(n, generator=gen)
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, ln, un).clamp(1e-4, 1.0)


def fm_loss_sum(model: nn.Module, x0: Tensor, context: Any, gen: torch.Generator) -> Tensor:
    """Summed per-sample flow-matching MSE ``Σ_b mean((v_θ(x_σ, σ, c) − (ε − x0))²)``."""
    noise = torch.randn(x0.shape, generator=gen)
    sigma = training_sigmas(x0.shape[0], gen)
    v = model(noise_state(x0, noise, sigma), sigma, context)
    return (v - velocity_target(x0, noise)).pow(2).mean(dim=(1, 2, 3)).sum()


class JsonLog:
    """Append-only JSON-lines log."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")

    def write(self, **kw: Any) -> None:
        self.f.write(json.dumps(kw) + "\n")
        self.f.flush()


def _replace_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary sibling, fsync, then one ``os.replace``: a crash or Ctrl-C
    mid-write leaves the previous ``path`` whole, and no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """JSON (indent 2) written atomically."""
    _replace_atomically(Path(path), lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically (the recipes resume from the previous file if a save
    is interrupted)."""
    _replace_atomically(Path(path), lambda f: torch.save(obj, f))


def save_pretrained_atomic(model: Any, out: str | os.PathLike) -> None:
    """``model.save_pretrained(out)`` through a temporary sibling folder, each file then moved
    into ``out`` with ``os.replace``: no file in ``out`` is ever half-written (other files
    in ``out``, such as a recipe's ``state.pt``, are left alone)."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.saving"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier crash
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
