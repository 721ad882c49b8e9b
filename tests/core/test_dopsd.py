"""The specification of D-OPSD: property tests of the roll-out loss and its gradients.

Each property is written once as a ``check_*`` function over an implementation with the
signature of :func:`dopsd_ref.dopsd_rollout_loss`; the tests run it on dopsd_ref (must
pass) and, in ``test_broken_variants_are_caught``, on deliberately broken variants (must
fail) — so every property is shown able to fail.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from core_fixtures import cases, grads, make_field, reference_rollout, sigma_grids

import dopsd_ref
from dopsd_ref import dopsd_rollout_loss, euler_sample
from dopsd_ref.conventions import euler_step, x0_from_velocity

# -----------------------------------------------------------------------------
# Property checks over an implementation `impl(student, teacher, noise, sigmas, space)`
# -----------------------------------------------------------------------------


def _setup(case, sigmas):
    kind, batch, dim, seed = case
    student = make_field(kind, dim, seed)
    teacher = make_field(kind, dim, seed + 1)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return student, teacher, noise


def check_states_are_sampler_states(impl, case, sigmas, space):
    """Training states = inference states: the roll-out visits exactly the plain Euler
    sampler's states for the same noise and grid, whatever the teacher."""
    student, teacher, noise = _setup(case, sigmas)
    out = impl(student, teacher, noise, sigmas, space)
    expected = euler_sample(student, noise, sigmas, return_states=True)
    assert torch.allclose(out.states, expected, atol=1e-10, rtol=1e-10), "roll-out states != sampler states"


def check_matches_reference(impl, case, sigmas, space):
    """Per-step losses equal the naive reference written from the method notes."""
    student, teacher, noise = _setup(case, sigmas)
    out = impl(student, teacher, noise, sigmas, space)
    ref_losses, _ = reference_rollout(student, teacher, noise, sigmas, space)
    assert torch.allclose(out.per_step, ref_losses.detach(), atol=1e-10, rtol=1e-8), "per-step losses != reference"


def check_x0_is_sigma2_weighted_velocity(impl, case, sigmas, space):
    """The x0-space loss at step k equals σ_k² times the velocity-space loss at step k."""
    student, teacher, noise = _setup(case, sigmas)
    lx0 = impl(student, teacher, noise, sigmas, "x0").per_step
    lv = impl(student, teacher, noise, sigmas, "velocity").per_step
    assert torch.allclose(lx0, sigmas.to(lv) ** 2 * lv, atol=1e-10, rtol=1e-8), "x0 loss != sigma^2 * velocity loss"


def check_gradient_flow(impl, case, sigmas, space):
    """The student's parameters receive a gradient, the teacher's none, and nothing flows
    back into the noise (the start state is not a parameter)."""
    student, teacher, noise = _setup(case, sigmas)
    noise = noise.clone().requires_grad_(True)
    out = impl(student, teacher, noise, sigmas, space)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters()), "teacher received a gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), "student got no gradient"
    assert noise.grad is None, "gradient flowed into the noise"


def check_no_backprop_across_steps(impl, case, sigmas, space):
    """States are detached between steps: the gradient of the loss equals the sum of the
    gradients of each step's loss evaluated at its (detached) state alone."""
    student, teacher, noise = _setup(case, sigmas)
    out = impl(student, teacher, noise, sigmas, space)
    out.loss.backward()
    got = grads(student)
    student.zero_grad()
    ref_losses, _ = reference_rollout(student, teacher, noise, sigmas, space)
    ref_losses.mean().backward()
    want = grads(student)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-9, rtol=1e-7), "gradient differs from the detached per-step sum"


CHECKS = [
    check_states_are_sampler_states,
    check_matches_reference,
    check_x0_is_sigma2_weighted_velocity,
    check_gradient_flow,
    check_no_backprop_across_steps,
]


def reference_impl(student, teacher, noise, sigmas, space):
    return dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_dopsd_ref_satisfies(check, case, sigmas, space):
    """dopsd_ref satisfies every property (the invariant is the check's docstring)."""
    check(reference_impl, case, sigmas, space)


# -----------------------------------------------------------------------------
# Further invariants of the reference implementation
# -----------------------------------------------------------------------------


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_loss_nonnegative_and_zero_iff_roles_agree(case, sigmas, space):
    """The loss is ≥ 0; it is 0 when teacher and student agree on every visited state and
    > 0 when they differ on some visited state."""
    student, teacher, noise = _setup(case, sigmas)
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)
    assert out.loss.item() >= 0 and (out.per_step >= 0).all()
    same = dopsd_rollout_loss(student, student, noise, sigmas, space=space)
    assert same.loss.item() == 0.0 and (same.per_step == 0).all()
    shifted = lambda x, s: student(x, s) + 1e-3  # noqa: E731  disagree everywhere
    assert dopsd_rollout_loss(student, shifted, noise, sigmas, space=space).loss.item() > 0


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_per_step_backward_equals_single_backward(case, sigmas, space):
    """Calling backward after each step gives the same gradients as one backward of the
    mean loss (states are detached, so the K graphs are independent)."""
    student, teacher, noise = _setup(case, sigmas)
    single = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)
    (0.5 * single.loss).backward()
    g_single = grads(student)
    student.zero_grad()
    per = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space, per_step_backward=True, grad_scale=0.5)
    g_per = grads(student)
    assert not per.loss.requires_grad
    assert torch.allclose(per.loss, single.loss.detach())
    for a, b in zip(g_single, g_per):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9)


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]), data=st.data())
def test_step_weights_weight_each_step(case, sigmas, space, data):
    """With per-step weights w_k the loss is Σ_k w_k·L_k / K and its gradient is the same
    weighted sum of the per-step gradients (per-step or single backward alike); the
    roll-out states and the unweighted per-step losses do not depend on the weights."""
    student, teacher, noise = _setup(case, sigmas)
    K = len(sigmas)
    w = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=K, max_size=K).filter(lambda v: any(v)))
    plain = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)
    expected = (plain.per_step * torch.tensor(w, dtype=plain.per_step.dtype)).mean()
    per_k = []  # gradient of each L_k / K alone
    for k in range(K):
        student.zero_grad()
        one = [0.0] * K
        one[k] = 1.0
        dopsd_rollout_loss(student, teacher, noise, sigmas, space=space, step_weights=one).loss.backward()
        per_k.append(grads(student))
    for per_step_backward in (False, True):
        student.zero_grad()
        out = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space, step_weights=w,
                                 per_step_backward=per_step_backward)
        if not per_step_backward:
            out.loss.backward()
        assert torch.allclose(out.loss.detach(), expected, atol=1e-12, rtol=1e-9)
        assert torch.equal(out.states, plain.states) and torch.equal(out.per_step, plain.per_step)
        for i, g in enumerate(grads(student)):
            assert torch.allclose(g, sum(wk * gk[i] for wk, gk in zip(w, per_k)), atol=1e-12, rtol=1e-9)


def test_step_weights_bad_input():
    """Weights of the wrong length, negative, non-finite or all zero are rejected by name."""
    student, teacher, noise = _setup(("linear", 2, 3, 0), torch.tensor([1.0, 0.5]))
    for bad in ([1.0], [1.0, -1.0], [1.0, float("nan")], [0.0, 0.0]):
        with pytest.raises(ValueError, match="step_weights"):
            dopsd_rollout_loss(student, teacher, noise, torch.tensor([1.0, 0.5]), step_weights=bad)


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_batch_loss_is_mean_of_per_sample_losses(case, sigmas, space):
    """For models that treat samples independently, the batch loss equals the mean of the
    losses of each sample rolled out alone."""
    student, teacher, noise = _setup(case, sigmas)
    batch = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)
    alone = torch.stack(
        [dopsd_rollout_loss(student, teacher, noise[i : i + 1], sigmas, space=space).per_step for i in range(len(noise))]
    )
    assert torch.allclose(batch.per_step, alone.mean(dim=0), atol=1e-12, rtol=1e-9)


@given(case=cases, sigmas=sigma_grids())
def test_teacher_is_only_queried_on_student_states(case, sigmas):
    """The teacher is never rolled out: it is called exactly once per step, on the state
    the student just reached."""
    student, teacher, noise = _setup(case, sigmas)
    seen = []

    def spy(x, s):
        seen.append(x.detach().clone())
        return teacher(x, s)

    out = dopsd_rollout_loss(student, spy, noise, sigmas)
    assert len(seen) == len(sigmas)
    for k, x in enumerate(seen):
        assert torch.equal(x, out.states[k])


@given(
    case=cases,
    sigmas=sigma_grids(),
    var=st.floats(0.01, 10.0),
)
def test_kl_view_equals_scaled_mse(case, sigmas, var):
    """KL(N(x+Δσ u_t, vI) || N(x+Δσ u_s, vI)) = Δσ²·D·MSE(u_s, u_t)/(2v) per sample."""
    student, teacher, noise = _setup(case, sigmas)
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space="velocity", return_velocities=True)
    nxt = torch.cat([sigmas[1:], torch.zeros(1, dtype=sigmas.dtype)])
    d = noise[0].numel()
    for k in range(len(sigmas)):
        u_s, u_t = out.student_velocity[k], out.teacher_velocity[k]
        kl = dopsd_ref.gaussian_kl_step(u_s, u_t, sigmas[k], nxt[k], variance=var)
        mse = dopsd_ref.per_sample_step_loss(u_s, u_t, out.states[k], sigmas[k], "velocity")
        assert torch.allclose(kl, (nxt[k] - sigmas[k]) ** 2 * d * mse / (2 * var), atol=1e-12, rtol=1e-9)
        assert torch.allclose(kl.mean() * 2 * var / ((nxt[k] - sigmas[k]) ** 2 * d), out.per_step[k], rtol=1e-9)


def test_same_seed_same_results():
    """Two runs with the same seeds give bit-identical losses, states and gradients."""

    def run():
        student, teacher, noise = _setup(("mlp", 3, 4, 7), None)
        out = dopsd_rollout_loss(student, teacher, noise, dopsd_ref.uniform_sigmas(4))
        out.loss.backward()
        return out.per_step, out.states, grads(student)

    a, b = run(), run()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def test_output_layout():
    """per_step is [K] and detached, states is [K+1, B, ...] with states[0] = noise."""
    student, teacher, noise = _setup(("linear", 2, 3, 0), None)
    out = dopsd_rollout_loss(student, teacher, noise.reshape(2, 3, 1), dopsd_ref.zimage_turbo_sigmas(4))
    assert out.per_step.shape == (4,) and not out.per_step.requires_grad
    assert out.states.shape == (5, 2, 3, 1) and torch.equal(out.states[0], noise.reshape(2, 3, 1))
    assert out.loss.shape == () and out.loss.requires_grad


# -----------------------------------------------------------------------------
# Broken variants: every property above must be able to fail
# -----------------------------------------------------------------------------


def broken_teacher_rolled_out(student, teacher, noise, sigmas, space):
    """Slip: the teacher rolls out its own trajectory and the student is graded on it."""
    return _variant(student, teacher, noise, sigmas, space, follow="teacher")


def broken_missing_detach(student, teacher, noise, sigmas, space):
    """Slip: states are not detached, so gradients flow back through the roll-out."""
    return _variant(student, teacher, noise, sigmas, space, detach=False)


def broken_wrong_sign(student, teacher, noise, sigmas, space):
    """Slip: a Z-Image output (−v) used as if it were v for the Euler step."""
    return _variant(student, teacher, noise, sigmas, space, sign=-1.0)


def broken_x0_unweighted(student, teacher, noise, sigmas, space):
    """Slip: 'x0 space' computed as a plain velocity MSE (σ² weighting dropped)."""
    return _variant(student, teacher, noise, sigmas, "velocity", detach=True)


def broken_teacher_with_grad(student, teacher, noise, sigmas, space):
    """Slip: the teacher is called with grad enabled and receives gradients."""
    return _variant(student, teacher, noise, sigmas, space, teacher_grad=True)


def _variant(student, teacher, noise, sigmas, space, follow="student", detach=True, sign=1.0, teacher_grad=False):
    nxt = torch.cat([sigmas[1:], torch.zeros(1, dtype=sigmas.dtype)])
    x, losses, states = noise, [], [noise]
    xt = noise
    for k in range(len(sigmas)):
        if detach:
            x = x.detach()
        s = torch.full((x.shape[0],), float(sigmas[k]), dtype=x.dtype)
        u_s = sign * student(x, s)
        with torch.set_grad_enabled(teacher_grad):
            u_t = teacher(xt if follow == "teacher" else x, s)
        if space == "x0":
            d = x0_from_velocity(x, s, u_s) - x0_from_velocity(x, s, u_t)
        else:
            d = u_s - u_t
        losses.append(d.pow(2).mean())
        if follow == "teacher":
            xt = euler_step(xt, u_t.detach(), sigmas[k], nxt[k])
            x = xt
        else:
            x = euler_step(x, u_s if not detach else u_s.detach(), sigmas[k], nxt[k])
        states.append(x)
    loss = torch.stack(losses)
    return dopsd_ref.DOPSDOutput(loss=loss.mean(), per_step=loss.detach(), states=torch.stack(states).detach())


BROKEN = {
    broken_teacher_rolled_out: check_states_are_sampler_states,
    broken_missing_detach: check_no_backprop_across_steps,
    broken_wrong_sign: check_states_are_sampler_states,
    broken_x0_unweighted: check_x0_is_sigma2_weighted_velocity,
    broken_teacher_with_grad: check_gradient_flow,
}


@pytest.mark.parametrize("variant", list(BROKEN), ids=lambda f: f.__name__)
def test_broken_variants_are_caught(variant):
    """Each deliberately broken implementation fails the property that guards against it
    on a fixed multi-step case (so the property is not vacuous)."""
    case, sigmas = ("mlp", 3, 4, 11), dopsd_ref.uniform_sigmas(4)
    with pytest.raises(AssertionError):
        BROKEN[variant](variant, case, sigmas, "x0")
    # ...while the reference passes the same check on the same case.
    BROKEN[variant](reference_impl, case, sigmas, "x0")


def test_partial_application_keeps_signature():
    """Binding a context with functools.partial gives a valid student (the documented way)."""
    model = lambda x, s, ctx: ctx * x  # noqa: E731
    out = dopsd_rollout_loss(functools.partial(model, ctx=2.0), functools.partial(model, ctx=1.0),
                             torch.ones(2, 3), dopsd_ref.uniform_sigmas(2))
    assert out.loss.item() > 0
