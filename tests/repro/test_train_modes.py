"""Training-script modes on tiny real architectures.

* per-step backward and a single backward give the same update (states are detached between
  roll-out steps, so the gradient of the mean is the sum of per-step gradients);
* bf16 autocast + gradient checkpointing run, keep the LoRA tensors in float32 and a finite loss;
* full-parameter mode trains every transformer weight and moves the EMA copy by (1 − d)·Δ.
"""

from __future__ import annotations

import torch

from dopsd_ref.lora import STUDENT, lora_parameters
from .helpers import make_folder, tiny_config


def test_per_step_and_single_backward_give_the_same_update(tmp_path):
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    res = {}
    for strategy in ("per_step", "single"):
        tr = DOPSDTrainer(tiny_config("zimage", data, tmp_path / strategy, grad_strategy=strategy, grad_accum=2,
                                      max_grad_norm=1e9, lr=1e-3))
        m = tr.train_step()
        res[strategy] = (m, {k: v.detach().clone() for k, v in lora_parameters(tr.unwrapped, STUDENT).items()})
    (m1, p1), (m2, p2) = res["per_step"], res["single"]
    assert abs(m1["grad_norm"] - m2["grad_norm"]) <= 1e-5 * max(1.0, m1["grad_norm"])
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], atol=1e-7, rtol=1e-5)


def test_bf16_autocast_with_gradient_checkpointing(tmp_path):
    """bf16 frozen weights (as real runs load them) + bf16 autocast + checkpointing: the LoRA
    tensors are float32 (AdamW and the 0.9999 EMA would stall in bf16) and the step is finite."""
    from dopsd_ref.lora import TEACHER
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("flux2", make_folder(tmp_path / "data"), tmp_path / "run", weight_dtype="bfloat16",
                                  mixed_precision="bf16", gradient_checkpointing=True))
    assert tr.unwrapped.gradient_checkpointing
    assert tr.unwrapped.x_embedder.weight.dtype == torch.bfloat16
    m = tr.train_step()
    assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
    for adapter in (STUDENT, TEACHER):
        assert all(p.dtype == torch.float32 for p in lora_parameters(tr.unwrapped, adapter).values())


def test_full_parameter_mode_trains_all_weights_and_ema_copy_follows(tmp_path):
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("zimage", make_folder(tmp_path / "data"), tmp_path / "run", mode="full"))
    assert tr.teacher_module is not None and not any(p.requires_grad for p in tr.teacher_module.parameters())
    s0 = {k: v.detach().clone() for k, v in tr.unwrapped.named_parameters()}
    t0 = {k: v.detach().clone() for k, v in tr.teacher_module.named_parameters()}
    assert all(torch.equal(s0[k], t0[k]) for k in s0)
    tr.train_step()
    s1 = dict(tr.unwrapped.named_parameters())
    t1 = dict(tr.teacher_module.named_parameters())
    moved = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert len(moved) > len(s0) // 2  # most weights get gradient (pad tokens may not)
    d = tr.cfg.train.ema_decay
    for k in s0:
        torch.testing.assert_close(t1[k].detach() - t0[k], (1 - d) * (s1[k].detach() - s0[k]), atol=1e-7, rtol=1e-5)


def test_flux2_vlm_teacher_route_and_sample_grid(tmp_path):
    """FLUX.2 with the hybrid-VLM teacher: stacked layers, padded like klein's text path; the
    teacher context has the student's shape and differs from it (the image is seen); a sample
    grid PNG is written."""
    from PIL import Image

    from paper_repro.contexts import flux2_text_context
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("flux2", make_folder(tmp_path / "data"), tmp_path / "run", flux2_teacher="vlm",
                                  sample_prompts=("a photo of sks dog", "red cat")))
    assert tr.comps.vlm_report is not None and tr.comps.vlm_report.fraction == 1.0
    img, cap = tr.dataset.load(0)
    t_ctx = tr.comps.vlm_context([cap], [img])
    s_ctx = flux2_text_context(tr.comps.text_encoder, tr.comps.tokenizer, [cap], (1, 2, 3), 48)
    assert t_ctx.shape == s_ctx.shape == (1, 48, 96)
    assert (t_ctx - s_ctx).abs().max() > 1e-4
    m = tr.train_step()
    assert m["grad_norm"] > 0
    path = tr.sample_grid()
    grid = Image.open(path)
    assert grid.size[0] == 2 * grid.size[1]  # two prompts side by side


def test_launcher_constraints_are_checked_before_loading(tmp_path):
    """DeepSpeed owns backward/step (single backward, no manual accumulation); full mode rejects
    FSDP (unsharded EMA copy). Checked up front, with the fields named."""
    import pytest
    from accelerate.utils import DistributedType

    from paper_repro.train import DOPSDTrainer

    class FakeAccelerator:  # only what the constructor reads before loading any model
        def __init__(self, kind):
            self.distributed_type = kind

    data = make_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="grad_strategy=single"):
        DOPSDTrainer(tiny_config("zimage", data, tmp_path / "a"), FakeAccelerator(DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="grad_accum=1"):
        DOPSDTrainer(tiny_config("zimage", data, tmp_path / "b", grad_strategy="single", grad_accum=2),
                     FakeAccelerator(DistributedType.DEEPSPEED))
    with pytest.raises(ValueError, match="FSDP"):
        DOPSDTrainer(tiny_config("zimage", data, tmp_path / "c", mode="full"), FakeAccelerator(DistributedType.FSDP))
