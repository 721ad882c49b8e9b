"""A gallery of broken implementations: each slip fails the invariant that names it."""

from __future__ import annotations

import pytest

from dopsd_ref.conformance import ConformanceError, run_conformance, run_ema_conformance
from dopsd_ref.conformance import gallery as G


@pytest.mark.parametrize("entry", G.CONFORMING, ids=lambda e: e.name)
def test_gallery_loop_without_slips_conforms(entry: G.Slip) -> None:
    """Invariant: the gallery's loop is correct when no slip is switched on (in the σ and
    the Z-Image convention, and fed as the released Z-Image trainer feeds its model: state
    detached, marked requires_grad_(True) and split with unbind), so every failure below is
    caused by its slip alone."""
    report = run_conformance(entry.fn, convention=entry.convention)
    assert report.passed, report.format()


@pytest.mark.parametrize("slip", G.SLIPS, ids=lambda e: e.name)
def test_broken_implementation_fails_named_invariant(slip: G.Slip) -> None:
    """Invariant: a known slip makes the kit fail, and the failure names the invariant the
    slip violates (teacher never rolled out, states detached, Euler with the student's
    velocity, Z-Image sign and time, σ² weighting, no teacher gradient, step mean, batch
    mean, determinism, well-formed output)."""
    impl, convention, invariant = slip.fn, slip.convention, slip.invariant
    report = run_conformance(impl, convention=convention)
    assert not report.passed
    assert invariant in report.failed, report.format()
    assert any(ln.startswith("FAIL") or ln.startswith("ERROR") for ln in report.format().splitlines()
               if invariant in ln)
    with pytest.raises(ConformanceError, match=invariant):
        report.assert_passed()


@pytest.mark.parametrize("slip", G.EMA_SLIPS, ids=lambda e: e.name)
def test_broken_ema_fails_named_invariant(slip: G.EmaSlip) -> None:
    """Invariant: the EMA moves the teacher (not the student) a fraction 1 − d toward the
    student, without building an autograd graph; swapped weights, a moving student or an
    update outside no_grad are each named."""
    impl, invariant = slip.fn, slip.invariant
    report = run_ema_conformance(impl)
    assert invariant in report.failed, report.format()
    with pytest.raises(ConformanceError, match=invariant):
        report.assert_passed()


def test_teacher_rollout_leaves_student_states_correct() -> None:
    """Invariant: the kit tells slips apart — a teacher rolled out on its own states leaves
    the student's (on-policy) states intact, so only the teacher check and the losses fail."""
    report = run_conformance(G.teacher_rolled_out, space="x0")
    assert report["golden_states"].status == "PASS"
    assert report["states_match_plain_sampler"].status == "PASS"
    assert report["teacher_queried_on_student_states"].status == "FAIL"


def test_frozen_teacher_option_changes_only_the_teacher_gradient_check() -> None:
    """Invariant: by default the kit hands over a trainable teacher, so an implementation
    that does not stop gradients at the teacher is named; with frozen_teacher=True the
    teacher is frozen and the same code conforms (its student gradients were right)."""
    assert run_conformance(G.teacher_receives_grad, space="x0").failed == ["teacher_gets_no_gradient"]
    assert run_conformance(G.teacher_receives_grad, space="x0", frozen_teacher=True).passed


def test_adapter_misuse_is_reported_with_a_clear_message() -> None:
    """Invariant: an adapter that calls the kit's model outside the documented signature
    (extra context argument, packed tokens instead of [B, C, H, W]) is reported as an
    ERROR of returns_well_formed whose message says what to fix — the kit never crashes."""

    def passes_context(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
        return G.rollout(lambda x, s: student(x, s, "caption"), teacher, noise, sigmas, space)

    def passes_tokens(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
        return G.rollout(lambda x, s: student(x.flatten(2).transpose(1, 2), s), teacher, noise, sigmas, space)

    r1 = run_conformance(passes_context, space="x0")
    assert r1.failed == ["returns_well_formed"] and "bind contexts" in r1["returns_well_formed"].detail
    r2 = run_conformance(passes_tokens, space="x0")
    assert r2.failed == ["returns_well_formed"] and "unpack" in r2["returns_well_formed"].detail


def test_kit_restores_the_thread_setting() -> None:
    """Invariant: the kit runs single-threaded but leaves torch's thread count as it found it."""
    import torch

    before = torch.get_num_threads()
    run_conformance(G.correct, space="velocity")
    assert torch.get_num_threads() == before
