"""The D-OPSD specification: one function per invariant of the roll-out loss.

Every invariant reads the :class:`Evidence` of one implementation — the recorded runs of a
set of :class:`Problem` s (student and teacher fields, start noise, σ grid, loss space, and
optionally the expected values) — and returns one :class:`~.report.CheckResult`. The
conformance runner applies them to the golden problems; tests/core applies the same functions
to randomly generated fields and grids.

Errors are relative max-abs errors ``max|a − b| / max|b|`` (absolute where ``b`` is 0) between
the implementation's value ``a`` (cast to float64) and the expected value ``b``; each
:class:`Evidence` carries the tolerances for its dtype (``loss``, ``per_step``, ``states``,
``final_sample``, ``gradients``, ``time``). Each docstring states what is asserted and the
implementation slip it catches.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..sampling import euler_sample
from .harness import RolloutFn, RunRecord, execute, model_time
from .report import CheckResult

__all__ = [
    "TIME_TOLERANCE",
    "rel_err",
    "describe_exception",
    "Problem",
    "Subject",
    "Evidence",
    "gather",
    "check_all",
    "ROLLOUT_INVARIANTS",
    "INVARIANTS",
    "returns_well_formed",
    "golden_loss",
    "golden_per_step",
    "golden_states",
    "golden_final_sample",
    "golden_gradients",
    "loss_is_mean_of_steps",
    "states_match_plain_sampler",
    "student_velocity_drives_euler_step",
    "output_sign_convention",
    "model_time_convention",
    "teacher_queried_on_student_states",
    "teacher_gets_no_gradient",
    "no_backprop_across_steps",
    "x0_loss_is_sigma2_weighted_velocity_loss",
    "loss_nonnegative_zero_iff_agree",
    "per_sample_batch_mean",
    "deterministic",
]

# Largest accepted |model time − expected| (absolute; model times are in [0, 1]).
TIME_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 1e-2}

# (role, dtype, device) -> a fresh σ-convention network (x [B, ...], σ [B]) -> v
FieldBuilder = Callable[[str, torch.dtype, torch.device], nn.Module]


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max|b|`` in float64 (absolute error if ``b`` is all zero)."""
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    diff = float((a64 - b64).abs().max()) if a64.numel() else 0.0
    scale = float(b64.abs().max()) if b64.numel() else 0.0
    return diff / scale if scale > 0 else diff


def describe_exception(exc: BaseException) -> str:
    """One line: exception type, message and the innermost file:line."""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


@dataclass(frozen=True, eq=False)
class Problem:
    """One roll-out problem an implementation is run on.

    Attributes:
        name: the field and grid, e.g. ``"mlp/zimage4"``; problems that differ only in
            ``space`` share it (the cross-space invariant pairs them by name).
        space: "x0" or "velocity".
        sigmas: [K] float64 CPU grid, ``1 = σ_1 > … > σ_K > 0``.
        noise: [B, ...] float64 start state at σ = 1.
        build: ``(role, dtype, device) -> nn.Module``, a fresh σ-convention student
            (role "student") or teacher (role "teacher") network.
        expected: ``loss``, ``per_step``, ``states``, ``final_sample`` and ``grad.<param>``
            of a correct implementation (None: the golden invariants skip this problem).
    """

    name: str
    space: str
    sigmas: Tensor
    noise: Tensor
    build: FieldBuilder
    expected: Mapping[str, Tensor] | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.space}"


@dataclass(frozen=True, eq=False)
class Subject:
    """An implementation under test and how the kit hands it its models.

    Attributes:
        fn: the implementation in the adapter signature (see :mod:`.harness`).
        convention: "sigma", "zimage" or "flux2".
        dtype: dtype of the models and the noise handed over.
        device: where they live.
        frozen_teacher: hand the teacher over with ``requires_grad=False``.
    """

    fn: RolloutFn
    convention: str
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    frozen_teacher: bool = False

    def run(self, problem: Problem, *, agree: bool = False, batch: slice | None = None) -> RunRecord:
        """Execute the implementation once on ``problem`` (teacher := student if ``agree``,
        only the samples ``batch`` of the noise if given)."""
        student = problem.build("student", self.dtype, self.device)
        teacher = problem.build("student" if agree else "teacher", self.dtype, self.device)
        noise = problem.noise if batch is None else problem.noise[batch]
        noise = noise.to(device=self.device, dtype=self.dtype)
        return execute(self.fn, self.convention, student, teacher, noise, problem.sigmas, problem.space,
                       frozen_teacher=self.frozen_teacher)


@dataclass(frozen=True, eq=False)
class Evidence:
    """Everything the invariants read: the subject, its problems and their recorded runs.

    Attributes:
        subject: the implementation (re-run by some invariants).
        problems: every problem, in run order.
        records: problem -> its recorded run (problems whose run raised are absent).
        errors: one line per failed run.
        primary: the problem the single-case properties run on (non-uniform grid,
            nonlinear field).
        tolerances: quantity -> tolerance (``loss``, ``per_step``, ``states``,
            ``final_sample``, ``gradients``, ``time``).
    """

    subject: Subject
    problems: tuple[Problem, ...]
    records: Mapping[Problem, RunRecord]
    errors: tuple[str, ...]
    primary: Problem
    tolerances: Mapping[str, float]

    def tol(self, quantity: str) -> float:
        return float(self.tolerances[quantity])

    @property
    def spaces(self) -> set[str]:
        return {p.space for p in self.problems}


def gather(subject: Subject, problems: Sequence[Problem], primary: Problem,
           tolerances: Mapping[str, float]) -> Evidence:
    """Run ``subject`` once on every problem; failures are recorded, never raised."""
    records: dict[Problem, RunRecord] = {}
    errors: list[str] = []
    for p in problems:
        try:
            records[p] = subject.run(p)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            errors.append(f"{p}: {describe_exception(exc)}")
    return Evidence(subject, tuple(problems), records, tuple(errors), primary, dict(tolerances))


def _nearest_step(x: Tensor, states: Tensor, k: int) -> tuple[int, float]:
    """Index j < k of the state closest to x, and its relative distance."""
    best, dist = -1, math.inf
    for j in range(k):
        d = rel_err(x, states[j])
        if d < dist:
            best, dist = j, d
    return best, dist


def _sigma_next(sig: Tensor) -> Tensor:
    return torch.cat([sig[1:], sig.new_zeros(1)])


# -----------------------------------------------------------------------------------------
# Well-formed output
# -----------------------------------------------------------------------------------------


def returns_well_formed(ev: Evidence) -> CheckResult:
    """Every run returns a scalar loss, K per-step losses and [K+1, *noise.shape] states
    without raising.

    Catches: crashes, wrong shapes, returning only the last state, a model called outside
    the adapter signature (extra context argument, packed tokens).
    """
    if ev.errors:
        return CheckResult("returns_well_formed", "ERROR", detail=ev.errors[0],
                           where=f"{len(ev.errors)} of {len(ev.problems)} runs failed")
    return CheckResult("returns_well_formed", "PASS", detail=f"{len(ev.problems)} runs, shapes and types as specified")


# -----------------------------------------------------------------------------------------
# Expected values (the goldens, or a reference computed on the same problem)
# -----------------------------------------------------------------------------------------

_GOLDEN_WHAT = {
    "loss": "scalar loss (mean over steps) vs golden",
    "per_step": "per-step losses L_k vs golden",
    "states": "roll-out states x_k vs golden",
    "final_sample": "final sample x_{K+1} vs golden",
    "gradients": "∂loss/∂θ_student vs golden (worst parameter)",
}


def _expected_check(ev: Evidence, quantity: str) -> CheckResult:
    name = f"golden_{quantity}"
    worst, where, no_grad, n = 0.0, "", [], 0
    for p in ev.problems:
        exp = p.expected
        rec = ev.records.get(p)
        if exp is None or rec is None:
            continue
        n += 1
        if quantity == "gradients":
            e = max(rel_err(rec.grads[k], exp[f"grad.{k}"]) for k in rec.grads)
            if rec.backward_by == "none":
                no_grad.append(str(p))
                e = math.inf
        elif quantity == "final_sample":
            e = rel_err(rec.states[-1], exp["final_sample"])
        else:
            e = rel_err(getattr(rec, quantity), exp[quantity])
        if not (e <= worst):  # NaN-safe: NaN also replaces
            worst, where = e, str(p)
    if n == 0:
        return CheckResult(name, "SKIP", detail="no expected values for these problems")
    tol = ev.tol(quantity)
    ok = worst <= tol
    detail = _GOLDEN_WHAT[quantity]
    if no_grad:
        detail = (f"no gradient reached the student in {len(no_grad)} case(s): return a differentiable "
                  "loss or call backward in the implementation")
    return CheckResult(name, "PASS" if ok else "FAIL", worst, tol, detail, where if not ok or worst > 0 else "")


def golden_loss(ev: Evidence) -> CheckResult:
    """The scalar loss equals the expected loss of every problem.

    Catches: any numerical deviation from D-OPSD in the loss (wrong grid handling, wrong
    per-step loss, wrong reduction).
    """
    return _expected_check(ev, "loss")


def golden_per_step(ev: Evidence) -> CheckResult:
    """Each per-step loss L_k equals the expected L_k of every problem.

    Catches: a wrong loss at some step (wrong space, wrong σ, teacher queried elsewhere).
    """
    return _expected_check(ev, "per_step")


def golden_states(ev: Evidence) -> CheckResult:
    """Each roll-out state x_k equals the expected state of every problem.

    Catches: a wrong Euler step (sign, Δσ, velocity of the wrong role), off-policy states.
    """
    return _expected_check(ev, "states")


def golden_final_sample(ev: Evidence) -> CheckResult:
    """The last returned state equals the expected final sample x_{K+1} (σ = 0).

    Catches: a missing last step to σ = 0, a final sample that is not the roll-out's.
    """
    return _expected_check(ev, "final_sample")


def golden_gradients(ev: Evidence) -> CheckResult:
    """∂loss/∂θ_student equals the expected gradient (worst parameter) of every problem; a
    loss that never reaches the student fails.

    Catches: backpropagation through time, a loss scaled by K or B, a detached student, the
    gradient of the wrong quantity.
    """
    return _expected_check(ev, "gradients")


# -----------------------------------------------------------------------------------------
# Properties
# -----------------------------------------------------------------------------------------


def loss_is_mean_of_steps(ev: Evidence) -> CheckResult:
    """The returned loss is the mean of the K per-step losses, in every run.

    Catches: summing over steps (silently multiplies the learning rate by K).
    """
    tol = ev.tol("per_step")
    e, where = 0.0, ""
    for p, r in ev.records.items():
        ee = rel_err(r.loss, r.per_step.mean())
        if not ee <= e:
            e, where = ee, str(p)
    return CheckResult(
        "loss_is_mean_of_steps", "PASS" if e <= tol else "FAIL", e, tol,
        "loss vs mean_k(per_step)" + ("" if e <= tol else ": the loss must be the MEAN over the K steps "
                                      "(a sum scales the learning rate by K)"), where if e > tol else "")


def states_match_plain_sampler(ev: Evidence) -> CheckResult:
    """The training states are exactly the plain few-step Euler sampler's states
    (:func:`dopsd_ref.euler_sample` on the student, same noise and grid): on-policy.

    Catches: off-policy states, an Euler step with the teacher's velocity, a wrong Δσ or sign.
    """
    p, s = ev.primary, ev.subject
    rec = ev.records[p]
    tol = ev.tol("states")
    student = p.build("student", s.dtype, s.device)
    noise = p.noise.to(device=s.device, dtype=s.dtype)
    ref_states = euler_sample(student, noise, p.sigmas, return_states=True)
    e = rel_err(rec.states, ref_states)
    return CheckResult(
        "states_match_plain_sampler", "PASS" if e <= tol else "FAIL", e, tol,
        "states vs dopsd_ref.euler_sample(student) on the same noise and grid"
        + ("" if e <= tol else ": the training states are not the few-step sampler's states (off-policy)"),
        str(p) if e > tol else "")


def _step_velocities(ev: Evidence) -> list[tuple[Tensor, Tensor, float]]:
    """Per step k of the primary run: (implied step velocity, student σ-velocity, Δσ_k)."""
    p = ev.primary
    rec = ev.records[p]
    sig = p.sigmas
    nxt = _sigma_next(sig)
    student64 = p.build("student", torch.float64, torch.device("cpu"))
    out = []
    with torch.no_grad():
        for j in range(sig.shape[0]):
            xk = rec.states[j]
            dsig = float(nxt[j] - sig[j])
            implied = (rec.states[j + 1] - xk) / dsig
            out.append((implied, student64(xk, sig[j].expand(xk.shape[0])), dsig))
    return out


def student_velocity_drives_euler_step(ev: Evidence) -> CheckResult:
    """``(x_{k+1} − x_k)/(σ_{k+1} − σ_k)`` equals the student's σ-velocity at x_k, at every step.

    Catches: an Euler step with the teacher's velocity; Δσ computed from t = 1 − σ.
    """
    rec = ev.records[ev.primary]
    tol_ps, tol_st = ev.tol("per_step"), ev.tol("states")
    worst_v, worst_k, tol_v = 0.0, -1, 0.0
    xmax = float(rec.states.abs().max())
    for j, (implied, v, dsig) in enumerate(_step_velocities(ev)):
        ev_j = rel_err(implied, v)
        tol_j = 2.0 * tol_st * xmax / abs(dsig) / max(float(v.abs().max()), 1e-30) + tol_ps
        if ev_j - tol_j > worst_v - tol_v or worst_k < 0:
            worst_v, worst_k, tol_v = ev_j, j, tol_j
    ok = worst_v <= tol_v
    return CheckResult(
        "student_velocity_drives_euler_step", "PASS" if ok else "FAIL", worst_v, tol_v,
        "(x_{k+1} − x_k)/(σ_{k+1} − σ_k) vs the student's σ-velocity at x_k"
        + ("" if ok else ": the Euler step does not use the student's own velocity (teacher velocity? wrong Δσ?)"),
        f"step {worst_k}" if not ok else "")


def output_sign_convention(ev: Evidence) -> CheckResult:
    """The integrated velocity points the same way as the student's σ-velocity at every step
    (min_k cosine > 0).

    Catches: a Z-Image output (−v) used as the velocity without the minus sign, a negated
    σ-velocity.
    """
    min_cos = math.inf
    for implied, v, _ in _step_velocities(ev):
        cos = float(torch.nn.functional.cosine_similarity(implied.flatten(), v.flatten(), dim=0))
        min_cos = min(min_cos, cos)
    ok = min_cos > 0
    return CheckResult(
        "output_sign_convention", "PASS" if ok else "FAIL", 1.0 - min_cos, 1.0,
        f"min_k cos(step velocity, student σ-velocity) = {min_cos:+.3f}"
        + ("" if ok else ": the integrated velocity has the wrong sign (Z-Image: v = −out)"), "")


def model_time_convention(ev: Evidence) -> CheckResult:
    """Every student and teacher call receives the model time of its step (t = 1 − σ_k for
    zimage, σ_k for sigma and flux2), and the student is queried at every step.

    Catches: σ passed where Z-Image expects t (or the reverse), a skipped step.
    """
    conv = ev.subject.convention
    tol_t = ev.tol("time")
    e, where, missing = 0.0, "", []
    for p, r in ev.records.items():
        csig = p.sigmas
        kk = csig.shape[0]
        for role, calls in (("student", r.student_calls), ("teacher", r.teacher_calls)):
            steps_seen = set()
            for i, call in enumerate(calls):
                j = i if len(calls) == kk else _nearest_step(call.x, r.states, kk)[0]
                steps_seen.add(j)
                want = model_time(csig[j], conv)
                ee = float((call.time - want).abs().max())
                if ee > e:
                    e, where = ee, f"{p} {role} step {j}: got {float(call.time[0]):.6g}, want {float(want):.6g}"
            if role == "student" and len(steps_seen) < kk:
                missing.append(f"{p}: student queried at steps {sorted(steps_seen)} of {kk}")
    ok = e <= tol_t and not missing
    want_s = {"zimage": "t = 1 − σ_k", "sigma": "σ_k", "flux2": "timestep = σ_k"}[conv]
    detail = f"model time received vs {want_s}"
    if e > tol_t:
        detail += ": wrong time convention (σ passed where t = 1 − σ is expected, or the reverse)"
    if missing:
        detail += "; " + missing[0]
    return CheckResult("model_time_convention", "PASS" if ok else "FAIL", e, tol_t, detail, where if not ok else "")


def teacher_queried_on_student_states(ev: Evidence) -> CheckResult:
    """Every teacher input is one of the student's roll-out states, and the teacher grades
    each of the K states: the teacher is never rolled out.

    Catches: a teacher rolled out on its own trajectory, a teacher queried on noised targets.
    """
    tol_st = ev.tol("states")
    e, where, uncovered = 0.0, "", []
    for p, r in ev.records.items():
        kk = p.sigmas.shape[0]
        covered = set()
        for i, call in enumerate(r.teacher_calls):
            j, d = _nearest_step(call.x, r.states, kk)
            if d <= tol_st:
                covered.add(j)
            if d > e:
                e, where = d, f"{p} teacher call {i}"
        if len(covered) < kk:
            uncovered.append(f"{p}: teacher graded student states {sorted(covered)} of {kk}")
    ok = e <= tol_st and not uncovered
    detail = "teacher inputs vs the student's roll-out states (distance to the nearest state)"
    if not ok:
        detail += ": the teacher must grade the STUDENT's states, never roll out its own trajectory"
        if uncovered:
            detail += "; " + uncovered[0]
    return CheckResult("teacher_queried_on_student_states", "PASS" if ok else "FAIL", e, tol_st, detail,
                       where if not ok else "")


def teacher_gets_no_gradient(ev: Evidence) -> CheckResult:
    """No gradient reaches the teacher's parameters, although they are handed over trainable
    (unless the subject freezes the teacher).

    Catches: a teacher called without ``no_grad``/``detach`` — with a trainable teacher
    adapter the optimizer would pull the teacher toward the student.
    """
    e, where = 0.0, ""
    for p, r in ev.records.items():
        for n, g in r.teacher_grads.items():
            if g is not None and float(g.abs().max()) > e:
                e, where = float(g.abs().max()), f"{p} teacher.{n}"
    ok = e == 0.0
    return CheckResult(
        "teacher_gets_no_gradient", "PASS" if ok else "FAIL", e, 0.0,
        "max |∂loss/∂θ_teacher| (teacher handed over with requires_grad="
        + ("False)" if ev.subject.frozen_teacher else "True)")
        + ("" if ok else ": gradients flow into the teacher — call it under torch.no_grad() or detach its output"),
        where)


def no_backprop_across_steps(ev: Evidence) -> CheckResult:
    """No model input's autograd history reaches the output of an earlier model call: the
    states are detached between steps. History that ends at a fresh leaf (a state detached,
    then marked ``requires_grad_(True)`` and split with ``unbind``, as the released Z-Image
    trainer does) is allowed.

    Catches: a missing ``detach`` between steps (backpropagation through the roll-out: other
    gradients, memory growing with K).
    """
    n_bad, where = 0, ""
    for p, r in ev.records.items():
        for role, calls in (("student", r.student_calls), ("teacher", r.teacher_calls)):
            for i, call in enumerate(calls):
                if call.reaches_earlier_output:
                    n_bad += 1
                    where = where or f"{p} {role} call {i}"
    ok = n_bad == 0
    return CheckResult(
        "no_backprop_across_steps", "PASS" if ok else "FAIL", float(n_bad), 0.0,
        "model inputs whose autograd history reaches an earlier model output (count)"
        + ("" if ok else ": states are not detached between steps — gradients flow back through the roll-out"),
        where)


def x0_loss_is_sigma2_weighted_velocity_loss(ev: Evidence) -> CheckResult:
    """``L_k(x0) = σ_k²·L_k(velocity)`` on every problem run in both spaces (x0 = x − σ·v);
    SKIP when only one space was run.

    Catches: an "x0" loss without the σ² weight, x0 computed as x − t·v.
    """
    name = "x0_loss_is_sigma2_weighted_velocity_loss"
    if not ev.spaces >= {"x0", "velocity"}:
        return CheckResult(name, "SKIP", detail="needs both spaces (run with --space both)")
    by_key = {(p.name, p.space): r for p, r in ev.records.items()}
    e, where = 0.0, ""
    for p, rx in ev.records.items():
        rv = by_key.get((p.name, "velocity"))
        if p.space != "x0" or rv is None:
            continue
        ee = rel_err(rx.per_step, p.sigmas ** 2 * rv.per_step)
        if ee > e:
            e, where = ee, p.name
    tol = 2 * ev.tol("per_step")
    ok = e <= tol
    return CheckResult(
        name, "PASS" if ok else "FAIL", e, tol,
        "L_k(x0) vs σ_k²·L_k(velocity)"
        + ("" if ok else ": x0 must be x − σ·v, so the x0 loss is the σ²-weighted velocity loss"),
        where if not ok else "")


def loss_nonnegative_zero_iff_agree(ev: Evidence) -> CheckResult:
    """All L_k ≥ 0; every L_k = 0 when the teacher is the student (same weights and
    context); every L_k > 0 when they differ.

    Catches: signed errors, a loss that ignores the teacher or skips steps.
    """
    tol_ps = ev.tol("per_step")
    rec = ev.records[ev.primary]
    min_ps = min(float(r.per_step.min()) for r in ev.records.values())
    scale = float(rec.per_step.abs().max())
    try:
        agree = ev.subject.run(ev.primary, agree=True)
        zero_err = float(agree.per_step.abs().max()) / max(scale, 1e-300)
        errors_here = ""
    except Exception as exc:  # noqa: BLE001 - reported
        zero_err, errors_here = math.inf, describe_exception(exc)
    positive = bool((rec.per_step > tol_ps * scale).all())
    ok = min_ps >= 0 and zero_err <= tol_ps and positive
    detail = f"min L_k = {min_ps:.3g}; max L_k/scale with teacher = student: {zero_err:.3g}"
    if min_ps < 0:
        detail += ": a negative loss is not a divergence"
    elif zero_err > tol_ps:
        detail += ": the loss must vanish when teacher and student agree" + (f" ({errors_here})" if errors_here else "")
    elif not positive:
        detail += ": some L_k is zero although teacher ≠ student (loss not computed on that step?)"
    return CheckResult("loss_nonnegative_zero_iff_agree", "PASS" if ok else "FAIL", zero_err, tol_ps, detail)


def per_sample_batch_mean(ev: Evidence) -> CheckResult:
    """The batch's per-step losses and loss equal the mean over single-sample runs, and each
    sample's states do not depend on the other samples.

    Catches: a batch sum instead of a mean, cross-sample coupling (shared noise, batch-wide
    normalisation).
    """
    tol_ps, tol_st = ev.tol("per_step"), ev.tol("states")
    p = ev.primary
    rec = ev.records[p]
    try:
        singles = [ev.subject.run(p, batch=slice(i, i + 1)) for i in range(p.noise.shape[0])]
        e_ps = rel_err(torch.stack([s.per_step for s in singles]).mean(0), rec.per_step)
        e_l = rel_err(torch.stack([s.loss for s in singles]).mean(), rec.loss)
        e_st = rel_err(torch.cat([s.states for s in singles], dim=1), rec.states)
        e = max(e_ps, e_l)
        ok = e <= tol_ps and e_st <= tol_st
        detail = (f"batch per-step losses vs mean of single-sample runs (states err {e_st:.3g})"
                  + ("" if ok else ": the loss must be a per-sample mean averaged over the batch "
                     "(no batch sum, no cross-sample coupling)"))
    except Exception as exc:  # noqa: BLE001
        e, ok, detail = math.inf, False, f"single-sample run failed: {describe_exception(exc)}"
    return CheckResult("per_sample_batch_mean", "PASS" if ok else "FAIL", e, tol_ps, detail)


def deterministic(ev: Evidence) -> CheckResult:
    """Two identical calls give bitwise identical loss, L_k, states and gradients, and no
    call modifies ``noise`` or ``sigmas`` in place.

    Catches: hidden RNG use, state carried between calls, in-place edits of the inputs.
    """
    rec = ev.records[ev.primary]
    try:
        again = ev.subject.run(ev.primary)
        diffs = [float((again.loss - rec.loss).abs()), float((again.per_step - rec.per_step).abs().max()),
                 float((again.states - rec.states).abs().max())]
        diffs += [float((again.grads[n] - rec.grads[n]).abs().max()) for n in rec.grads]
        e = max(diffs)
        mutated = [str(p) for p, r in ev.records.items() if r.inputs_mutated] + (["repeat"] if again.inputs_mutated else [])
        ok = e == 0.0 and not mutated
        detail = "max |difference| between two identical calls (loss, per-step, states, gradients)"
        if e != 0.0:
            detail += ": results depend on hidden state or randomness"
        if mutated:
            detail += f"; the call modified noise/sigmas in place ({mutated[0]})"
    except Exception as exc:  # noqa: BLE001
        e, ok, detail = math.inf, False, f"repeat run failed: {describe_exception(exc)}"
    return CheckResult("deterministic", "PASS" if ok else "FAIL", e, 0.0, detail)


# The roll-out invariants, in report order.
ROLLOUT_INVARIANTS: tuple[Callable[[Evidence], CheckResult], ...] = (
    returns_well_formed,
    golden_loss,
    golden_per_step,
    golden_states,
    golden_final_sample,
    golden_gradients,
    loss_is_mean_of_steps,
    states_match_plain_sampler,
    student_velocity_drives_euler_step,
    output_sign_convention,
    model_time_convention,
    teacher_queried_on_student_states,
    teacher_gets_no_gradient,
    no_backprop_across_steps,
    x0_loss_is_sigma2_weighted_velocity_loss,
    loss_nonnegative_zero_iff_agree,
    per_sample_batch_mean,
    deterministic,
)
INVARIANTS: tuple[str, ...] = tuple(f.__name__ for f in ROLLOUT_INVARIANTS)


def check_all(ev: Evidence) -> tuple[CheckResult, ...]:
    """Every roll-out invariant on ``ev``; if some run failed, the others are SKIPped."""
    first = returns_well_formed(ev)
    if first.status != "PASS":
        return (first, *(CheckResult(n, "SKIP", detail="not run: the implementation failed") for n in INVARIANTS[1:]))
    return (first, *(inv(ev) for inv in ROLLOUT_INVARIANTS[1:]))
