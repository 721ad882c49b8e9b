"""Crash-safe, verifiable, exactly-resumable training checkpoints (safetensors + JSON, no pickle).

A run's checkpoint root holds one folder per saved step and a pointer::

    root/
      step_00000004/            a complete checkpoint
        tensors.safetensors     student/, teacher/, optim/, rng/, extra/ tensors
        meta.json               step, optimizer param groups, numpy/python RNG, user metadata
        manifest.json           written LAST: size and sha256 of every other file
      step_00000006/
      latest                    one line, the newest folder's name (a hint for people)

**Complete** means: ``manifest.json`` exists, parses, and every file it lists has the
recorded size and sha256. Only complete folders are ever resumed from, so a torn write, a
truncated file or flipped bytes are detected on load, never trained on.

**Save protocol** (every step is safe to be killed at; see :func:`commit_checkpoint`)::

    1  write every file into root/.step_N.tmp/, fsync each
    2  write manifest.json (sizes + sha256) into it, fsync, fsync the folder
    3  if step_N exists (re-save): rename it to .step_N.old            (atomic)
    4  rename .step_N.tmp -> step_N                                   (atomic)
    5  delete .step_N.old
    6  write .latest.tmp, fsync, rename -> latest                     (atomic)
    7  prune: rename old/superseded folders to .step_K.del, then delete them

A kill at any point leaves either the previous complete checkpoints or the new one (or
both) findable: :func:`find_checkpoint` does not trust ``latest`` — it returns the newest
*complete* folder (``step_*``, or an ``.old`` copy a kill left between 3 and 4) and says
why it skipped anything newer (missing, dangling, empty or stale pointer; a corrupt or
incomplete folder). If folders exist but none is complete it raises
:class:`CheckpointError` instead of returning None, so a run never silently restarts from
step 0 over its own history. :func:`clean_stale` removes the temporary folders kills leave
behind (and restores an ``.old`` copy whose replacement never arrived).

Filesystem writes, renames and deletes go through the small ``_write_bytes``, ``_rename``
and ``_remove_tree`` functions so tests can inject a crash at each of them in turn.
One writer per root at a time.

**Interrupts**: :func:`stop_on_interrupt` turns the first Ctrl-C into a request to stop after
the current step, so a training loop can save a checkpoint there and a later run resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TrainState",
    "CheckpointError",
    "CheckpointFallbackWarning",
    "CheckpointSearch",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "find_checkpoint",
    "begin_checkpoint",
    "commit_checkpoint",
    "verify_checkpoint",
    "clean_stale",
    "checkpoint_name",
    "rng_state",
    "set_rng_state",
    "pack_rng",
    "unpack_rng",
    "stop_on_interrupt",
]

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = 2
_STEP_RE = re.compile(r"^step_(\d{8})$")
_ASIDE_RE = re.compile(r"^\.step_(\d{8})\.old$")
_TEMP_RE = re.compile(r"^\.(step_\d{8}\.(tmp|del)|step_\d{8}\.tmp-.*|latest\.tmp)$")
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt; the message names the file."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint folder (or the ``latest`` pointer) was unusable; an older complete one was used."""


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


@dataclass(frozen=True)
class CheckpointSearch:
    """Result of :func:`find_checkpoint`.

    Attributes:
        path: the newest complete checkpoint folder, or None when the root holds none at all.
        step: its step (-1 when ``path`` is None).
        notes: one line per thing that was skipped or repaired on the way (empty when the
            ``latest`` pointer named the newest folder and it was complete).
    """

    path: Path | None
    step: int
    notes: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- RNG state
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


def pack_rng(rng: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a :func:`rng_state` snapshot into tensors (``rng/...``, for safetensors) and JSON values."""
    return _split_rng(rng)


def unpack_rng(tensors: dict[str, Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`pack_rng` (``tensors`` keys with or without the ``rng/`` prefix)."""
    t = {k.split("/", 1)[1] if k.startswith("rng/") else k: v for k, v in tensors.items()}
    rng: dict[str, Any] = dict(plain)
    cuda = [t.pop(f"cuda/{i}") for i in range(sum(k.startswith("cuda/") for k in t))]
    rng.update(t)
    if cuda:
        rng["cuda"] = cuda
    return rng


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


# ----------------------------------------------------------------------------- filesystem primitives
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


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the only way this module writes a file)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _rename(src: Path, dst: Path) -> None:
    """Atomic rename (``os.replace``); the only way this module moves a file or folder."""
    os.replace(src, dst)


def _remove_tree(path: Path) -> None:
    """Delete a folder (or file); the only way this module deletes anything."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_name(step: int) -> str:
    """The folder name of step ``step``: ``step_XXXXXXXX``."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step_{step:08d}"


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


# ----------------------------------------------------------------------------- verification
def verify_checkpoint(folder: str | os.PathLike) -> int:
    """Check that ``folder`` is a complete checkpoint; returns its step.

    Raises:
        CheckpointError: no manifest (an interrupted save, or not a checkpoint), an
            unreadable manifest, or a listed file that is missing or whose size or sha256
            differs (names the file).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    mfile = folder / MANIFEST
    if not mfile.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save was interrupted, or this is not a checkpoint)")
    try:
        manifest = json.loads(mfile.read_bytes().decode("utf-8"))
        files = manifest["files"]
        step = int(manifest["step"])
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mfile}: unreadable manifest ({exc})") from None
    for rel, want in files.items():
        f = folder / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(f"{f}: {size} bytes, the manifest records {want.get('bytes')} (truncated or replaced)")
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{f}: sha256 mismatch with {MANIFEST} (corrupted bytes)")
    return step


def _step_of(name: str) -> int | None:
    m = _STEP_RE.match(name) or _ASIDE_RE.match(name)
    return int(m.group(1)) if m else None


def _read_pointer(root: Path) -> tuple[str | None, str | None]:
    """(name in ``latest`` or None, a note when the pointer is missing/unreadable/empty)."""
    pointer = root / LATEST
    if not pointer.exists():
        return None, f"{pointer}: missing"
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{pointer}: unreadable ({exc})"
    if not name:
        return None, f"{pointer}: empty"
    if not _STEP_RE.match(name):
        return None, f"{pointer}: names {name[:40]!r}, not a checkpoint folder"
    return name, None


def find_checkpoint(root: str | os.PathLike) -> CheckpointSearch:
    """The newest complete checkpoint under ``root`` (see the module doc), verified.

    Candidates are the ``step_*`` folders (and ``.step_*.old`` copies a kill left behind),
    newest first; the first that verifies is returned. Notes say what was skipped and why,
    and when ``latest`` was missing, dangling, empty or not the newest complete folder.

    Raises:
        CheckpointError: ``root`` holds checkpoint folders or a pointer, but no complete
            checkpoint (the message lists each folder's problem).
    """
    root = Path(root)
    if not root.is_dir():
        return CheckpointSearch(None, -1)
    cands = []
    for p in root.iterdir():
        s = _step_of(p.name)
        if s is not None and p.is_dir():
            cands.append((s, 0 if p.name.startswith("step_") else 1, p))
    cands.sort(key=lambda c: (-c[0], c[1]))
    pointer_name, pointer_note = _read_pointer(root)
    if not cands:
        if (root / LATEST).exists():
            raise CheckpointError(f"{root}: `latest` exists but there is no checkpoint folder "
                                  f"({pointer_note or 'it names ' + repr(pointer_name)})")
        return CheckpointSearch(None, -1)
    notes: list[str] = []
    problems: list[str] = []
    for step, _, path in cands:
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if pointer_note is not None:
            notes.append(f"{pointer_note}; using the newest complete checkpoint {path.name}")
        elif pointer_name != path.name:
            named = root / pointer_name
            why = "missing" if not named.exists() else ("older" if (_step_of(pointer_name) or 0) < step else "incomplete or corrupt")
            notes.append(f"{root / LATEST} names {pointer_name} ({why}); using the newest complete checkpoint {path.name}")
        if path.name.startswith("."):
            notes.append(f"{path.name} is the copy a re-save of step {step} set aside before it was interrupted")
        notes = [f"skipped {p}" for p in problems] + notes
        return CheckpointSearch(path, step, tuple(notes))
    raise CheckpointError(f"{root}: no complete checkpoint; " + "; ".join(problems))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None when there is none at all.

    Anything skipped on the way is reported as a :class:`CheckpointFallbackWarning`.

    Raises:
        CheckpointError: checkpoint folders exist but none is complete.
    """
    found = find_checkpoint(root)
    for note in found.notes:
        warnings.warn(note, CheckpointFallbackWarning, stacklevel=2)
    return found.path


# ----------------------------------------------------------------------------- writing
def clean_stale(root: str | os.PathLike) -> list[str]:
    """Remove what interrupted saves left in ``root``; returns one line per action.

    ``.step_N.tmp`` folders, ``.step_N.del`` folders and ``.latest.tmp`` are deleted. A
    ``.step_N.old`` copy (a re-save interrupted between its two renames) is deleted when
    ``step_N`` is complete, and otherwise renamed back to ``step_N``.
    """
    root = Path(root)
    done: list[str] = []
    if not root.is_dir():
        return done
    for p in sorted(root.iterdir()):
        if _TEMP_RE.match(p.name):
            _remove_tree(p)
            done.append(f"removed {p.name}")
        elif _ASIDE_RE.match(p.name):
            final = root / p.name[1:-len(".old")]
            try:
                verify_checkpoint(final)
                final_ok = True
            except CheckpointError:
                final_ok = False
            if final_ok:
                _remove_tree(p)
                done.append(f"removed {p.name} ({final.name} is complete)")
            else:
                if final.exists():
                    trash = root / f".{final.name}.del"
                    _rename(final, trash)
                    _remove_tree(trash)
                _rename(p, final)
                done.append(f"restored {final.name} from {p.name}")
    if done:
        _fsync_dir(root)
    return done


def begin_checkpoint(root: str | os.PathLike, step: int) -> Path:
    """Create (empty) the temporary folder ``root/.step_N.tmp`` a save of ``step`` writes into.

    Leftovers of earlier interrupted saves are cleaned first (:func:`clean_stale`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    clean_stale(root)
    tmp = root / f".{checkpoint_name(step)}.tmp"
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | os.PathLike, tmp: str | os.PathLike, step: int, keep: int = 2) -> Path:
    """Seal ``tmp`` with a manifest and move it into place as ``root/step_N`` (steps 1b–7 above).

    Every file under ``tmp`` is fsynced and listed in ``manifest.json`` (size, sha256),
    which is written last. Then the atomic renames, the ``latest`` pointer, and pruning:
    the ``keep`` newest checkpoints with step <= ``step`` stay; older ones, and newer ones
    (superseded: a run that resumed from an older checkpoint), are deleted.

    Returns:
        The checkpoint folder ``root/step_N``.
    """
    root, tmp = Path(root), Path(tmp)
    name = checkpoint_name(step)
    files = {}
    for f in _files_under(tmp):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    if not files:
        raise CheckpointError(f"{tmp}: nothing to commit (no files written)")
    manifest = {"format": FORMAT, "step": step, "files": files}
    _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(tmp)
    final = root / name
    aside = root / f".{name}.old"
    if final.exists():
        if aside.exists():
            _remove_tree(aside)
        _rename(final, aside)
    _rename(tmp, final)
    _fsync_dir(root)
    if aside.exists():
        _remove_tree(aside)
    pointer_tmp = root / f".{LATEST}.tmp"
    _write_bytes(pointer_tmp, (name + "\n").encode())
    _rename(pointer_tmp, root / LATEST)
    _fsync_dir(root)
    steps = sorted((s, p) for p in root.iterdir() if p.is_dir() and (s := _step_of(p.name)) is not None
                   and p.name.startswith("step_"))
    older = [p for s, p in steps if s < step]
    doomed = older[: max(0, len(older) - max(0, keep - 1))] if keep > 0 else older
    doomed += [p for s, p in steps if s > step]
    for p in doomed:
        trash = root / f".{p.name}.del"
        _rename(p, trash)
        _remove_tree(trash)
    return final


def save_checkpoint(root: str | os.PathLike, state: TrainState, keep: int = 2) -> Path:
    """Write ``state`` crash-safely to ``root/step_XXXXXXXX`` and point ``root/latest`` at it.

    Args:
        root: the run's checkpoint folder (created if needed).
        state: what to save.
        keep: how many most recent checkpoints to keep (older ones are deleted after the
            new one is in place; at least the new one is always kept).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save as safetensors_bytes

    root = Path(root)
    opt_tensors, opt_meta = _flatten_optimizer(state.optimizer)
    rng_tensors, rng_plain = _split_rng(state.rng)
    tensors: dict[str, Tensor] = {}
    for prefix, d in (("student", state.student), ("teacher", state.teacher), ("extra", state.extra_tensors)):
        for k, v in d.items():
            tensors[f"{prefix}/{k}"] = v
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": state.step, "optimizer": opt_meta, "rng": rng_plain, "extra": state.extra, "format": FORMAT}
    meta_bytes = json.dumps(meta, indent=1, default=_json_default).encode()  # fails before anything is written

    tmp = begin_checkpoint(root, state.step)
    try:
        _write_bytes(tmp / "tensors.safetensors", safetensors_bytes(tensors))
        _write_bytes(tmp / "meta.json", meta_bytes)
    except BaseException:
        _remove_tree(tmp)
        raise
    return commit_checkpoint(root, tmp, state.step, keep)


# ----------------------------------------------------------------------------- reading
def _resolve(path: Path, notes: Callable[[str], None]) -> tuple[Path, bool]:
    """(checkpoint folder, already verified): ``path`` itself, or the newest complete one of a root."""
    if (path / MANIFEST).exists() or _step_of(path.name) is not None:
        return path, False
    found = find_checkpoint(path)
    for n in found.notes:
        notes(n)
    if found.path is None:
        raise CheckpointError(f"{path}: no checkpoint (neither a checkpoint folder nor a root holding one)")
    return found.path, True


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> TrainState:
    """Read a checkpoint folder, or the newest complete checkpoint of a run root.

    Args:
        path: a ``step_*`` folder, or a root (see :func:`find_checkpoint`; skipped folders
            are reported as :class:`CheckpointFallbackWarning`).
        verify: check sizes and sha256 against the manifest first (a root is always verified).

    Raises:
        CheckpointError: missing, incomplete or corrupt checkpoint (names the file).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, verified = _resolve(Path(path), lambda n: warnings.warn(n, CheckpointFallbackWarning, stacklevel=3))
    if verify and not verified:
        verify_checkpoint(path)
    meta_file, tensor_file = path / "meta.json", path / "tensors.safetensors"
    for f in (meta_file, tensor_file):
        if not f.exists():
            raise CheckpointError(f"checkpoint file {f} is missing")
    try:
        meta = json.loads(meta_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {meta_file} is not valid JSON: {exc}") from None
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {tensor_file} is unreadable: {exc}") from None
    groups: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}, "extra": {}, "optim": {}, "rng": {}}
    for k, v in tensors.items():
        prefix, rest = k.split("/", 1)
        if prefix == "optim":
            groups["optim"][k] = v
        else:
            groups[prefix][rest] = v
    rng = unpack_rng(groups["rng"], meta.get("rng", {}))
    return TrainState(
        step=int(meta["step"]),
        student=groups["student"],
        teacher=groups["teacher"],
        optimizer=_unflatten_optimizer(groups["optim"], meta.get("optimizer", {})),
        rng=rng,
        extra=meta.get("extra", {}),
        extra_tensors=groups["extra"],
    )


@contextlib.contextmanager
def stop_on_interrupt(say: Callable[[str], None]) -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a request to stop after the current step (a second one aborts).

    Inside the block, the first SIGINT sets ``flag["stop"] = True`` and calls ``say`` with a
    one-line notice; the loop is expected to finish its step, save a checkpoint and return.
    A second SIGINT raises :class:`KeyboardInterrupt` at once. The previous handler is restored
    on exit. Outside the main thread (where signal handlers cannot be installed) Ctrl-C keeps
    its default behaviour and the flag stays False.

    Args:
        say: where the notice goes (``print``, a logger's method, ``accelerator.print``).

    Yields:
        The flag dict ``{"stop": bool}``, read by the loop after every step.
    """
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        say("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to abort at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
