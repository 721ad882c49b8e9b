"""Fine-tuning runner: locality of the adapters, exact resume, NaN guard, CLI end to end.

All on a tiny randomly initialised toy DiT (no shipped weights needed).
"""

import json

import pytest
import torch
from finetune_fixtures import probe_random_student, tiny_model

import dopsd_ref
from toy_models.world import vocab as V
from toy_models.finetune.adapters import add_local_adapters
from toy_models.finetune.config import load_config
from toy_models.finetune.train import RARE_IDS, run_finetune


def _cfg(tmp, model_dir, **kw):
    base = dict(model=str(model_dir), steps=4, batch_size=2, num_targets=3, ckpt_every=2, out=str(tmp / "run"), lr=1e-2)
    base.update(kw)
    return load_config(None, **base)


@pytest.mark.parametrize("scope", ["token_kv", "prompt_gated"])
def test_local_adapter_leaves_other_prompts_unchanged(scope):
    """With a local scope (rare-token positions, or prompts containing a rare token), any
    adapter weights leave prompts without a rare token exactly as the base model computes
    them — in the same batch as prompts with one, which they change."""
    base = tiny_model()
    wrapped = add_local_adapters(tiny_model(), RARE_IDS, rank=2, scope=scope)
    out = probe_random_student(wrapped, base)
    diff = out.student_gap()
    assert diff[0] == 0 and diff[1] > 1e-4
    # the teacher adapter (still at its initial B = 0, δ = 0) equals the base everywhere
    assert torch.allclose(out.teacher, out.base, atol=1e-6)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(".student" in n for n in trainable)


def test_prompt_gated_scope_adapts_attention_and_mlp():
    """The prompt-gated scope adds LoRA to self-attention, cross-attention and the MLP of
    every block (image-pathway capacity), token_kv only to the cross-attention k/v."""
    gated = add_local_adapters(tiny_model(), RARE_IDS, rank=2, scope="prompt_gated")
    kv = add_local_adapters(tiny_model(), RARE_IDS, rank=2, scope="token_kv")
    names = lambda m: {n.split(".lora_A")[0].split("blocks.")[-1][2:] for n, _ in m.named_parameters() if "lora_A.student" in n}
    assert names(gated) == {"attn.q", "attn.kv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "fc1", "fc2"}
    assert names(kv) == {"cross.kv"}
    with pytest.raises(ValueError, match="scope"):
        add_local_adapters(tiny_model(), RARE_IDS, scope="everything")


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_model_dir, method):
    """A run stopped after its step-2 checkpoint and resumed ends with bit-identical student
    and teacher adapters to the uninterrupted 4-step run."""
    full = run_finetune(_cfg(tmp_path / "a", tiny_model_dir, method=method), progress=False)
    run_finetune(_cfg(tmp_path / "b", tiny_model_dir, method=method, steps=2), progress=False)
    resumed = run_finetune(_cfg(tmp_path / "b", tiny_model_dir, method=method), progress=False, resume=True)
    for fa, fb in ((full.roles.student_state, resumed.roles.student_state),
                   (full.roles.teacher_state, resumed.roles.teacher_state)):
        a, b = fa(), fb()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in full.log] == [r["loss"] for r in resumed.log]


def test_nan_guard_names_step_and_keeps_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    """A non-finite loss stops training with a message naming the step; the last good
    checkpoint stays loadable."""
    real = dopsd_ref.dopsd_train_step
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise dopsd_ref.NonFiniteLossError("D-OPSD loss is nan at step 1 (sigma=0.75)")
        return real(*a, **k)

    monkeypatch.setattr(dopsd_ref, "dopsd_train_step", poisoned)
    with pytest.raises(dopsd_ref.NonFiniteLossError, match=r"optimizer step 3|sigma=0.75") as info:
        run_finetune(_cfg(tmp_path, tiny_model_dir), progress=False)
    assert "step_00000002" in str(info.value)
    from dopsd_ref.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "run" / "checkpoints").step == 2


def test_cli_train_sample_end_to_end(tmp_path, tiny_model_dir, capsys):
    """The CLI trains from a JSON config with a flag override, and samples a PNG grid."""
    from toy_models.finetune.__main__ import main

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": str(tiny_model_dir), "steps": 2, "batch_size": 2, "num_targets": 2}))
    out = tmp_path / "cli_run"
    assert main(["train", "--config", str(cfg), "--method", "sft", "--out", str(out), "--no-progress"]) == 0
    assert (out / "final" / "student.safetensors").exists() and (out / "log.jsonl").exists()
    assert main(["sample", "--run", str(out), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "run folder" in capsys.readouterr().out


def test_config_errors_name_the_field(tmp_path):
    """Unknown fields, wrong types and invalid values are errors naming the field."""
    with pytest.raises(ValueError, match="unknown config field"):
        load_config(None, learning_rate=1.0)
    with pytest.raises(ValueError, match="'steps' must be int"):
        load_config(None, steps="many")
    with pytest.raises(ValueError, match="'method' must be one of"):
        load_config(None, method="telepathy")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        load_config(bad)


def test_targets_builtin_folder_and_eval_prompts(tmp_path):
    """Built-in target sets are deterministic and name the concept with the rare token; a
    user folder loads the same pairs; held-out evaluation prompts recombine the concept with
    colour × background pairs absent from the targets."""
    from toy_models.finetune.evaluate import make_eval_prompts
    from toy_models.finetune.targets import load_targets
    from toy_models.world.folder import write_pair_folder

    a, b = load_targets("concept:ell", 6, 3), load_targets("concept:ell", 6, 3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert all(V.SHAPE_TOKEN in c.split() for c in a.captions)
    write_pair_folder(tmp_path / "pairs", a.images, a.captions)
    f = load_targets(str(tmp_path / "pairs"))
    assert f.captions == a.captions and torch.allclose(f.images, a.images, atol=1 / 127)
    p = make_eval_prompts(a, n_unseen=5, n_known=4)
    seen = {(s.color, s.bg) for s in a.specs}
    assert len(p.unseen) == 5 and all(V.SHAPE_TOKEN in u for u in p.unseen)
    for u in p.unseen:
        words = u.split()
        assert (words[1], words[-1]) not in seen
    with pytest.raises(FileNotFoundError, match="neither a built-in set"):
        load_targets(str(tmp_path / "nope"))
