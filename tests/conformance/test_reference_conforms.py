"""dopsd_ref itself, wrapped in each convention, passes the whole conformance kit."""

from __future__ import annotations

import pytest

from dopsd_ref.conformance import INVARIANTS, run_conformance, run_ema_conformance

EX = "dopsd_ref.conformance.examples"


@pytest.mark.parametrize("convention", ["sigma", "zimage", "flux2"])
def test_dopsd_ref_conforms_in_every_convention(convention: str, dopsd_conformance) -> None:
    """Invariant: the reference, handed the golden models as (x, σ)->v, (x, t=1−σ)->−v or
    (x, timestep=σ)->v, matches every golden vector and every property in float32."""
    report = dopsd_conformance(f"{EX}.{convention}:rollout", convention=convention)
    assert [r.name for r in report.results] == list(INVARIANTS)
    assert all(r.status == "PASS" for r in report.results)


@pytest.mark.parametrize(
    "spec, convention",
    [
        (f"{EX}.zimage_trainer:rollout", "zimage"),
        (f"{EX}.flux2_trainer:rollout", "flux2"),
        (f"{EX}.sigma:rollout_per_step_backward", "sigma"),
    ],
)
def test_trainer_style_examples_conform(spec: str, convention: str, dopsd_conformance) -> None:
    """Invariant: independent hand-written trainer loops (Z-Image time/sign, FLUX.2 packed
    tokens with ×1000 timesteps, backward inside the call) are recognised as D-OPSD."""
    dopsd_conformance(spec, convention=convention)


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_reference_conforms_at_other_dtypes(dtype: str) -> None:
    """Invariant: the manifest's float64 and bf16 tolerances accept the reference run in
    that dtype (they were measured on it, with a margin)."""
    report = run_conformance(f"{EX}.zimage:rollout", convention="zimage", dtype=dtype)
    assert report.passed, report.format()


def test_single_space_runs_and_skips_cross_space_check() -> None:
    """Invariant: with one loss space the σ²-weighting check cannot run and is SKIPped, not
    failed; the golden vectors of that space still must match."""
    report = run_conformance(f"{EX}.flux2:rollout", convention="flux2", space="x0")
    assert report.passed, report.format()
    assert report["x0_loss_is_sigma2_weighted_velocity_loss"].status == "SKIP"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_ema_conforms(dtype: str, dopsd_conformance) -> None:
    """Invariant: dopsd_ref.ema_update_ moves the teacher a fraction 1 − d toward the
    student, matches the EMA goldens, keeps/copies at d = 1/0 and builds no graph."""
    dopsd_conformance.ema(f"{EX}.ema:ema", dtype=dtype)


def test_report_lists_error_and_tolerance_per_invariant() -> None:
    """Invariant: the printed report has one PASS/FAIL line per invariant with the measured
    error and the tolerance, and a verdict line."""
    text = run_conformance(f"{EX}.sigma:rollout", space="velocity").format()
    lines = text.splitlines()
    assert len(lines) == len(INVARIANTS) + 2
    assert all(" err=" in ln and " tol=" in ln for ln in lines[1:-1])
    assert lines[-1].endswith("CONFORMS")
    assert run_ema_conformance(f"{EX}.ema:ema").passed
