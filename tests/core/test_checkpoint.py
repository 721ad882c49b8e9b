"""Checkpoints: atomic writes, exact resume, clear errors on damaged folders."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

import dopsd_ref
from dopsd_ref import MicroBatch, StepConfig, dopsd_train_step, make_teacher
from dopsd_ref.checkpoint import TrainState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state


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

    def dying_save(tensors, filename, *a, **k):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, TrainState(2, {"w": torch.zeros(3)}, {}, {"state": {}, "param_groups": []}))
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    assert torch.equal(load_checkpoint(tmp_path).student["w"], torch.ones(3))
    assert not (tmp_path / "step_00000002").exists()


def test_rng_round_trip():
    """rng_state/set_rng_state restore python, numpy, torch and named generators exactly."""
    g = torch.Generator().manual_seed(5)
    snap = rng_state({"g": g})
    a = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    set_rng_state(snap, {"g": g})
    b = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    assert a == b


def test_keep_and_damaged_checkpoints(tmp_path):
    """Only the newest `keep` checkpoints remain; a damaged meta.json or a dangling `latest`
    raises an error naming the file."""
    for s in range(1, 5):
        save_checkpoint(tmp_path, TrainState(s, {"w": torch.full((2,), float(s))}, {}, {"state": {}, "param_groups": []}), keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000004"]
    (tmp_path / "step_00000004" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(FileNotFoundError, match="step_00000009"):
        latest_checkpoint(tmp_path)
    assert json.loads((tmp_path / "step_00000003" / "meta.json").read_text())["step"] == 3
