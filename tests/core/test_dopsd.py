"""The specification of D-OPSD: the conformance invariants on random fields, and the reference's own properties.

Every invariant of the roll-out loss is written once, in
:mod:`dopsd_ref.conformance.invariants`; here the same functions run on hypothesis-generated
fields and grids (dopsd_ref must pass all of them) and on the one gallery of broken
implementations, :mod:`dopsd_ref.conformance.gallery` (each slip must fail the invariant
named for it) — so every invariant is shown able to fail.
"""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from core_fixtures import cases, core_evidence, grads, make_field, sigma_grids

import dopsd_ref
from dopsd_ref import dopsd_rollout_loss, euler_sample
from dopsd_ref.conformance import gallery as G
from dopsd_ref.conformance.invariants import INVARIANTS, check_all


def _setup(case, sigmas):
    kind, batch, dim, seed = case
    student = make_field(kind, dim, seed)
    teacher = make_field(kind, dim, seed + 1)
    noise = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return student, teacher, noise


def reference_impl(student, teacher, noise, sigmas, space):
    """dopsd_ref in the conformance adapter signature (σ-convention)."""
    return dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)


def _failed(results):
    return [r.line() for r in results if not r.ok]


@given(case=cases, sigmas=sigma_grids())
def test_dopsd_ref_satisfies_every_invariant(case, sigmas):
    """dopsd_ref, run through the conformance harness on a random field, batch and grid in
    both loss spaces, passes every invariant of dopsd_ref.conformance.invariants (expected
    values: the naive reference of core_fixtures); each invariant's docstring states it."""
    results = check_all(core_evidence(reference_impl, "sigma", case, sigmas))
    assert [r.name for r in results] == list(INVARIANTS)
    assert not _failed(results), _failed(results)


SLIP_CASE = ("mlp", 3, 4, 11)


@pytest.mark.parametrize("slip", G.SLIPS, ids=lambda e: e.name)
def test_broken_variants_are_caught(slip):
    """Each broken implementation of the gallery fails the invariant named for it on a fixed
    multi-step core problem (so the invariant is not vacuous), while dopsd_ref passes it."""
    sigmas = dopsd_ref.uniform_sigmas(4)
    broken = {r.name: r for r in check_all(core_evidence(slip.fn, slip.convention, SLIP_CASE, sigmas))}
    assert broken[slip.invariant].status in ("FAIL", "ERROR"), broken[slip.invariant].line()
    ref = {r.name: r for r in check_all(core_evidence(reference_impl, "sigma", SLIP_CASE, sigmas))}
    assert ref[slip.invariant].status == "PASS", ref[slip.invariant].line()


@pytest.mark.parametrize("entry", G.CONFORMING, ids=lambda e: e.name)
def test_correct_gallery_loops_pass(entry):
    """The gallery's correct loops (σ and Z-Image convention, and the released Z-Image
    trainer's detach + requires_grad_(True) + unbind feeding) pass every invariant."""
    results = check_all(core_evidence(entry.fn, entry.convention, SLIP_CASE, dopsd_ref.uniform_sigmas(4)))
    assert not _failed(results), _failed(results)


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_no_gradient_reaches_the_noise(case, sigmas, space):
    """The start state is not a parameter: with a noise that requires grad, backward leaves
    its gradient empty (the roll-out starts from a detached copy)."""
    student, teacher, noise = _setup(case, sigmas)
    noise = noise.clone().requires_grad_(True)
    dopsd_rollout_loss(student, teacher, noise, sigmas, space=space).loss.backward()
    assert noise.grad is None, "gradient flowed into the noise"


# -----------------------------------------------------------------------------
# Further invariants of the reference implementation
# -----------------------------------------------------------------------------


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_loss_nonnegative_and_zero_iff_roles_agree(case, sigmas, space):
    """The loss and every L_k are ≥ 0; every L_k is exactly 0 when teacher and student agree
    on every visited state, and every L_k is > 0 when they differ on every visited state."""
    student, teacher, noise = _setup(case, sigmas)
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space=space)
    assert out.loss.item() >= 0 and (out.per_step >= 0).all()
    same = dopsd_rollout_loss(student, student, noise, sigmas, space=space)
    assert same.loss.item() == 0.0 and (same.per_step == 0).all()
    shifted = lambda x, s: student(x, s) + 1e-3  # noqa: E731  disagree everywhere
    differ = dopsd_rollout_loss(student, shifted, noise, sigmas, space=space)
    assert differ.loss.item() > 0 and (differ.per_step > 0).all(), differ.per_step


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


def test_output_layout():
    """per_step is [K] and detached, states is [K+1, B, ...] with states[0] = noise."""
    student, teacher, noise = _setup(("linear", 2, 3, 0), None)
    out = dopsd_rollout_loss(student, teacher, noise.reshape(2, 3, 1), dopsd_ref.zimage_turbo_sigmas(4))
    assert out.per_step.shape == (4,) and not out.per_step.requires_grad
    assert out.states.shape == (5, 2, 3, 1) and torch.equal(out.states[0], noise.reshape(2, 3, 1))
    assert out.loss.shape == () and out.loss.requires_grad


def test_partial_application_keeps_signature():
    """Binding a context with functools.partial gives a valid student (the documented way)."""
    model = lambda x, s, ctx: ctx * x  # noqa: E731
    out = dopsd_rollout_loss(functools.partial(model, ctx=2.0), functools.partial(model, ctx=1.0),
                             torch.ones(2, 3), dopsd_ref.uniform_sigmas(2))
    assert out.loss.item() > 0


# -----------------------------------------------------------------------------
# Independent oracles: the exact straight-path field, a spy teacher
# -----------------------------------------------------------------------------


@given(case=cases, sigmas=sigma_grids(max_steps=8), x_dependent=st.booleans())
def test_straight_path_field_lands_on_x0(case, sigmas, x_dependent):
    """For the exact straight-path field of a pair (x0, ε) — the constant v = ε − x0, or
    v(x, σ) = (x − x0)/σ, which equals it on the path — the roll-out's and the sampler's
    states are x_k = (1 − σ_k)·x0 + σ_k·ε on any valid grid, and the final state is x0.
    The oracle is written here, independent of dopsd_ref's Euler step."""
    _, batch, dim, seed = case
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    if x_dependent:
        field = lambda x, s: (x - x0) / s[:, None]  # noqa: E731
    else:
        field = lambda x, s: (eps - x0).clone()  # noqa: E731
    want = torch.stack([(1 - s) * x0 + s * eps for s in sigmas.tolist()] + [x0])  # [K+1, B, D]
    rollout_states = dopsd_rollout_loss(field, field, eps, sigmas).states
    sampler_states = euler_sample(field, eps, sigmas, return_states=True)
    for states in (rollout_states, sampler_states):
        torch.testing.assert_close(states, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(states[-1], x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(euler_sample(field, eps, sigmas), x0, atol=1e-12, rtol=0)


@given(case=cases, sigmas=sigma_grids(), space=st.sampled_from(["x0", "velocity"]))
def test_teacher_runs_with_grad_disabled(case, sigmas, space):
    """The teacher is evaluated with autograd off: a spy teacher sees
    torch.is_grad_enabled() == False at every one of its K calls (the student sees True),
    with the default single graph and with per-step backward."""
    student, teacher, noise = _setup(case, sigmas)
    for per_step_backward in (False, True):
        seen = {"teacher": [], "student": []}

        def spy(role, model):
            def call(x, s):
                seen[role].append(torch.is_grad_enabled())
                return model(x, s)
            return call

        dopsd_rollout_loss(spy("student", student), spy("teacher", teacher), noise, sigmas, space=space,
                           per_step_backward=per_step_backward)
        assert seen["teacher"] == [False] * len(sigmas), seen
        assert seen["student"] == [True] * len(sigmas), seen
