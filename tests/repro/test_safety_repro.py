"""Data safety of ``paper_repro.train``: crash-safe checkpoints, resume rules, errors as messages.

Tiny real-architecture components on CPU (see helpers.py). The checkpoint protocol is the one of
``dopsd_ref.checkpoint`` (its own fault-injection loop is in tests/core/test_checkpoint.py);
here a loop kills the training script's own save at every write, rename and delete, and a
kill inside ``accelerator.save_state`` is added.
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
from pathlib import Path

import pytest
import torch

from dopsd_ref import NonFiniteLossError
from dopsd_ref import checkpoint as ck
from dopsd_ref.lora import STUDENT, TEACHER, lora_parameters
from .helpers import make_folder, tiny_config

CFG = Path(__file__).resolve().parents[2] / "paper_repro" / "configs" / "tiny_zimage.yaml"


class Killed(BaseException):
    pass


def _adapters(tr):
    return {a: {k: v.detach().clone() for k, v in lora_parameters(tr.unwrapped, a).items()} for a in (STUDENT, TEACHER)}


def _equal(a, b):
    return all(a[r].keys() == b[r].keys() and all(torch.equal(a[r][k], b[r][k]) for k in a[r]) for r in a)


def _kill_at(monkeypatch, at):
    """Make the checkpoint module's `at`-th filesystem operation (and every later one) raise Killed."""
    ops = []
    real = {n: getattr(ck, n) for n in ("_write_bytes", "_rename", "_remove_tree")}

    def wrap(name):
        def op(*a):
            if at is not None and len(ops) >= at:
                raise Killed(name)
            ops.append((name, Path(a[0]).name))
            return real[name](*a)
        return op

    for n in real:
        monkeypatch.setattr(ck, n, wrap(n))
    return ops


def test_kill_at_every_operation_of_a_trainer_save(tmp_path, monkeypatch):
    """The training script's save (accelerate's save_state into the temp folder, then the
    manifest, renames, pointer and pruning) is killed at each filesystem operation in turn,
    and once inside save_state. Every time, the newest complete checkpoint is found (the
    step-1 or the step-2 one, never none), it loads into a fresh trainer with the exact
    tensors of that step, and cleaning leaves no temporary folder."""
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    tr = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "base", keep_checkpoints=1))
    tr.train_step()
    tr.save_checkpoint()
    at_step = {1: _adapters(tr)}
    base = tmp_path / "base" / "checkpoints"
    tr.train_step()
    at_step[2] = _adapters(tr)
    with monkeypatch.context() as m:
        tr.out = tmp_path / "probe"
        shutil.copytree(base, tr.checkpoint_root)
        ops = _kill_at(m, None)
        tr.save_checkpoint()
    assert {n for n, _ in ops} == {"_write_bytes", "_rename", "_remove_tree"}, ops
    fresh = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "fresh", keep_checkpoints=1))
    for at in [*range(len(ops)), "save_state"]:
        tr.out = tmp_path / f"kill-{at}"
        shutil.copytree(base, tr.checkpoint_root)
        with monkeypatch.context() as m:
            if at == "save_state":
                real_save = tr.acc.save_state

                def dying_save_state(out, real_save=real_save):
                    real_save(out)
                    (Path(out) / "adapters.safetensors").write_bytes(b"torn")
                    raise Killed("inside save_state")

                m.setattr(tr.acc, "save_state", dying_save_state)
            else:
                _kill_at(m, at)
            with pytest.raises(Killed):
                tr.save_checkpoint()
        where = f"killed at {at} ({ops[at] if at != 'save_state' else at})"
        found = ck.find_checkpoint(tr.checkpoint_root)
        assert found.step in (1, 2), where
        fresh.out = tr.out
        assert fresh.load_checkpoint(found.path) and fresh.step == found.step, where
        assert _equal(_adapters(fresh), at_step[found.step]), where
        ck.clean_stale(tr.checkpoint_root)
        assert not [p.name for p in tr.checkpoint_root.iterdir() if p.name.startswith(".")], where
        assert ck.find_checkpoint(tr.checkpoint_root).step == found.step, where


def test_killed_save_then_cli_resume_is_bit_exact(tmp_path, monkeypatch, capsys):
    """A CLI run killed while renaming its step-2 checkpoint into place resumes (default
    resume) from the newest complete checkpoint and ends bit-identical to a straight run;
    it says where it resumed."""
    from accelerate.state import AcceleratorState

    from paper_repro.train import main

    data = make_folder(tmp_path / "data")
    common = ["--config", str(CFG), "--set", f"data.root={data}", "--set", "train.gradient_checkpointing=false",
              "--set", "train.steps=3"]
    straight = main(common + ["--set", f"output_dir={tmp_path / 'a'}"])
    AcceleratorState._reset_state(reset_partial_state=True)
    real_commit = ck.commit_checkpoint

    def commit(root, tmp, step, keep=2):
        if step == 2:
            real_rename = ck._rename

            def die_on_final(src, dst):
                if Path(dst).name == "step_00000002":
                    raise Killed("rename into place")
                real_rename(src, dst)

            monkeypatch.setattr(ck, "_rename", die_on_final)
        return real_commit(root, tmp, step, keep)

    monkeypatch.setattr(ck, "commit_checkpoint", commit)
    import paper_repro.train as T

    monkeypatch.setattr(T, "commit_checkpoint", commit)
    with pytest.raises(Killed):
        main(common + ["--set", f"output_dir={tmp_path / 'b'}"])
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    capsys.readouterr()
    resumed = main(common + ["--set", f"output_dir={tmp_path / 'b'}"])
    assert "resumed at step 1" in capsys.readouterr().out
    assert resumed.step == 3 and _equal(_adapters(straight), _adapters(resumed))


def test_corrupt_checkpoint_falls_back_then_refuses(tmp_path, capsys):
    """Flipped bytes in the newest checkpoint's adapter tensors are detected by the sha256
    manifest and the previous checkpoint is used (with a note); when no checkpoint is intact
    the CLI refuses with a one-line error instead of restarting at step 0."""
    from paper_repro.train import DOPSDTrainer, cli

    data = make_folder(tmp_path / "data")
    a = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run"))
    a.train_step()
    a.save_checkpoint()
    one = _adapters(a)
    a.train_step()
    a.save_checkpoint()
    f = a.checkpoint_root / "step_00000002" / "adapters.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x40
    f.write_bytes(bytes(raw))
    b = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run"))
    capsys.readouterr()
    assert b.load_checkpoint() and b.step == 1 and _equal(_adapters(b), one)
    assert "sha256 mismatch" in capsys.readouterr().out
    for p in a.checkpoint_root.glob("step_*"):
        (p / "state.json").write_text("{}")
    rc = cli(["--config", str(CFG), "--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("change, field", [({"batch_size": 2}, "train.batch_size"), ({"seed": 1}, "train.seed"),
                                           ({"space": "velocity"}, "train.space"), ("lora", "lora.rank"),
                                           ("data", "data.caption_prefix")])
def test_resume_refuses_changed_run_fields(tmp_path, change, field):
    """Resuming with another batch, seed, loss space, adapter shape or data is refused with a
    message naming the field and both values."""
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    a = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run"))
    a.train_step()
    a.save_checkpoint()
    cfg = tiny_config("zimage", data, tmp_path / "run", **(change if isinstance(change, dict) else {}))
    if change == "lora":
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=2))
    if change == "data":
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, caption_prefix="[V]"))
    b = DOPSDTrainer(cfg)
    with pytest.raises(ValueError, match=rf"cannot resume with a changed {field}: "):
        b.load_checkpoint()
    assert b.step == 0


def test_resume_applies_new_lr_and_says_so(tmp_path, capsys):
    """A resume with a smaller lr (and a weight decay) writes them into the optimizer and prints
    the change; the next step then moves the student less than with the old lr."""
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    a = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run"))
    a.train_step()
    a.save_checkpoint()
    capsys.readouterr()
    b = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run", lr=1e-4, weight_decay=0.01))
    assert b.load_checkpoint()
    out = capsys.readouterr().out
    assert "applied train.lr 0.01 -> 0.0001, train.weight_decay 0.0 -> 0.01" in out
    assert all(g["lr"] == 1e-4 and g["weight_decay"] == 0.01 for g in b.optimizer.param_groups)


def test_no_resume_over_a_run_needs_overwrite(tmp_path, capsys):
    """--no-resume into an output_dir that holds a run is refused (files untouched) unless
    --overwrite, which replaces the run."""
    from accelerate.state import AcceleratorState

    from paper_repro.train import cli

    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--config", str(CFG), "--set", f"data.root={data}", "--set", f"output_dir={out}",
            "--set", "train.steps=1", "--set", "train.gradient_checkpointing=false"]
    assert cli(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    AcceleratorState._reset_state(reset_partial_state=True)
    assert cli(argv + ["--no-resume"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    AcceleratorState._reset_state(reset_partial_state=True)
    assert cli(argv + ["--no-resume", "--overwrite"]) == 0
    assert "overwrite: removed the previous run" in capsys.readouterr().out


def test_non_finite_loss_is_nonfinitelosserror_and_clears_grads(tmp_path, monkeypatch, capsys):
    """The script's step is the core step: a NaN teacher raises NonFiniteLossError (not a bare
    FloatingPointError) naming the optimizer step, no parameter or gradient is left changed,
    and the CLI reports it as a one-line error."""
    from paper_repro.train import DOPSDTrainer, cli

    data = make_folder(tmp_path / "data")
    tr = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run"))
    before = _adapters(tr)
    real = tr.velocity_fns_from

    def nan_teacher(ctx, h, w):
        student, teacher = real(ctx, h, w)
        return student, lambda x, s: teacher(x, s) * float("nan")

    monkeypatch.setattr(tr, "velocity_fns_from", nan_teacher)
    with pytest.raises(NonFiniteLossError, match="optimizer step 1"):
        tr.train_step()
    assert tr.step == 0 and _equal(_adapters(tr), before)
    assert all(p.grad is None for p in tr.params)

    import paper_repro.train as T

    monkeypatch.setattr(T.DOPSDTrainer, "train_step", lambda self: (_ for _ in ()).throw(
        NonFiniteLossError("gradient norm is nan at optimizer step 1")))
    rc = cli(["--config", str(CFG), "--set", f"data.root={data}", "--set", f"output_dir={tmp_path / 'cli'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: gradient norm is nan at optimizer step 1" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_resumes_exactly(tmp_path, monkeypatch, capsys, default_sigint):
    """The first Ctrl-C stops the script after the current step, saves a checkpoint there and
    exits with 130; running again resumes and ends bit-identical to an uninterrupted run."""
    from accelerate.state import AcceleratorState

    import paper_repro.train as T

    data = make_folder(tmp_path / "data")
    common = ["--config", str(CFG), "--set", f"data.root={data}", "--set", "train.gradient_checkpointing=false",
              "--set", "train.steps=3", "--set", "train.checkpoint_every=100"]
    straight = T.main(common + ["--set", f"output_dir={tmp_path / 'a'}"])
    AcceleratorState._reset_state(reset_partial_state=True)
    real = T.DOPSDTrainer.train_step

    def step_with_sigint(self):
        if self.step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(self)

    monkeypatch.setattr(T.DOPSDTrainer, "train_step", step_with_sigint)
    assert T.cli(common + ["--set", f"output_dir={tmp_path / 'b'}"]) == 130
    assert "checkpoint saved at step 2" in capsys.readouterr().out
    assert ck.find_checkpoint(tmp_path / "b" / "checkpoints").step == 2
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = T.main(common + ["--set", f"output_dir={tmp_path / 'b'}"])
    assert resumed.step == 3 and _equal(_adapters(straight), _adapters(resumed))
    assert signal.getsignal(signal.SIGINT) is default_sigint  # the handler in place before is back


def test_full_mode_teacher_round_trips_through_save_state_hooks(tmp_path):
    """Full-parameter mode: the student goes through accelerate's model.safetensors and the
    EMA teacher copy through the save hook's teacher.safetensors; both load back exactly.
    accelerate's own pickles (optimizer, RNG) load with weights_only=True."""
    from accelerate.utils import load as accelerate_load

    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    a = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run", mode="full"))
    a.train_step()
    path = a.save_checkpoint()
    assert (path / "model.safetensors").exists() and (path / "teacher.safetensors").exists()
    assert torch.load(path / "optimizer.bin", weights_only=True)["state"]
    assert "random_state" in accelerate_load(path / "random_states_0.pkl")  # weights_only=True inside
    b = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "run", mode="full"))
    assert b.load_checkpoint() and b.step == 1
    for x, y in ((a.unwrapped, b.unwrapped), (a.teacher_module, b.teacher_module)):
        sx, sy = x.state_dict(), y.state_dict()
        assert all(torch.equal(sx[k], sy[k]) for k in sx)
    assert any(not torch.equal(a.teacher_module.state_dict()[k], a.unwrapped.state_dict()[k])
               for k in a.unwrapped.state_dict())  # the teacher is not just the student again
