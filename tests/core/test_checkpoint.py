"""Checkpoints: atomic writes, exact resume, clear errors on damaged folders."""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dopsd_ref
from dopsd_ref import MicroBatch, StepConfig, dopsd_train_step, make_teacher
from dopsd_ref import checkpoint as ck
from dopsd_ref.checkpoint import (CheckpointError, CheckpointFallbackWarning, TrainState, clean_stale, find_checkpoint,
                                  latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4))


def _run(steps, ckpt_dir=None, resume=False, save_every=2):
    """A tiny D-OPSD run whose randomness comes from global and named RNGs."""
    model = _model()
    teacher = make_teacher(model, "ema", 0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(1)
    start = 0
    if resume:
        st = load_checkpoint(ckpt_dir)
        model.load_state_dict(st.student)
        teacher.load_state_dict(st.teacher)
        opt.load_state_dict(st.optimizer)
        set_rng_state(st.rng, {"data": gen})
        start = st.step
    net = lambda x, s, c: model(torch.cat([x, s[:, None]], 1)) + c  # noqa: E731
    tnet = lambda x, s, c: teacher.module(torch.cat([x, s[:, None]], 1)) + c  # noqa: E731
    for step in range(start, steps):
        mb = MicroBatch(torch.randn(8, 4, generator=gen), torch.zeros(8, 4), torch.randn(8, 4) * 0.1)
        dopsd_train_step(net, tnet, [mb], dopsd_ref.uniform_sigmas(3), opt, model.parameters(), StepConfig(),
                         after_step=lambda: teacher.update(model), step=step)
        if ckpt_dir is not None and (step + 1) % save_every == 0:
            save_checkpoint(ckpt_dir, TrainState(step + 1, model.state_dict(), teacher.state_dict(), opt.state_dict(),
                                                 rng_state({"data": gen}), extra={"note": "test"}))
    return model, teacher


def test_resume_equals_uninterrupted(tmp_path):
    """Stopping after a checkpoint and resuming gives bit-identical student and teacher
    weights to the uninterrupted run (CPU)."""
    full, full_t = _run(6)
    _run(4, tmp_path)  # "killed" after step 4 (checkpoint at 4)
    resumed, resumed_t = _run(6, tmp_path, resume=True)
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full_t.module.parameters(), resumed_t.module.parameters()):
        assert torch.equal(a, b)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A write that dies mid-way leaves `latest` pointing at the previous, loadable checkpoint
    and no half-written folder under a checkpoint name."""
    import safetensors.torch as st

    state = TrainState(1, {"w": torch.ones(3)}, {}, {"state": {}, "param_groups": []})
    save_checkpoint(tmp_path, state)

    def dying_save(tensors, *a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(st, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainState(2, {"w": torch.zeros(3)}, {}, {"state": {}, "param_groups": []}))
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert torch.equal(load_checkpoint(tmp_path).student["w"], torch.ones(3))
    assert not (tmp_path / "step_00000002").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]


def test_rng_round_trip():
    """rng_state/set_rng_state restore python, numpy, torch and named generators exactly."""
    g = torch.Generator().manual_seed(5)
    snap = rng_state({"g": g})
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    set_rng_state(snap, {"g": g})
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b


def _st(step, value=None):
    v = float(step) if value is None else value
    return TrainState(step, {"w": torch.full((2,), v)}, {"t": torch.full((3,), -v)}, {"state": {}, "param_groups": []},
                      extra={"step": step})


def test_keep_and_damaged_checkpoints(tmp_path):
    """Only the newest `keep` checkpoints remain. A damaged meta.json is an error naming the
    file when that folder is loaded directly; loading the run falls back to the newest
    complete checkpoint with a warning naming what it skipped; a dangling `latest` too."""
    for s in range(1, 5):
        save_checkpoint(tmp_path, _st(s), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    (tmp_path / "step_00000004" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json"):
        load_checkpoint(tmp_path / "step_00000004")
    with pytest.warns(CheckpointFallbackWarning) as rec:
        assert load_checkpoint(tmp_path).step == 3
    assert any(re.search("step_00000004.*meta.json", str(w.message)) for w in rec)
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.warns(CheckpointFallbackWarning) as rec:
        assert latest_checkpoint(tmp_path).name == "step_00000003"
    assert any("step_00000009 (missing)" in str(w.message) for w in rec)
    assert json.loads((tmp_path / "step_00000003" / "meta.json").read_text())["step"] == 3


@pytest.mark.parametrize("damage, match", [
    (lambda f: f.write_bytes(f.read_bytes()[:-7]), "bytes, the manifest records"),
    (lambda f: f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1])), "sha256 mismatch"),
    (lambda f: f.unlink(), "listed in manifest.json but missing"),
])
def test_checksum_detects_corrupt_tensor_bytes(tmp_path, damage, match):
    """Every checkpoint records the size and sha256 of its files in a manifest written last:
    a truncated, bit-flipped or missing tensor file is refused on load (naming the file),
    and the run falls back to the previous complete checkpoint."""
    save_checkpoint(tmp_path, _st(1))
    save_checkpoint(tmp_path, _st(2))
    damage(tmp_path / "step_00000002" / "tensors.safetensors")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "step_00000002")
    with pytest.warns(CheckpointFallbackWarning) as rec:
        st = load_checkpoint(tmp_path)
    assert any(re.search("skipped.*tensors.safetensors", str(w.message)) for w in rec)
    assert st.step == 1 and torch.equal(st.student["w"], torch.full((2,), 1.0))


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """When checkpoint folders exist but none is complete, the search raises (listing each
    folder's problem) instead of reporting "no checkpoint", which would restart at step 0
    and overwrite the run; an empty root is a fresh run (None)."""
    assert find_checkpoint(tmp_path).path is None and latest_checkpoint(tmp_path / "absent") is None
    save_checkpoint(tmp_path, _st(1))
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint.*step_00000001.*no manifest"):
        find_checkpoint(tmp_path)
    shutil.rmtree(tmp_path / "step_00000001")
    with pytest.raises(CheckpointError, match="`latest` exists"):
        find_checkpoint(tmp_path)


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no ``except Exception`` swallows it."""


class FaultInjector:
    """Counts the checkpoint module's filesystem operations and dies at number ``at``.

    At the fatal operation a write leaves a torn file (its first half), a delete removes a
    part of the folder, a rename does nothing. Afterwards every operation raises, as in a
    killed process: no cleanup handler gets to run.
    """

    def __init__(self, monkeypatch, at: int | None = None):
        self.at, self.ops, self.dead = at, [], False
        real_write, real_rename, real_remove = ck._write_bytes, ck._rename, ck._remove_tree

        def write(path, data):
            self._tick("write", path, lambda: real_write(path, data[: len(data) // 2]))
            real_write(path, data)

        def rename(src, dst):
            self._tick("rename", src, lambda: None)
            real_rename(src, dst)

        def remove(path):
            def partial():
                files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else []
                if files:
                    files[0].unlink()
            self._tick("delete", path, partial)
            real_remove(path)

        monkeypatch.setattr(ck, "_write_bytes", write)
        monkeypatch.setattr(ck, "_rename", rename)
        monkeypatch.setattr(ck, "_remove_tree", remove)

    def _tick(self, kind, path, partial):
        if self.dead:
            raise Killed("already dead")
        if len(self.ops) == self.at:
            self.dead = True
            partial()
            raise Killed(f"killed at {kind} {Path(path).name}")
        self.ops.append((kind, Path(path).name))


# (name, steps saved before, step of the save that gets killed, keep)
SCENARIOS = [("first save", [], 2, 2), ("new step + prune", [2, 4], 6, 2), ("re-save same step", [2, 4], 4, 2),
             ("stale temp + newer", [2], 4, 1)]


def _complete_steps(root):
    out = {}
    for p in root.iterdir():
        if re.match(r"^\.?step_\d{8}(\.old)?$", p.name):
            try:
                out.setdefault(ck.verify_checkpoint(p), p)
            except CheckpointError:
                pass
    return out


def test_kill_at_every_filesystem_operation_of_a_save(tmp_path, monkeypatch):
    """Fault injection, as a loop: for each scenario (first save, new step with pruning,
    re-save of an existing step, a leftover temp folder) a save is killed at every write,
    rename and delete it performs, in turn. After each kill:

    * a complete checkpoint is found unless none ever existed, it is the newest complete
      folder on disk, it is never older than the newest checkpoint before the save, and its
      tensors are exactly the old or the new state of its step;
    * ``clean_stale`` leaves no temporary folder and no incomplete ``step_*`` folder, and
      changes nothing that is found;
    * the next save succeeds and becomes the checkpoint that is found.
    """
    monkeypatch.setattr(ck.os, "fsync", lambda fd: None)  # durability is not what a simulated kill tests; speed
    kinds = set()
    for name, before, step, keep in SCENARIOS:
        # a clean run first, to count the operations of this save
        probe_root = tmp_path / f"{name}-probe"
        for s in before:
            save_checkpoint(probe_root, _st(s), keep=keep)
        with monkeypatch.context() as m:
            counter = FaultInjector(m)
            save_checkpoint(probe_root, _st(step, 100.0 + step), keep=keep)
        n_ops = len(counter.ops)
        kinds |= {k for k, _ in counter.ops}
        for at in range(n_ops):
            root = tmp_path / f"{name}-{at}"
            for s in before:
                save_checkpoint(root, _st(s), keep=keep)
            if name.startswith("stale"):
                (root / ".step_00000004.tmp").mkdir()
                (root / ".step_00000004.tmp" / "tensors.safetensors").write_bytes(b"torn")
            prev = max(before, default=None)
            with monkeypatch.context() as m:
                FaultInjector(m, at=at)
                with pytest.raises(Killed):
                    save_checkpoint(root, _st(step, 100.0 + step), keep=keep)
            where = f"{name}: killed at op {at} {counter.ops[at]}"
            complete = _complete_steps(root)
            if prev is None and not complete:
                assert find_checkpoint(root).path is None, where
            else:
                found = find_checkpoint(root)
                assert found.step == max(complete), where
                assert prev is None or found.step >= prev, where
                got = load_checkpoint(found.path).student["w"]
                options = [torch.full((2,), float(found.step))] + ([torch.full((2,), 100.0 + step)] if found.step == step else [])
                assert any(torch.equal(got, o) for o in options), where
            before_clean = find_checkpoint(root).step
            clean_stale(root)
            left = [p.name for p in root.iterdir() if p.name.startswith(".")]
            assert not left, f"{where}: left {left}"
            incomplete = [p.name for p in root.glob("step_*") if p not in _complete_steps(root).values()]
            assert not incomplete, f"{where}: incomplete checkpoint folders left: {incomplete}"
            assert find_checkpoint(root).step == before_clean, where
            save_checkpoint(root, _st(step + 1), keep=keep)
            found = find_checkpoint(root)
            assert found.step == step + 1 and not found.notes, where
    assert kinds == {"write", "rename", "delete"}, kinds


def test_killed_pointer_write_keeps_a_checkpoint_findable(tmp_path, monkeypatch):
    """`latest` is only a hint: if its write is killed mid-way (torn temp file, or a torn
    `latest` written in place), or it is empty, dangling or missing, the previous checkpoint
    is still on disk and a complete checkpoint is found, with a note naming the pointer."""
    save_checkpoint(tmp_path, _st(1))
    with monkeypatch.context() as m:
        inj = FaultInjector(m)
        save_checkpoint(tmp_path / "probe", _st(1))
    pointer_write = [i for i, (k, n) in enumerate(inj.ops) if k == "write" and "latest" in n]
    assert pointer_write, inj.ops
    with monkeypatch.context() as m:
        FaultInjector(m, at=pointer_write[0])
        with pytest.raises(Killed):
            save_checkpoint(tmp_path, _st(2))
    assert (tmp_path / "latest").read_text() == "step_00000001\n"  # the old pointer survives the torn temp
    assert load_checkpoint(tmp_path / "step_00000001").step == 1  # the previous checkpoint is still there
    found = find_checkpoint(tmp_path)
    assert found.step == 2 and any("older" in n for n in found.notes)
    for torn in ("step_0000", "", "\xff", "step_00000007"):
        (tmp_path / "latest").write_text(torn)
        found = find_checkpoint(tmp_path)
        assert found.step == 2 and any("latest" in n for n in found.notes), torn
    (tmp_path / "latest").unlink()
    assert find_checkpoint(tmp_path).step == 2
