"""The model-agnostic training step: accumulation, strategies, clipping, EMA, NaN guard."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from core_fixtures import CtxField

import dopsd_ref
from dopsd_ref import MicroBatch, NonFiniteLossError, SFTMicroBatch, StepConfig, dopsd_train_step, make_teacher


def _batch(seed, b=3):
    g = torch.Generator().manual_seed(seed)
    return MicroBatch(
        noise=torch.randn(b, 4, generator=g, dtype=torch.float64),
        student_context=torch.zeros(b, 2, dtype=torch.float64),
        teacher_context=torch.randn(b, 2, generator=g, dtype=torch.float64),
    )


def _step(strategy, micro, seed=0, clip=None, lr=0.1):
    model = CtxField(seed=seed)
    teacher = make_teacher(model, "ema", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    res = dopsd_train_step(
        model, teacher.module, micro, dopsd_ref.uniform_sigmas(4), opt, model.parameters(),
        StepConfig(grad_strategy=strategy, max_grad_norm=clip), after_step=lambda: teacher.update(model),
    )
    return model, teacher, res


@given(st.integers(0, 1000), st.sampled_from(["x0", "velocity"]))
def test_strategies_and_accumulation_agree(seed, space):
    """per_step and single backward give the same update; two accumulated micro-batches of
    size B give the same update as one batch of size 2B."""
    mbs = [_batch(seed), _batch(seed + 1)]
    big = MicroBatch(*(torch.cat([getattr(m, f) for m in mbs]) for f in ("noise", "student_context", "teacher_context")))
    m1, _, r1 = _step("per_step", mbs)
    m2, _, r2 = _step("single", mbs)
    m3, _, r3 = _step("per_step", [big])
    for a, b, c in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        assert torch.allclose(a, b, atol=1e-12) and torch.allclose(a, c, atol=1e-12)
    assert abs(r1.grad_norm - r3.grad_norm) < 1e-9 and r1.per_step.shape == (4,)


def test_clipping_and_ema_after_step():
    """The gradient is clipped to max_grad_norm (the unclipped norm is reported) and the
    EMA teacher moves by (1−d) of the student's change after the step."""
    before = CtxField(seed=0)
    model, teacher, res = _step("per_step", [_batch(0)], clip=1e-3, lr=1.0)
    delta = torch.cat([(a - b).flatten() for a, b in zip(model.parameters(), before.parameters())])
    assert res.grad_norm > 1e-3
    assert delta.norm().item() == pytest.approx(1e-3, rel=1e-3)
    for t, s, b in zip(teacher.module.parameters(), model.parameters(), before.parameters()):
        torch.testing.assert_close(t, b + 0.5 * (s - b))


def test_nan_guard_leaves_parameters_untouched():
    """A NaN loss raises NonFiniteLossError naming the step, and no parameter changes."""
    model = CtxField()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nan_teacher = lambda x, s, c: torch.full_like(x, float("nan"))  # noqa: E731
    with pytest.raises(NonFiniteLossError, match="optimizer step 7"):
        dopsd_train_step(model, nan_teacher, [_batch(0)], dopsd_ref.uniform_sigmas(2), opt, model.parameters(), step=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_sft_step_and_autocast():
    """The SFT step runs through the same plumbing, and a D-OPSD step runs under bf16 autocast."""
    model = CtxField().float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    mb = SFTMicroBatch(torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g), torch.rand(4, generator=g), torch.zeros(4, 2))
    res = dopsd_ref.sft_train_step(model, [mb], opt, model.parameters())
    assert res.loss > 0 and res.grad_norm > 0
    teacher = make_teacher(model, "frozen")
    mbd = MicroBatch(torch.randn(4, 4, generator=g), torch.zeros(4, 2), torch.ones(4, 2))
    res = dopsd_train_step(model, teacher.module, [mbd], dopsd_ref.uniform_sigmas(4), opt, model.parameters(),
                           StepConfig(autocast_dtype=torch.bfloat16))
    assert res.loss > 0


def test_step_config_validation():
    """Unknown strategies and non-positive clip values are refused."""
    with pytest.raises(ValueError, match="grad_strategy"):
        StepConfig(grad_strategy="twice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_grad_norm"):
        StepConfig(max_grad_norm=0.0)


class _NanGradAt(torch.autograd.Function):
    """Identity forward; the backward returns NaN (a finite loss with a NaN gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class NanGradField(CtxField):
    """CtxField whose gradient is NaN at one roll-out noise level only."""

    def __init__(self, bad_sigma):
        super().__init__()
        self.bad_sigma = bad_sigma

    def forward(self, x, sigma, context):
        out = super().forward(x, sigma, context)
        return _NanGradAt.apply(out) if float(sigma[0]) == self.bad_sigma else out


@pytest.mark.parametrize("strategy", ["per_step", "single"])
def test_nan_gradient_with_finite_loss_names_step_and_sigma(strategy):
    """A NaN gradient behind a finite loss raises NonFiniteLossError naming the optimizer
    step and, with per-step backward, the roll-out step and σ whose backward produced it;
    no parameter changes and no gradient is left on the parameters."""
    model = NanGradField(bad_sigma=0.5)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = make_teacher(model, "frozen")
    with pytest.raises(NonFiniteLossError, match="gradient norm is nan at optimizer step 3") as info:
        dopsd_train_step(model, teacher.module, [_batch(0), _batch(1)], dopsd_ref.uniform_sigmas(4), opt,
                         model.parameters(), StepConfig(grad_strategy=strategy), step=3)
    if strategy == "per_step":
        assert "micro-batch 0, roll-out step 2 (sigma=0.5)" in str(info.value)
    else:
        assert "not traceable" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_error_mid_rollout_leaves_no_gradients_behind():
    """Per-step backward has accumulated gradients of the first roll-out steps when a later
    step fails (here: a wrong-shaped output at σ = 0.5); after the error no parameter holds
    a gradient, so the next step does not start from a stale one."""
    model = CtxField()

    def student(x, s, c):
        out = model(x, s, c)
        return out[:, :3] if float(s[0]) == 0.5 else out

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        dopsd_train_step(student, make_teacher(model, "frozen").module, [_batch(0)], dopsd_ref.uniform_sigmas(4), opt,
                         model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_empty_micro_batch_is_rejected():
    """An empty micro-batch (batch dimension 0) is refused as such, not reported as a NaN loss."""
    model = CtxField()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = MicroBatch(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64),
                       torch.zeros(0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"micro-batch 1 is empty \(noise has shape \(0, 4\)\)"):
        dopsd_train_step(model, model, [_batch(0), empty], dopsd_ref.uniform_sigmas(2), opt, model.parameters())
    with pytest.raises(ValueError, match="micro_batches is empty"):
        dopsd_train_step(model, model, [], dopsd_ref.uniform_sigmas(2), opt, model.parameters())
    sft_empty = SFTMicroBatch(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="micro-batch 0 is empty"):
        dopsd_ref.sft_train_step(model, [sft_empty], opt, model.parameters())


def test_backward_and_clip_hooks_replace_the_defaults():
    """A launcher's backward and clip hooks are what the step calls: with
    ``backward = lambda l: l.backward()`` and torch's clip they reproduce the default step
    exactly; a clip hook that reports no norm (DeepSpeed) still applies the step and returns
    NaN; a backward hook with per-step backward is refused, not silently bypassed."""
    calls = {"backward": 0, "clip": 0}

    def backward(loss):
        calls["backward"] += 1
        loss.backward()

    def clip(params, max_norm):
        calls["clip"] += 1
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    mbs = [_batch(0), _batch(1)]
    ref, _, r_ref = _step("single", mbs, clip=0.5)
    model = CtxField()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    teacher = make_teacher(model, "ema", 0.5)
    res = dopsd_train_step(model, teacher.module, mbs, dopsd_ref.uniform_sigmas(4), opt, model.parameters(),
                           StepConfig(grad_strategy="single", max_grad_norm=0.5), lambda: teacher.update(model),
                           backward=backward, clip_grad_norm=clip)
    assert calls == {"backward": 2, "clip": 1}
    assert res.grad_norm == r_ref.grad_norm
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    before = copy.deepcopy(model)
    res = dopsd_train_step(model, teacher.module, mbs, dopsd_ref.uniform_sigmas(4), opt, model.parameters(),
                           StepConfig(grad_strategy="single"), clip_grad_norm=lambda p, m: None)
    assert res.grad_norm != res.grad_norm  # NaN: not reported
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
    with pytest.raises(ValueError, match="backward hook needs grad_strategy='single'"):
        dopsd_train_step(model, teacher.module, mbs, dopsd_ref.uniform_sigmas(4), opt, model.parameters(),
                         StepConfig(grad_strategy="per_step"), backward=backward)


def test_micro_batch_grid_overrides_the_step_grid():
    """A micro-batch's own σ grid (FLUX.2: it depends on the image size) is the one its roll-out
    uses: the update equals that of a step whose grid is that grid; grids of different
    lengths in one step are refused."""
    grid = torch.tensor([1.0, 0.7, 0.2], dtype=torch.float64)
    mb = _batch(0)
    a, _, ra = _step("per_step", [MicroBatch(mb.noise, mb.student_context, mb.teacher_context, sigmas=grid)])
    model = CtxField()
    teacher = make_teacher(model, "ema", 0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rb = dopsd_train_step(model, teacher.module, [mb], grid, opt, model.parameters(),
                          StepConfig(max_grad_norm=None), after_step=lambda: teacher.update(model))
    assert ra.per_step.shape == (3,) and torch.equal(ra.per_step, rb.per_step)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), model.parameters()))
    short = MicroBatch(mb.noise, mb.student_context, mb.teacher_context, sigmas=grid[:2])
    with pytest.raises(ValueError, match="grids differ in length"):
        dopsd_train_step(model, model, [mb, short], grid, opt, model.parameters())
