"""A gallery of broken implementations: each slip fails the invariant that names it."""

from __future__ import annotations

import pytest

from dopsd_ref.conformance import ConformanceError, run_conformance, run_ema_conformance

from . import gallery as G

CASES = [
    # (broken implementation, convention it is written in, invariant that must name it)
    (G.teacher_rolled_out, "sigma", "teacher_queried_on_student_states"),
    (G.missing_detach, "sigma", "no_backprop_across_steps"),
    (G.euler_teacher_velocity, "sigma", "student_velocity_drives_euler_step"),
    (G.zimage_wrong_sign, "zimage", "output_sign_convention"),
    (G.t_as_sigma, "zimage", "model_time_convention"),
    (G.x0_without_sigma_weight, "sigma", "x0_loss_is_sigma2_weighted_velocity_loss"),
    (G.teacher_receives_grad, "sigma", "teacher_gets_no_gradient"),
    (G.sum_over_steps, "sigma", "loss_is_mean_of_steps"),
    (G.batch_sum, "sigma", "per_sample_batch_mean"),
    (G.nondeterministic, "sigma", "deterministic"),
    (G.raises, "sigma", "returns_well_formed"),
]


def test_gallery_loop_without_slips_conforms() -> None:
    """Invariant: the gallery's loop is correct when no slip is switched on (in both the
    σ and the Z-Image convention), so every failure below is caused by its slip alone."""
    assert run_conformance(G.correct).passed
    assert run_conformance(G.correct_zimage, convention="zimage").passed


@pytest.mark.parametrize("impl, convention, invariant", CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_implementation_fails_named_invariant(impl, convention: str, invariant: str) -> None:
    """Invariant: a known slip makes the kit fail, and the failure names the invariant the
    slip violates (teacher never rolled out, states detached, Euler with the student's
    velocity, Z-Image sign and time, σ² weighting, no teacher gradient, step mean, batch
    mean, determinism, well-formed output)."""
    report = run_conformance(impl, convention=convention)
    assert not report.passed
    assert invariant in report.failed, report.format()
    assert any(ln.startswith("FAIL") or ln.startswith("ERROR") for ln in report.format().splitlines()
               if invariant in ln)
    with pytest.raises(ConformanceError, match=invariant):
        report.assert_passed()


@pytest.mark.parametrize(
    "impl, invariant",
    [(G.ema_wrong_direction, "ema_direction"), (G.ema_moves_student, "ema_direction"),
     (G.ema_with_graph, "ema_no_grad")],
    ids=["ema_wrong_direction", "ema_moves_student", "ema_with_graph"],
)
def test_broken_ema_fails_named_invariant(impl, invariant: str) -> None:
    """Invariant: the EMA moves the teacher (not the student) a fraction 1 − d toward the
    student, without building an autograd graph; swapped weights, a moving student or an
    update outside no_grad are each named."""
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
