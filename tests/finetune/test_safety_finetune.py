"""Data safety of the fine-tuning CLI: resume, overwrite, kills, corrupt checkpoints, bad input.

All on a tiny randomly initialised toy DiT (see test_finetune.py); each test trains a few steps.
"""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from finetune_fixtures import tiny_model
from test_finetune import _cfg

import dopsd_ref
from dopsd_ref import checkpoint as ck
from toy_models.finetune.__main__ import main
from toy_models.finetune.train import run_finetune


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_model().save_pretrained(path)
    return path


def _argv(model_dir, out, *extra, steps=4):
    return ["train", "--model", str(model_dir), "--steps", str(steps), "--batch_size", "2", "--num_targets", "3",
            "--ckpt_every", "2", "--lr", "1e-2", "--out", str(out), "--no-progress", *extra]


def _same_adapters(a, b):
    for fa, fb in ((a.roles.student_state, b.roles.student_state), (a.roles.teacher_state, b.roles.teacher_state)):
        x, y = fa(), fb()
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def test_resume_applies_new_lr_and_weight_decay_and_says_so(tmp_path, model_dir, capsys):
    """Resuming with a new lr / weight_decay writes them into the optimizer (the natural fix
    after a divergence is a smaller lr), prints "resumed at step N" with the change, and the
    checkpoint then records the new values; the result differs from resuming with the old lr."""
    run_finetune(_cfg(tmp_path / "a", model_dir, steps=2), progress=False)
    run_finetune(_cfg(tmp_path / "b", model_dir, steps=2), progress=False)
    capsys.readouterr()
    same = run_finetune(_cfg(tmp_path / "a", model_dir), progress=False, resume=True)
    assert "resumed at step 2" in capsys.readouterr().err
    smaller = run_finetune(_cfg(tmp_path / "b", model_dir, lr=1e-4, weight_decay=0.1), progress=False, resume=True)
    err = capsys.readouterr().err
    assert "resumed at step 2; applied to the optimizer: lr 0.01 -> 0.0001, weight_decay 0.0 -> 0.1" in err
    groups = ck.load_checkpoint(tmp_path / "b" / "run" / "checkpoints").optimizer["param_groups"]
    assert all(g["lr"] == 1e-4 and g["weight_decay"] == 0.1 for g in groups)
    assert json.loads((tmp_path / "b" / "run" / "config.json").read_text())["lr"] == 1e-4
    assert not _same_adapters(same, smaller)


@pytest.mark.parametrize("change", [{"method": "sft"}, {"data": "style:hstripe"}, {"seed": 3}, {"batch_size": 3},
                                    {"lora_rank": 4}, {"num_targets": 5}, {"rollout_steps": 3}])
def test_resume_refuses_a_changed_run_definition(tmp_path, model_dir, change):
    """A resume that changes the method, data, seed, batch or adapter shape (or any field
    outside the resumable ones) is refused with the field named; nothing is written."""
    run_finetune(_cfg(tmp_path, model_dir, steps=2), progress=False)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    cfg_text = (tmp_path / "run" / "config.json").read_text()
    (name, value), = change.items()
    with pytest.raises(ValueError, match=f"cannot resume with a changed {name}: .* -> {value!r}"):
        run_finetune(_cfg(tmp_path, model_dir, **change), progress=False, resume=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert (tmp_path / "run" / "config.json").read_text() == cfg_text


def test_existing_run_needs_resume_or_overwrite(tmp_path, model_dir, capsys):
    """`train` into a folder holding a run is refused without --resume or --overwrite (the
    run's files stay byte-identical); --overwrite replaces it; --out "" is refused; resuming
    prints "resumed at step N"."""
    out = tmp_path / "run"
    assert main(_argv(model_dir, out, steps=2)) == 0
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_argv(model_dir, out, steps=2)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert main(_argv(model_dir, out, "--resume")) == 0
    assert "resumed at step 2" in capsys.readouterr().err
    assert main(_argv(model_dir, out, "--overwrite", steps=2)) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
    assert main(_argv(model_dir, "", steps=2)) == 2
    assert "'out' must be a non-empty folder path" in capsys.readouterr().err


class Killed(BaseException):
    pass


@pytest.fixture(scope="module")
def full_six_steps(tmp_path_factory, model_dir):
    return run_finetune(_cfg(tmp_path_factory.mktemp("full"), model_dir, steps=6), progress=False)


@pytest.mark.parametrize("kill_at", [0, 2, 3, 5])
def test_kill_during_a_checkpoint_save_then_resume_is_exact(tmp_path, model_dir, monkeypatch, kill_at, full_six_steps):
    """A run killed inside its step-4 checkpoint save (at a write, the manifest, the
    rename into place or the pointer) resumes from the newest complete checkpoint and ends
    bit-identical to an uninterrupted run."""
    full = full_six_steps
    ops = {"n": 0, "armed": False}
    real = {name: getattr(ck, name) for name in ("_write_bytes", "_rename", "_remove_tree")}
    real_commit = ck.begin_checkpoint

    def arm(root, step):
        ops["armed"] = step == 4
        return real_commit(root, step)

    def wrap(name):
        def op(*a):
            if ops["armed"]:
                if ops["n"] == kill_at:
                    raise Killed(name)
                ops["n"] += 1
            return real[name](*a)
        return op

    with monkeypatch.context() as m:
        m.setattr(ck, "begin_checkpoint", arm)
        for name in real:
            m.setattr(ck, name, wrap(name))
        with pytest.raises(Killed):
            run_finetune(_cfg(tmp_path / "b", model_dir, steps=6), progress=False)
    resumed = run_finetune(_cfg(tmp_path / "b", model_dir, steps=6), progress=False, resume=True)
    assert resumed.start in (2, 4)
    assert _same_adapters(full, resumed)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]
    assert not [p for p in (tmp_path / "b" / "run" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_corrupt_checkpoint_falls_back_or_refuses(tmp_path, model_dir, capsys):
    """A corrupt newest checkpoint (flipped tensor bytes) is reported and the run resumes
    from the previous complete one; when every checkpoint is corrupt the CLI refuses with a
    message naming the problem, never restarting at step 0 over the run."""
    out = tmp_path / "run"
    assert main(_argv(model_dir, out, steps=4)) == 0
    capsys.readouterr()
    f = out / "checkpoints" / "step_00000004" / "tensors.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(_argv(model_dir, out, "--resume", steps=4)) == 0
    err = capsys.readouterr().err
    assert "sha256 mismatch" in err and "resumed at step 2" in err
    for p in (out / "checkpoints").glob("step_*"):
        (p / "tensors.safetensors").write_bytes(b"garbage")
    assert main(_argv(model_dir, out, "--resume", steps=6)) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, model_dir, monkeypatch, capsys, default_sigint):
    """The first Ctrl-C stops training after the current step, saves a checkpoint there and
    exits with status 130; resuming then ends exactly where an uninterrupted run ends."""
    full = run_finetune(_cfg(tmp_path / "full", model_dir, steps=5, ckpt_every=0), progress=False)
    real = dopsd_ref.dopsd_train_step
    calls = {"n": 0}

    def interrupted_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)  # arrives in the middle of step 3
        return real(*a, **k)

    monkeypatch.setattr(dopsd_ref, "dopsd_train_step", interrupted_step)
    out = tmp_path / "run"
    argv = _argv(model_dir, out, "--ckpt_every", "0", steps=5)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "checkpoint saved at step 3" in err and "Traceback" not in err
    assert ck.find_checkpoint(out / "checkpoints").step == 3 and not (out / "final").exists()
    monkeypatch.setattr(dopsd_ref, "dopsd_train_step", real)
    resumed = run_finetune(_cfg(tmp_path, model_dir, steps=5, ckpt_every=0), progress=False, resume=True)
    assert resumed.start == 3 and _same_adapters(full, resumed)
    assert signal.getsignal(signal.SIGINT) is default_sigint  # the handler in place before is back


def test_disk_full_and_read_only_are_messages(tmp_path, model_dir, monkeypatch, capsys):
    """A full disk during a checkpoint save and a read-only output folder end the CLI with a
    one-line error naming the path and the cause (no traceback); the earlier checkpoint stays."""
    out = tmp_path / "run"
    real = ck._write_bytes

    def full_disk(path, data):
        if "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(ck, "_write_bytes", full_disk)
    assert main(_argv(model_dir, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step_00000004" in err and "Traceback" not in err
    assert ck.find_checkpoint(out / "checkpoints").step == 2
    monkeypatch.undo()

    from toy_models.finetune import train as T

    def read_only(path, text):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(T, "_write_text_atomic", read_only)
    assert main(_argv(model_dir, tmp_path / "ro")) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "config.json" in err
    assert not (tmp_path / "ro" / "checkpoints").exists()  # refused before training


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_output_folder_is_a_message(tmp_path, model_dir, capsys):
    """A real read-only output folder (permissions) is refused before training with a message."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(_argv(model_dir, ro / "run")) == 2
    finally:
        ro.chmod(0o755)
    assert "Permission denied" in capsys.readouterr().err


def test_device_errors_are_messages(tmp_path, model_dir, capsys):
    """CUDA requested where it is unavailable (a CPU build, or a GPU index beyond those
    present) and an unknown device name are one-line errors naming the device field."""
    cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(_argv(model_dir, tmp_path / "a", "--device", cuda)) == 2
    err = capsys.readouterr().err
    assert "'device' is" in err and ("no CUDA support" in err or "no CUDA GPU" in err or "GPU(s) exist" in err)
    assert main(_argv(model_dir, tmp_path / "b", "--device", "gpu")) == 2
    assert "'device'" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path / "a"), "--device", "tpu0"]) == 2
    assert "unknown device 'tpu0'" in capsys.readouterr().err


def test_captions_without_rare_token_are_refused_under_local_scopes(tmp_path, model_dir, capsys):
    """Under the default prompt-gated scope (and token_kv) a caption with no rare token
    trains nothing: a folder of such captions is refused naming the captions file and line
    (and the fix), not trained to a "success" with zero gradients; cross_attn accepts it."""
    from toy_models.world import data as D
    from toy_models.world.folder import write_pair_folder

    sp = D.specs(0, 3)
    folder = write_pair_folder(tmp_path / "pairs", D.render_batch(sp), [D.caption(s) for s in sp])
    assert main(_argv(model_dir, tmp_path / "a", "--data", str(folder))) == 2
    err = capsys.readouterr().err
    assert "none of the captions contain a rare token" in err and "captions.jsonl:1" in err
    assert "would change nothing" in err
    assert main(_argv(model_dir, tmp_path / "b", "--data", str(folder), "--scope", "cross_attn", steps=1)) == 0
