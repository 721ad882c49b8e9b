"""The teacher pre-flight check: what it measures, on which states, and its margin rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from core_fixtures import cases, make_field, sigma_grids

from dopsd_ref import euler_sample, teacher_preflight
from dopsd_ref.conventions import x0_from_velocity
from dopsd_ref.preflight import paired_comparison, preflight_verdict, student_t_quantile, x0_distances


def _setup(case):
    kind, batch, dim, seed = case
    batch = max(batch, 2)
    g = torch.Generator().manual_seed(seed + 2)
    student = make_field(kind, dim, seed)
    teacher = make_field(kind, dim, seed + 1)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    target = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return student, teacher, noise, target


def _oracle(target):
    """A teacher whose x0 prediction is exactly the target: v = (x − y)/σ."""
    return lambda x, s: (x - target) / s[:, None]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=cases, sigmas=sigma_grids())
def test_states_are_the_students_sampler_states(case, sigmas):
    """The pre-flight grades the states training visits: the student's own Euler roll-out,
    whatever the teacher does."""
    student, teacher, noise, target = _setup(case)
    rep = teacher_preflight(student, teacher, noise, sigmas, target)
    torch.testing.assert_close(rep.states, euler_sample(student, noise, sigmas, return_states=True), rtol=0, atol=0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=cases, sigmas=sigma_grids())
def test_distances_are_x0_mse_to_the_target(case, sigmas):
    """d[k, b] = mean over dims of (x − σ_k·v(x, σ_k) − y)² at the student's state k, for both roles."""
    student, teacher, noise, target = _setup(case)
    rep = teacher_preflight(student, teacher, noise, sigmas, target)
    for k, sig in enumerate(sigmas.tolist()):
        x = rep.states[k]
        s = torch.full((x.shape[0],), sig, dtype=x.dtype)
        with torch.no_grad():
            for fn, d in ((student, rep.d_student), (teacher, rep.d_teacher)):
                want = ((x0_from_velocity(x, s, fn(x, s)) - target) ** 2).mean(1)
                torch.testing.assert_close(d[k], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=cases, sigmas=sigma_grids())
def test_oracle_teacher_is_better_and_a_copy_of_the_student_is_not(case, sigmas):
    """A teacher that predicts the target exactly beats the student at every step and overall;
    a teacher identical to the student is never better (its paired difference is −m·d_s ≤ 0).
    (Eight samples and a target far from the fields' predictions, so that the student's
    distances vary little across samples and the interval is decisive.)"""
    kind, _, dim, seed = case
    student, _, noise, target = _setup((kind, 8, dim, seed))
    target = target + 10.0
    good = teacher_preflight(student, _oracle(target), noise, sigmas, target, margin=0.5)
    assert good.better and all(c.better for c in good.steps)
    assert torch.all(good.d_teacher < 1e-20) and good.verdict == "teacher better"
    same = teacher_preflight(student, student, noise, sigmas, target, margin=0.0)
    assert not same.better and not any(c.better for c in same.steps)
    assert same.verdict == "teacher not better"


def test_margin_rule_is_the_lower_end_of_a_paired_t_interval():
    """better ⇔ mean(Δ) − t_{0.975, n−1}·sd(Δ)/√n > 0 with Δ = (1 − m)·d_s − d_t; pairing matters:
    a constant per-sample offset between the roles is detected although the spread across
    samples is much larger than the offset."""
    ds = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    dt = ds - 0.2  # teacher always 0.2 closer; across-sample spread ≈ 1.9
    c = paired_comparison(ds, dt, margin=0.0)
    assert c.better and c.n == 6
    assert math.isclose(c.diff_mean, 0.2, rel_tol=1e-9) and math.isclose(c.diff_low, 0.2, rel_tol=1e-6)
    noisy = dt + torch.tensor([0.3, -0.3, 0.3, -0.3, 0.3, -0.3], dtype=torch.float64)
    c2 = paired_comparison(ds, noisy, margin=0.0)
    delta = ds.double() - noisy.double()
    half = 2.5706 * float(delta.std()) / math.sqrt(6)  # t_{0.975, 5}
    assert math.isclose(c2.diff_low, float(delta.mean()) - half, rel_tol=1e-3)
    assert not c2.better  # mean 0.2 with half-width ≈ 0.34
    # The margin: 10% closer is required; 0.2 of a mean distance of 3.5 is only 5.7%.
    assert not paired_comparison(ds, dt, margin=0.1).better
    assert math.isclose(paired_comparison(ds, dt, margin=0.1).gain, 0.2 / 3.5, rel_tol=1e-9)


@pytest.mark.parametrize("p, dof, table", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764),
                                           (0.975, 5, 2.5706), (0.975, 10, 2.2281), (0.975, 30, 2.0423),
                                           (0.95, 5, 2.0150), (0.995, 10, 3.1693)])
def test_student_t_quantile_matches_the_table(p, dof, table):
    """The interval's t quantile agrees with tabulated Student-t values (to 1e-3)."""
    assert abs(student_t_quantile(p, dof) - table) < 1e-3


def test_callable_target_gets_the_step_and_state_and_bad_input_is_named():
    """A callable target is asked once per step with (k, state, σ); a wrong target shape, a
    single sample or an invalid margin is a clear error."""
    student, teacher, noise, target = _setup(("linear", 3, 4, 0))
    sig = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    seen = []

    def target_fn(k, x, s):
        seen.append((k, float(s[0])))
        return target

    rep = teacher_preflight(student, teacher, noise, sig, target_fn)
    assert seen == [(0, 1.0), (1, 0.6), (2, 0.3)]
    torch.testing.assert_close(rep.d_student, teacher_preflight(student, teacher, noise, sig, target).d_student)
    with pytest.raises(ValueError, match="target at step 0 has shape"):
        teacher_preflight(student, teacher, noise, sig, target[:, :2])
    with pytest.raises(ValueError, match="B >= 2"):
        teacher_preflight(student, teacher, noise[:1], sig, target[:1])
    with pytest.raises(ValueError, match="margin"):
        teacher_preflight(student, teacher, noise, sig, target, margin=1.0)
    assert "verdict: teacher" in rep.summary() and rep.to_dict()["overall"]["n"] == 3


@settings(max_examples=15, deadline=None, derandomize=True)
@given(case=cases, sigmas=sigma_grids())
def test_pooled_batches_give_the_same_verdict_as_one_batch(case, sigmas):
    """Distances are per sample, so measuring a batch in two parts and pooling them
    (:func:`preflight_verdict`) gives the report of the whole batch (to float64 rounding of the
    batched model calls)."""
    kind, _, dim, seed = case
    student, teacher, noise, target = _setup((kind, 5, dim, seed))
    whole = teacher_preflight(student, teacher, noise, sigmas, target)
    parts = [x0_distances(student, teacher, noise[sl], sigmas, target[sl]) for sl in (slice(0, 2), slice(2, 5))]
    pooled = preflight_verdict(torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1), sigmas)
    torch.testing.assert_close(pooled.d_student, whole.d_student, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled.d_teacher, whole.d_teacher, rtol=1e-12, atol=1e-12)
    for a, b in zip(pooled.steps + (pooled.overall,), whole.steps + (whole.overall,)):
        assert a.better == b.better and math.isclose(a.diff_low, b.diff_low, rel_tol=1e-9, abs_tol=1e-12)
    assert pooled.states is None and pooled.sigmas == whole.sigmas
    with pytest.raises(ValueError, match=f"K={sigmas.numel() + 1}"):
        preflight_verdict(parts[1][0], parts[1][1], sigmas.tolist() + [0.01])
