"""Atomic, exactly-resumable training checkpoints (safetensors for tensors, JSON for the rest).

A checkpoint is a folder ``step_XXXXXXXX/`` holding

* ``tensors.safetensors`` — every tensor: model (student), teacher, optimizer state, torch
  RNG states, each under a prefix (``student/``, ``teacher/``, ``optim/``, ``rng/``);
* ``meta.json`` — step, optimizer param groups, numpy/python RNG states, user metadata.

Writes are atomic: the folder is written under a temporary name, fsynced, then renamed into
place, and ``latest`` (a one-line file) is replaced with ``os.replace``. A run killed
mid-write leaves the previous checkpoint loadable. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state"]

LATEST = "latest"


@dataclass
class TrainState:
    """Everything needed to resume a run exactly.

    Attributes:
        step: optimizer steps completed.
        student: the trainable tensors (full state dict or LoRA tensors only).
        teacher: the teacher's tensors (EMA copy or teacher adapter); empty for "live".
        optimizer: ``optimizer.state_dict()``.
        rng: see :func:`rng_state`.
        extra: JSON-serialisable user metadata (config, metrics, ...).
        extra_tensors: additional tensors (e.g. a data generator's state).
    """

    step: int
    student: dict[str, Tensor]
    teacher: dict[str, Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of python, numpy, torch (CPU and CUDA) and named generators' RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    for name, g in (generators or {}).items():
        state[f"gen:{name}"] = g.get_state()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore a snapshot made by :func:`rng_state` (named generators are set in place)."""
    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        key = f"gen:{name}"
        if key not in state:
            raise KeyError(f"checkpoint has no RNG state for generator {name!r}")
        g.set_state(state[key])


def _flatten_optimizer(opt: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, pstate in opt.get("state", {}).items():
        for k, v in pstate.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{pid}/{k}"] = v
            else:
                scalars[f"{pid}/{k}"] = v
    return tensors, {"param_groups": opt.get("param_groups", []), "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, k = key.split("/", 2)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split("/", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta.get("param_groups", [])}


def _split_rng(rng: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, plain = {}, {}
    for k, v in rng.items():
        if isinstance(v, Tensor):
            tensors[f"rng/{k}"] = v
        elif k == "cuda":
            for i, t in enumerate(v):
                tensors[f"rng/cuda/{i}"] = t
        elif k == "numpy":
            plain[k] = [v[0], np.asarray(v[1]).tolist(), int(v[2]), int(v[3]), float(v[4])]
        else:
            plain[k] = v
    return tensors, plain


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(root: str | os.PathLike, state: TrainState, keep: int = 2) -> Path:
    """Write ``state`` atomically to ``root/step_XXXXXXXX`` and point ``root/latest`` at it.

    Args:
        root: the run's checkpoint folder (created if needed).
        state: what to save.
        keep: how many most recent checkpoints to keep (older ones are deleted after the
            new one is in place).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:08d}"
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    rng_tensors, rng_plain = _split_rng(state.rng)
    tensors: dict[str, Tensor] = {}
    for prefix, d in (("student", state.student), ("teacher", state.teacher), ("extra", state.extra_tensors)):
        for k, v in d.items():
            tensors[f"{prefix}/{k}"] = v
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": state.step, "optimizer": opt_meta, "rng": rng_plain, "extra": state.extra, "format": 1}

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / "tensors.safetensors", "rb") as f:
            os.fsync(f.fileno())
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"checkpoint metadata: {type(o).__name__} is not JSON-serialisable")


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``root/latest`` points to, or None when the run has no checkpoint."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").exists() or not (path / "tensors.safetensors").exists():
        raise FileNotFoundError(f"{pointer} points to {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | os.PathLike) -> TrainState:
    """Read a checkpoint folder (or a run folder, via its ``latest`` pointer)."""
    from safetensors.torch import load_file

    path = Path(path)
    if (path / LATEST).exists():
        found = latest_checkpoint(path)
        assert found is not None
        path = found
    meta_file, tensor_file = path / "meta.json", path / "tensors.safetensors"
    for f in (meta_file, tensor_file):
        if not f.exists():
            raise FileNotFoundError(f"checkpoint file {f} is missing")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint file {meta_file} is not valid JSON: {exc}") from exc
    tensors = load_file(str(tensor_file))
    groups: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}, "extra": {}, "optim": {}, "rng": {}}
    for k, v in tensors.items():
        prefix, rest = k.split("/", 1)
        if prefix == "optim":
            groups["optim"][k] = v
        else:
            groups[prefix][rest] = v
    rng: dict[str, Any] = dict(meta.get("rng", {}))
    cuda = [groups["rng"].pop(f"cuda/{i}") for i in range(sum(k.startswith("cuda/") for k in groups["rng"]))]
    rng.update(groups["rng"])
    if cuda:
        rng["cuda"] = cuda
    return TrainState(
        step=int(meta["step"]),
        student=groups["student"],
        teacher=groups["teacher"],
        optimizer=_unflatten_optimizer(groups["optim"], meta.get("optimizer", {})),
        rng=rng,
        extra=meta.get("extra", {}),
        extra_tensors=groups["extra"],
    )
