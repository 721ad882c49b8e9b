"""The conformance run: golden comparisons plus the property suite, one result per invariant.

Every error is a *relative max-abs error*  ``max|a − b| / max|b|``  (absolute where ``b`` is
0) between the implementation's value ``a`` (cast to float64) and the expected value ``b``.
Golden tolerances come from ``manifest.json`` (measured by :mod:`.make_golden` on the
reference itself, with a margin); property tolerances are derived from them.

Invariants (stable names; see README.md for what each catches):

    returns_well_formed                  golden_loss / golden_per_step / golden_states
    golden_final_sample / golden_gradients
    loss_is_mean_of_steps                states_match_plain_sampler
    student_velocity_drives_euler_step   output_sign_convention
    model_time_convention                teacher_queried_on_student_states
    teacher_gets_no_gradient             no_backprop_across_steps
    x0_loss_is_sigma2_weighted_velocity_loss
    loss_nonnegative_zero_iff_agree      per_sample_batch_mean      deterministic
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from ..sampling import euler_sample
from .golden import PROPERTY_CASE, CaseId, Golden, all_cases, dtype_from_name, dtype_name, load_golden
from .harness import CONVENTIONS, RolloutFn, RunRecord, execute, load_callable, model_time, single_thread
from .report import CheckResult, ConformanceReport

__all__ = ["run_conformance", "rel_err", "INVARIANTS", "TIME_TOLERANCE"]

INVARIANTS: tuple[str, ...] = (
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
)

# Largest accepted |model time − expected| (absolute; model times are in [0, 1]).
TIME_TOLERANCE: dict[str, float] = {"float64": 1e-12, "float32": 2e-6, "bfloat16": 1e-2}


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a − b| / max|b|`` in float64 (absolute error if ``b`` is all zero)."""
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    diff = float((a64 - b64).abs().max()) if a64.numel() else 0.0
    scale = float(b64.abs().max()) if b64.numel() else 0.0
    return diff / scale if scale > 0 else diff


@dataclass(frozen=True)
class _Ctx:
    fn: RolloutFn
    convention: str
    dtype: torch.dtype
    dname: str
    device: torch.device
    golden: Golden
    frozen_teacher: bool = False

    def tol(self, quantity: str) -> float:
        return self.golden.tolerance(self.dname, quantity)

    def run(self, case: CaseId, *, agree: bool = False, batch: slice | None = None) -> RunRecord:
        """Execute the implementation on a golden case (optionally teacher := student, or a sub-batch)."""
        student = self.golden.build(case.field, "student", self.dtype, self.device)
        teacher = self.golden.build(case.field, "student" if agree else "teacher", self.dtype, self.device)
        noise = self.golden.noise()
        if batch is not None:
            noise = noise[batch]
        noise = noise.to(device=self.device, dtype=self.dtype)
        return execute(self.fn, self.convention, student, teacher, noise, self.golden.sigmas(case.schedule), case.space,
                       frozen_teacher=self.frozen_teacher)


def _describe(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}".replace("\n", " ")


def _nearest_step(x: Tensor, states: Tensor, k: int) -> tuple[int, float]:
    """Index j < k of the state closest to x, and its relative distance."""
    best, dist = -1, math.inf
    for j in range(k):
        d = rel_err(x, states[j])
        if d < dist:
            best, dist = j, d
    return best, dist


def _golden_suite(ctx: _Ctx, cases: Sequence[CaseId], records: dict[CaseId, RunRecord]) -> list[CheckResult]:
    worst: dict[str, tuple[float, str]] = {q: (0.0, "") for q in ("loss", "per_step", "states", "final_sample", "gradients")}
    no_grad_cases: list[str] = []
    for case in cases:
        rec = records[case]
        exp = ctx.golden.expected(case)
        errs = {
            "loss": rel_err(rec.loss, exp["loss"]),
            "per_step": rel_err(rec.per_step, exp["per_step"]),
            "states": rel_err(rec.states, exp["states"]),
            "final_sample": rel_err(rec.states[-1], exp["final_sample"]),
            "gradients": max(rel_err(rec.grads[n], exp[f"grad.{n}"]) for n in rec.grads),
        }
        if rec.backward_by == "none":
            no_grad_cases.append(str(case))
            errs["gradients"] = math.inf
        for q, e in errs.items():
            if not (e <= worst[q][0]):  # NaN-safe: NaN also replaces
                worst[q] = (e, str(case))
    what = {
        "loss": "scalar loss (mean over steps) vs golden",
        "per_step": "per-step losses L_k vs golden",
        "states": "roll-out states x_k vs golden",
        "final_sample": "final sample x_{K+1} vs golden",
        "gradients": "∂loss/∂θ_student vs golden (worst parameter)",
    }
    out = []
    for q, (e, where) in worst.items():
        tol = ctx.tol(q)
        ok = e <= tol
        detail = what[q]
        if q == "gradients" and no_grad_cases:
            detail = (f"no gradient reached the student in {len(no_grad_cases)} case(s): return a differentiable "
                      "loss or call backward in the implementation")
        out.append(CheckResult(f"golden_{q}", "PASS" if ok else "FAIL", e, tol, detail, where if not ok or e > 0 else ""))
    return out


def _property_suite(
    ctx: _Ctx, spaces: Sequence[str], records: dict[CaseId, RunRecord], errors: list[str]
) -> list[CheckResult]:
    field_kind, sched = PROPERTY_CASE
    primary_space = "x0" if "x0" in spaces else spaces[0]
    pcase = CaseId(field_kind, sched, primary_space)
    rec = records[pcase]
    sig = ctx.golden.sigmas(sched)  # [K] float64
    k = sig.shape[0]
    sig_next = torch.cat([sig[1:], sig.new_zeros(1)])
    tol_ps, tol_st = ctx.tol("per_step"), ctx.tol("states")
    results: list[CheckResult] = []

    # loss_is_mean_of_steps — over every recorded run.
    e, where = 0.0, ""
    for c, r in records.items():
        ee = rel_err(r.loss, r.per_step.mean())
        if not ee <= e:
            e, where = ee, str(c)
    results.append(CheckResult(
        "loss_is_mean_of_steps", "PASS" if e <= tol_ps else "FAIL", e, tol_ps,
        "loss vs mean_k(per_step)" + ("" if e <= tol_ps else ": the loss must be the MEAN over the K steps "
                                       "(a sum scales the learning rate by K)"), where if e > tol_ps else ""))

    # states_match_plain_sampler
    student_dt = ctx.golden.build(field_kind, "student", ctx.dtype, ctx.device)
    noise_dt = ctx.golden.noise().to(device=ctx.device, dtype=ctx.dtype)
    ref_states = euler_sample(student_dt, noise_dt, sig, return_states=True)
    e = rel_err(rec.states, ref_states)
    results.append(CheckResult(
        "states_match_plain_sampler", "PASS" if e <= tol_st else "FAIL", e, tol_st,
        "states vs dopsd_ref.euler_sample(student) on the same noise and grid"
        + ("" if e <= tol_st else ": the training states are not the few-step sampler's states (off-policy)"),
        str(pcase) if e > tol_st else ""))

    # student_velocity_drives_euler_step / output_sign_convention
    student64 = ctx.golden.build(field_kind, "student")
    worst_v, worst_k, min_cos = 0.0, -1, math.inf
    tol_v = 0.0
    with torch.no_grad():
        for j in range(k):
            xk = rec.states[j]
            dsig = float(sig_next[j] - sig[j])
            implied = (rec.states[j + 1] - xk) / dsig
            v = student64(xk, sig[j].expand(xk.shape[0]))
            vmax = float(v.abs().max())
            ev = rel_err(implied, v)
            tol_j = 2.0 * tol_st * float(rec.states.abs().max()) / abs(dsig) / max(vmax, 1e-30) + tol_ps
            if ev - tol_j > worst_v - tol_v or worst_k < 0:
                worst_v, worst_k, tol_v = ev, j, tol_j
            cos = float(torch.nn.functional.cosine_similarity(implied.flatten(), v.flatten(), dim=0))
            min_cos = min(min_cos, cos)
    ok = worst_v <= tol_v
    results.append(CheckResult(
        "student_velocity_drives_euler_step", "PASS" if ok else "FAIL", worst_v, tol_v,
        "(x_{k+1} − x_k)/(σ_{k+1} − σ_k) vs the student's σ-velocity at x_k"
        + ("" if ok else ": the Euler step does not use the student's own velocity (teacher velocity? wrong Δσ?)"),
        f"step {worst_k}" if not ok else ""))
    ok = min_cos > 0
    results.append(CheckResult(
        "output_sign_convention", "PASS" if ok else "FAIL", 1.0 - min_cos, 1.0,
        f"min_k cos(step velocity, student σ-velocity) = {min_cos:+.3f}"
        + ("" if ok else ": the integrated velocity has the wrong sign (Z-Image: v = −out)"), ""))

    # model_time_convention — every student and teacher call of every run.
    tol_t = TIME_TOLERANCE[ctx.dname]
    e, where, missing = 0.0, "", []
    for c, r in records.items():
        csig = ctx.golden.sigmas(c.schedule)
        kk = csig.shape[0]
        for role, calls in (("student", r.student_calls), ("teacher", r.teacher_calls)):
            steps_seen = set()
            for i, call in enumerate(calls):
                j = i if len(calls) == kk else _nearest_step(call.x, r.states, kk)[0]
                steps_seen.add(j)
                want = model_time(csig[j], ctx.convention)
                ee = float((call.time - want).abs().max())
                if ee > e:
                    e, where = ee, f"{c} {role} step {j}: got {float(call.time[0]):.6g}, want {float(want):.6g}"
            if role == "student" and len(steps_seen) < kk:
                missing.append(f"{c}: student queried at steps {sorted(steps_seen)} of {kk}")
    ok = e <= tol_t and not missing
    want_s = {"zimage": "t = 1 − σ_k", "sigma": "σ_k", "flux2": "timestep = σ_k"}[ctx.convention]
    detail = f"model time received vs {want_s}"
    if e > tol_t:
        detail += ": wrong time convention (σ passed where t = 1 − σ is expected, or the reverse)"
    if missing:
        detail += "; " + missing[0]
    results.append(CheckResult("model_time_convention", "PASS" if ok else "FAIL", e, tol_t, detail, where if not ok else ""))

    # teacher_queried_on_student_states — the teacher is never rolled out.
    e, where, uncovered = 0.0, "", []
    for c, r in records.items():
        kk = ctx.golden.sigmas(c.schedule).shape[0]
        covered = set()
        for i, call in enumerate(r.teacher_calls):
            j, d = _nearest_step(call.x, r.states, kk)
            if d <= tol_st:
                covered.add(j)
            if d > e:
                e, where = d, f"{c} teacher call {i}"
        if len(covered) < kk:
            uncovered.append(f"{c}: teacher graded student states {sorted(covered)} of {kk}")
    ok = e <= tol_st and not uncovered
    detail = "teacher inputs vs the student's roll-out states (distance to the nearest state)"
    if not ok:
        detail += ": the teacher must grade the STUDENT's states, never roll out its own trajectory"
        if uncovered:
            detail += "; " + uncovered[0]
    results.append(CheckResult("teacher_queried_on_student_states", "PASS" if ok else "FAIL", e, tol_st, detail,
                               where if not ok else ""))

    # teacher_gets_no_gradient
    e, where = 0.0, ""
    for c, r in records.items():
        for n, g in r.teacher_grads.items():
            if g is not None and float(g.abs().max()) > e:
                e, where = float(g.abs().max()), f"{c} teacher.{n}"
    ok = e == 0.0
    results.append(CheckResult(
        "teacher_gets_no_gradient", "PASS" if ok else "FAIL", e, 0.0,
        "max |∂loss/∂θ_teacher| (teacher handed over with requires_grad="
        + ("False)" if ctx.frozen_teacher else "True)")
        + ("" if ok else ": gradients flow into the teacher — call it under torch.no_grad() or detach its output"),
        where))

    # no_backprop_across_steps
    n_bad, where = 0, ""
    for c, r in records.items():
        for role, calls in (("student", r.student_calls), ("teacher", r.teacher_calls)):
            for i, call in enumerate(calls):
                if call.has_history:
                    n_bad += 1
                    where = where or f"{c} {role} call {i}"
    ok = n_bad == 0
    results.append(CheckResult(
        "no_backprop_across_steps", "PASS" if ok else "FAIL", float(n_bad), 0.0,
        "model inputs carrying autograd history (count)"
        + ("" if ok else ": states are not detached between steps — gradients flow back through the roll-out"),
        where))

    # x0_loss_is_sigma2_weighted_velocity_loss
    if set(spaces) >= {"x0", "velocity"}:
        e, where = 0.0, ""
        for c in records:
            if c.space != "x0" or CaseId(c.field, c.schedule, "velocity") not in records:
                continue
            rx, rv = records[c], records[CaseId(c.field, c.schedule, "velocity")]
            s2 = ctx.golden.sigmas(c.schedule) ** 2
            ee = rel_err(rx.per_step, s2 * rv.per_step)
            if ee > e:
                e, where = ee, f"{c.field}/{c.schedule}"
        tol = 2 * tol_ps
        ok = e <= tol
        results.append(CheckResult(
            "x0_loss_is_sigma2_weighted_velocity_loss", "PASS" if ok else "FAIL", e, tol,
            "L_k(x0) vs σ_k²·L_k(velocity)"
            + ("" if ok else ": x0 must be x − σ·v, so the x0 loss is the σ²-weighted velocity loss"),
            where if not ok else ""))
    else:
        results.append(CheckResult("x0_loss_is_sigma2_weighted_velocity_loss", "SKIP",
                                   detail="needs both spaces (run with --space both)"))

    # loss_nonnegative_zero_iff_agree
    min_ps = min(float(r.per_step.min()) for r in records.values())
    scale = float(rec.per_step.abs().max())
    try:
        agree = ctx.run(pcase, agree=True)
        zero_err = float(agree.per_step.abs().max()) / max(scale, 1e-300)
        errors_here = ""
    except Exception as exc:  # noqa: BLE001 - reported
        zero_err, errors_here = math.inf, _describe(exc)
        errors.append(f"teacher = student run: {errors_here}")
    positive = bool((rec.per_step > tol_ps * scale).all())
    ok = min_ps >= 0 and zero_err <= tol_ps and positive
    detail = f"min L_k = {min_ps:.3g}; max L_k/scale with teacher = student: {zero_err:.3g}"
    if min_ps < 0:
        detail += ": a negative loss is not a divergence"
    elif zero_err > tol_ps:
        detail += ": the loss must vanish when teacher and student agree" + (f" ({errors_here})" if errors_here else "")
    elif not positive:
        detail += ": some L_k is zero although teacher ≠ student (loss not computed on that step?)"
    results.append(CheckResult("loss_nonnegative_zero_iff_agree", "PASS" if ok else "FAIL", zero_err, tol_ps, detail))

    # per_sample_batch_mean
    try:
        b = ctx.golden.noise().shape[0]
        singles = [ctx.run(pcase, batch=slice(i, i + 1)) for i in range(b)]
        e_ps = rel_err(torch.stack([s.per_step for s in singles]).mean(0), rec.per_step)
        e_l = rel_err(torch.stack([s.loss for s in singles]).mean(), rec.loss)
        e_st = rel_err(torch.cat([s.states for s in singles], dim=1), rec.states)
        e = max(e_ps, e_l)
        ok = e <= tol_ps and e_st <= tol_st
        detail = (f"batch per-step losses vs mean of single-sample runs (states err {e_st:.3g})"
                  + ("" if ok else ": the loss must be a per-sample mean averaged over the batch "
                     "(no batch sum, no cross-sample coupling)"))
    except Exception as exc:  # noqa: BLE001
        e, ok, detail = math.inf, False, f"single-sample run failed: {_describe(exc)}"
        errors.append(detail)
    results.append(CheckResult("per_sample_batch_mean", "PASS" if ok else "FAIL", e, tol_ps, detail))

    # deterministic
    try:
        again = ctx.run(pcase)
        diffs = [float((again.loss - rec.loss).abs()), float((again.per_step - rec.per_step).abs().max()),
                 float((again.states - rec.states).abs().max())]
        diffs += [float((again.grads[n] - rec.grads[n]).abs().max()) for n in rec.grads]
        e = max(diffs)
        mutated = [str(c) for c, r in records.items() if r.inputs_mutated] + (["repeat"] if again.inputs_mutated else [])
        ok = e == 0.0 and not mutated
        detail = "max |difference| between two identical calls (loss, per-step, states, gradients)"
        if e != 0.0:
            detail += ": results depend on hidden state or randomness"
        if mutated:
            detail += f"; the call modified noise/sigmas in place ({mutated[0]})"
    except Exception as exc:  # noqa: BLE001
        e, ok, detail = math.inf, False, f"repeat run failed: {_describe(exc)}"
        errors.append(detail)
    results.append(CheckResult("deterministic", "PASS" if ok else "FAIL", e, 0.0, detail))
    return results


def run_conformance(
    fn: RolloutFn | str,
    convention: str = "sigma",
    space: str = "both",
    dtype: str = "float32",
    *,
    device: str | torch.device = "cpu",
    golden: Golden | None = None,
    cases: Sequence[CaseId] | None = None,
    frozen_teacher: bool = False,
) -> ConformanceReport:
    """Check a D-OPSD roll-out-loss implementation against the goldens and the property suite.

    Args:
        fn: the implementation in the adapter signature (see :mod:`.harness`), or its
            ``"package.module:function"`` import path.
        convention: how the kit hands over the models: "sigma", "zimage" or "flux2".
        space: "x0", "velocity" or "both" (the cross-space invariant needs both).
        dtype: "float64", "float32" or "bfloat16": the dtype of the models and the noise;
            the manifest's tolerances for that dtype are used.
        device: where the kit's models and noise live.
        golden: the golden set (default: the shipped one).
        cases: restrict the golden cases (default: all of ``space``). The property case
            (mlp/zimage4) is always included.
        frozen_teacher: hand over the teacher with ``requires_grad=False``. By default its
            parameters require grad, so that ``teacher_gets_no_gradient`` checks that the
            implementation itself stops gradients (no_grad/detach), as D-OPSD specifies;
            set this if your trainer relies on a frozen teacher instead (the check then
            only catches gradients that still arrive).

    Returns:
        A :class:`ConformanceReport`; ``report.passed`` is the verdict, ``print(report)``
        the per-invariant table, ``report.assert_passed()`` raises with it.

    The run uses one CPU thread (restored afterwards): the tensors are tiny.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if space not in ("x0", "velocity", "both"):
        raise ValueError(f"space must be 'x0', 'velocity' or 'both', got {space!r}")
    name = fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    impl: RolloutFn = load_callable(fn) if isinstance(fn, str) else fn
    tdtype = dtype_from_name(dtype)
    g = golden or load_golden()
    ctx = _Ctx(impl, convention, tdtype, dtype_name(tdtype), torch.device(device), g, frozen_teacher)
    spaces = ("velocity", "x0") if space == "both" else (space,)
    selected = [c for c in (cases or all_cases()) if c.space in spaces]
    for sp in spaces:
        pc = CaseId(PROPERTY_CASE[0], PROPERTY_CASE[1], sp)
        if pc not in selected:
            selected.append(pc)
    title = f"D-OPSD conformance: impl={name} convention={convention} space={space} dtype={ctx.dname}"
    if frozen_teacher:
        title += " (frozen teacher)"

    with single_thread():
        return _run(ctx, title, spaces, selected)


def _run(ctx: _Ctx, title: str, spaces: Sequence[str], selected: list[CaseId]) -> ConformanceReport:
    records: dict[CaseId, RunRecord] = {}
    errors: list[str] = []
    for c in selected:
        try:
            records[c] = ctx.run(c)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, not raised
            errors.append(f"{c}: {_describe(exc)}")
    results: list[CheckResult] = []
    if errors:
        results.append(CheckResult("returns_well_formed", "ERROR", detail=errors[0],
                                   where=f"{len(errors)} of {len(selected)} runs failed"))
        rest = [n for n in INVARIANTS if n != "returns_well_formed"]
        results += [CheckResult(n, "SKIP", detail="not run: the implementation failed") for n in rest]
        return ConformanceReport(title, tuple(results))
    results.append(CheckResult("returns_well_formed", "PASS", detail=f"{len(selected)} runs, shapes and types as specified"))
    results += _golden_suite(ctx, selected, records)
    results += _property_suite(ctx, spaces, records, errors)
    return ConformanceReport(title, tuple(results))
