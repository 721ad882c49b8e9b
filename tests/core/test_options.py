"""Options of the D-OPSD step: the auxiliary reconstruction loss (weight λ) and the K curriculum."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from core_fixtures import CtxField

import dopsd_ref
from dopsd_ref import KSchedule, MicroBatch, NonFiniteLossError, SFTMicroBatch, StepConfig, dopsd_train_step, make_teacher


def _batches(seed, b=3):
    """One D-OPSD micro-batch and its reconstruction micro-batch (target, noise, σ, text context)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.zeros(b, 2, dtype=torch.float64)
    mb = MicroBatch(torch.randn(b, 4, generator=g, dtype=torch.float64), text, torch.randn(b, 2, generator=g, dtype=torch.float64))
    sig = dopsd_ref.sample_training_sigmas(b, g, "mixed", dtype=torch.float64)
    rb = SFTMicroBatch(torch.randn(b, 4, generator=g, dtype=torch.float64), torch.randn(b, 4, generator=g, dtype=torch.float64),
                       sig, text)
    return mb, rb


def _update(seed, strategy="per_step", sigmas=None, step=None, **kw):
    """Run one step with SGD(lr = 1) and no clipping: the parameter change is exactly −∇L."""
    model = CtxField(seed=seed % 7)
    before = [p.detach().clone() for p in model.parameters()]
    teacher = make_teacher(model, "frozen")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    mb, rb = _batches(seed)
    cfg = StepConfig(grad_strategy=strategy, max_grad_norm=None)
    res = dopsd_train_step(model, teacher.module, [mb], dopsd_ref.uniform_sigmas(4) if sigmas is None else sigmas,
                           opt, model.parameters(), cfg, step=step, **({"reconstruction": [rb]} | kw) if kw else {})
    grads = [b - p.detach() for b, p in zip(before, model.parameters())]
    return res, grads, model, rb


@given(st.integers(0, 10_000), st.sampled_from(["per_step", "single"]))
def test_zero_weight_is_bit_identical_to_no_reconstruction(seed, strategy):
    """λ = 0 (the default) leaves the step bit-identical to a step without the option: same
    loss, same per-step losses, same parameter update, even when reconstruction batches are given."""
    r0, g0, _, _ = _update(seed, strategy)
    r1, g1, _, _ = _update(seed, strategy, reconstruction_weight=0.0)
    assert r0.loss == r1.loss and torch.equal(r0.per_step, r1.per_step)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert r0.reconstruction_loss is None and r1.reconstruction_loss is None


@given(st.integers(0, 10_000), st.floats(0.01, 10.0), st.sampled_from(["per_step", "single"]))
def test_gradient_is_the_weighted_sum(seed, lam, strategy):
    """With weight λ the gradient is ∇L_D-OPSD + λ·∇L_FM, where ∇L_FM is the flow-matching
    gradient of the student (text context) on x_σ = (1 − σ)·x0 + σ·ε, and the reported loss
    is L_D-OPSD + λ·L_FM."""
    r0, g_dopsd, _, rb = _update(seed, strategy)
    r1, g_total, _, _ = _update(seed, strategy, reconstruction_weight=lam)
    model = CtxField(seed=seed % 7)
    fm = dopsd_ref.flow_matching_loss(lambda x, s: model(x, s, rb.context), rb.x0, rb.noise, rb.sigma)
    g_fm = torch.autograd.grad(fm, list(model.parameters()))
    for gt, gd, gf in zip(g_total, g_dopsd, g_fm):
        torch.testing.assert_close(gt, gd + lam * gf, rtol=1e-9, atol=1e-11)
    assert r1.reconstruction_loss == pytest.approx(float(fm.detach()), rel=1e-12)
    assert r1.loss == pytest.approx(r0.loss + lam * float(fm.detach()), rel=1e-12)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_weight_is_rejected(bad):
    """A negative, NaN, infinite or non-numeric λ is refused with an error naming it, before
    any parameter or gradient changes."""
    model = CtxField()
    ref = copy.deepcopy(model)
    mb, rb = _batches(0)
    with pytest.raises(ValueError, match="reconstruction_weight"):
        dopsd_train_step(model, model, [mb], dopsd_ref.uniform_sigmas(2), torch.optim.SGD(model.parameters(), lr=1.0),
                         model.parameters(), reconstruction=[rb], reconstruction_weight=bad)
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(model.parameters(), ref.parameters()))


def test_weight_needs_matching_reconstruction_batches():
    """λ > 0 needs one reconstruction micro-batch per D-OPSD micro-batch."""
    model = CtxField()
    mb, rb = _batches(0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="needs reconstruction"):
        dopsd_train_step(model, model, [mb], dopsd_ref.uniform_sigmas(2), opt, model.parameters(), reconstruction_weight=1.0)
    with pytest.raises(ValueError, match="one per micro-batch"):
        dopsd_train_step(model, model, [mb, mb], dopsd_ref.uniform_sigmas(2), opt, model.parameters(),
                         reconstruction=[rb], reconstruction_weight=1.0)


def test_nonfinite_reconstruction_loss_leaves_parameters_untouched():
    """A NaN target makes the reconstruction loss NaN: the step raises NonFiniteLossError naming
    the reconstruction loss and the step, and no parameter or gradient changes."""
    model = CtxField()
    ref = copy.deepcopy(model)
    mb, rb = _batches(0)
    rb.x0[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 3.*reconstruction \(flow-matching\) loss is nan"):
        dopsd_train_step(model, make_teacher(model, "frozen").module, [mb], dopsd_ref.uniform_sigmas(2),
                         torch.optim.SGD(model.parameters(), lr=1.0), model.parameters(), step=3,
                         reconstruction=[rb], reconstruction_weight=0.5)
    assert all(torch.equal(a, b) and a.grad is None for a, b in zip(model.parameters(), ref.parameters()))


milestones = st.lists(st.tuples(st.integers(1, 500), st.integers(1, 8)), max_size=4, unique_by=lambda m: m[0]).map(
    lambda rest: ((0, 1 + len(rest)),) + tuple(sorted(rest)))


@given(milestones, st.integers(0, 1000))
def test_schedule_follows_milestones(ms, t):
    """K(t) is the K of the last milestone at or before t (a milestone's K starts exactly at
    its step), and the grid of step t is the uniform K(t)-step grid starting at σ = 1."""
    sched = KSchedule(ms)
    probes = [t] + [s for s, _ in ms] + [s - 1 for s, _ in ms if s > 0]
    for p in probes:
        expected = [k for s, k in ms if s <= p][-1]
        assert sched.num_steps(p) == expected
        assert torch.equal(sched.sigmas(p), dopsd_ref.uniform_sigmas(expected))
    assert sched.max_steps == max(k for _, k in ms)


@given(st.integers(1, 8), st.integers(0, 10_000), st.integers(1, 1000))
def test_constant_schedule_equals_fixed_grid(k, seed, step):
    """A constant schedule KSchedule.constant(K) gives a step bit-identical to passing the fixed
    grid uniform_sigmas(K), at any step."""
    r0, g0, _, _ = _update(seed, sigmas=dopsd_ref.uniform_sigmas(k))
    r1, g1, _, _ = _update(seed, sigmas=KSchedule.constant(k), step=step)
    assert r0.loss == r1.loss and torch.equal(r0.per_step, r1.per_step)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_schedule_sets_the_rollout_length_of_each_step():
    """Passed as the step's sigmas, the schedule sets the roll-out length at the given step."""
    sched = KSchedule(((0, 2), (100, 4)))
    assert _update(0, sigmas=sched, step=99)[0].per_step.shape == (2,)
    assert _update(0, sigmas=sched, step=100)[0].per_step.shape == (4,)
    with pytest.raises(ValueError, match="pass step="):
        _update(0, sigmas=sched)


@pytest.mark.parametrize("ms, match", [
    ((), "empty"),
    (((0, 2), (10, 4), (10, 8)), "strictly increasing"),
    (((0, 2), (20, 4), (10, 8)), "strictly increasing"),
    (((0, 0),), "K must be >= 1"),
    (((0, 2), (5, -1)), "K must be >= 1"),
    (((3, 2),), "step 0"),
    (((0, 2.5),), "ints"),
    (((0,),), "pairs"),
])
def test_invalid_schedules_are_rejected(ms, match):
    """Empty, non-increasing, K < 1, non-integer, not starting at step 0: refused with a message."""
    with pytest.raises(ValueError, match=match):
        KSchedule(ms)


def test_parse_and_bad_shift_and_negative_step():
    """``"0:2,100:4"`` parses to ((0, 2), (100, 4)); a bad text, shift or step is refused."""
    assert KSchedule.parse("0:2,100:4").milestones == ((0, 2), (100, 4))
    for text in ("0-2", "0:2,x:4", "0:2:3"):
        with pytest.raises(ValueError, match="K schedule"):
            KSchedule.parse(text)
    with pytest.raises(ValueError, match="shift"):
        KSchedule(((0, 2),), shift=math.nan)
    with pytest.raises(ValueError, match="step must be"):
        KSchedule.constant(2).num_steps(-1)
    assert torch.equal(KSchedule.constant(4, shift=3.0).sigmas(0), dopsd_ref.shifted_sigmas(4, 3.0))
