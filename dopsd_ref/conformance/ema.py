"""Conformance of a teacher-EMA update: ``θ̄ ← d·θ̄ + (1 − d)·θ`` after every optimizer step.

EMA adapter signature::

    ema(teacher: list[Tensor], student: list[Tensor], decay: float) -> None | list[Tensor]

Update ``teacher`` in place (return None) or return the new teacher tensors. The kit hands
the teacher as frozen parameters (``requires_grad=False``) and the student as trainable
parameters carrying a ``.grad`` that must survive untouched.

Invariants: ``ema_returns_well_formed``, ``ema_golden`` (a 3-update sequence at d = 0.9 and
one update at d = 0.9999 vs float64 goldens), ``ema_direction`` (the teacher moves a
fraction 1 − d of the way toward the student, the student does not move), ``ema_endpoints``
(d = 1 keeps the teacher, d = 0 copies the student), ``ema_no_grad`` (no autograd graph is
built, the student's gradients are untouched).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .golden import EMA_DECAY, EMA_SLOW_DECAY, Golden, dtype_from_name, dtype_name, load_golden
from .harness import AdapterError, EmaFn, load_callable, single_thread
from .invariants import describe_exception, rel_err
from .report import CheckResult, ConformanceReport

__all__ = ["run_ema_conformance", "apply_ema", "ema_golden_tensors", "EMA_SHAPES", "EMA_STEPS"]

EMA_SHAPES: tuple[tuple[int, ...], ...] = ((3, 4), (5,), (2, 3, 2))
EMA_STEPS = 3


def ema_golden_tensors(g: Golden) -> tuple[list[Tensor], list[list[Tensor]], list[list[Tensor]], list[Tensor]]:
    """(teacher0, students per step, expected teacher per step at d = 0.9, expected at d = 0.9999)."""
    e = g.files["ema"]
    n = len(EMA_SHAPES)
    t0 = [e[f"teacher0.{i}"] for i in range(n)]
    students = [[e[f"student{s}.{i}"] for i in range(n)] for s in range(1, EMA_STEPS + 1)]
    expected = [[e[f"expected{s}.{i}"] for i in range(n)] for s in range(1, EMA_STEPS + 1)]
    slow = [e[f"expected_slow.{i}"] for i in range(n)]
    return t0, students, expected, slow


def _grad_marker(t: Tensor) -> Tensor:
    return torch.full_like(t, 0.125)


def apply_ema(fn: EmaFn, teacher: Sequence[Tensor], student: Sequence[Tensor], decay: float,
              dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor], dict[str, bool]]:
    """Call ``fn`` once on copies of ``teacher``/``student`` in ``dtype``.

    Returns:
        (new teacher as float64 tensors, student after the call as float64 tensors, flags)
        with flags ``graph`` (a returned teacher tensor requires grad or has a grad_fn)
        and ``student_grad_changed``.

    Raises:
        AdapterError: the return value is not None or a list of matching tensors.
    """
    t_in = [nn.Parameter(t.detach().to(dtype).clone(), requires_grad=False) for t in teacher]
    s_in = [nn.Parameter(s.detach().to(dtype).clone(), requires_grad=True) for s in student]
    for s in s_in:
        s.grad = _grad_marker(s)
    out = fn(t_in, s_in, decay)
    new = t_in if out is None else list(out)
    if len(new) != len(teacher) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(new, teacher)):
        raise AdapterError("the EMA adapter must update the teacher list in place or return tensors of the same shapes")
    graph = any(isinstance(t, Tensor) and (t.requires_grad or t.grad_fn is not None) for t in new)
    grad_changed = any(s.grad is None or not torch.equal(s.grad, _grad_marker(s)) for s in s_in)
    f64 = lambda ts: [t.detach().to("cpu", torch.float64).clone() for t in ts]  # noqa: E731
    return f64(new), f64(s_in), {"graph": graph, "student_grad_changed": grad_changed}


def _err(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return max(rel_err(x, y) for x, y in zip(a, b))


def run_ema_conformance(fn: EmaFn | str, dtype: str = "float32", *, golden: Golden | None = None) -> ConformanceReport:
    """Check a teacher-EMA update against the goldens and the EMA invariants.

    Args:
        fn: the EMA adapter (module docstring) or its ``"package.module:function"`` path.
        dtype: "float64", "float32" or "bfloat16" for the tensors handed over.
        golden: the golden set (default: the shipped one).
    """
    name = fn if isinstance(fn, str) else f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"
    impl: EmaFn = load_callable(fn) if isinstance(fn, str) else fn
    with single_thread():
        return _run_ema(impl, name, dtype, golden)


def _run_ema(impl: EmaFn, name: str, dtype: str, golden: Golden | None) -> ConformanceReport:
    td = dtype_from_name(dtype)
    dn = dtype_name(td)
    g = golden or load_golden()
    tol = g.tolerance(dn, "ema")
    t0, students, expected, slow = ema_golden_tensors(g)
    title = f"D-OPSD EMA conformance: impl={name} dtype={dn}"
    results: list[CheckResult] = []
    try:
        # golden sequence at d = 0.9: each step starts from the expected previous teacher,
        # cast to the run dtype, so errors do not compound.
        seq_err, flags_all, step1 = 0.0, [], None
        prev = t0
        for s in range(EMA_STEPS):
            new, s_after, flags = apply_ema(impl, prev, students[s], EMA_DECAY, td)
            seq_err = max(seq_err, _err(new, expected[s]))
            flags_all.append(flags)
            if s == 0:
                step1 = (new, s_after)
            prev = expected[s]
        new_slow, s_after_slow, f_slow = apply_ema(impl, t0, students[0], EMA_SLOW_DECAY, td)
        slow_err = _err(new_slow, slow)
        keep, _, f_keep = apply_ema(impl, t0, students[0], 1.0, td)
        copy, _, f_copy = apply_ema(impl, t0, students[0], 0.0, td)
    except Exception as exc:  # noqa: BLE001
        results.append(CheckResult("ema_returns_well_formed", "ERROR", detail=describe_exception(exc)))
        results += [CheckResult(n, "SKIP", detail="not run: the EMA adapter failed")
                    for n in ("ema_golden", "ema_direction", "ema_endpoints", "ema_no_grad")]
        return ConformanceReport(title, tuple(results))
    results.append(CheckResult("ema_returns_well_formed", "PASS", detail="teacher updated in place or returned"))

    e = max(seq_err, slow_err)
    results.append(CheckResult("ema_golden", "PASS" if e <= tol else "FAIL", e, tol,
                               f"teacher after updates vs golden (d={EMA_DECAY}: {seq_err:.3g}, d={EMA_SLOW_DECAY}: {slow_err:.3g})"))

    # direction: fraction of the way toward the student = <t1 − t0, s − t0> / |s − t0|²
    new1, s_after1 = step1
    num = sum(float(((a - b) * (s - b)).sum()) for a, b, s in zip(new1, t0, students[0]))
    den = sum(float(((s - b) ** 2).sum()) for b, s in zip(t0, students[0]))
    frac = num / den
    student_moved = _err(s_after1, [s.to(td).double() for s in students[0]])
    e = abs(frac - (1.0 - EMA_DECAY))
    tol_dir = max(5 * tol, 1e-9)
    ok = e <= tol_dir and student_moved == 0.0
    detail = f"teacher moved {frac:.4f} of the way to the student, want 1 − d = {1 - EMA_DECAY:.4f}"
    if e > tol_dir:
        detail += ": EMA applied in the wrong direction (θ̄ ← (1−d)·θ̄ + d·θ, or θ̄ moved away from θ)"
    if student_moved != 0.0:
        detail += f"; the student was modified (rel change {student_moved:.3g}): the EMA must move the teacher, not the student"
    results.append(CheckResult("ema_direction", "PASS" if ok else "FAIL", e, tol_dir, detail))

    e_keep = _err(keep, [t.to(td).double() for t in t0])
    e_copy = _err(copy, [s.to(td).double() for s in students[0]])
    e = max(e_keep, e_copy)
    results.append(CheckResult("ema_endpoints", "PASS" if e <= tol else "FAIL", e, tol,
                               f"d=1 keeps the teacher (err {e_keep:.3g}); d=0 copies the student (err {e_copy:.3g})"))

    flags = flags_all + [f_slow, f_keep, f_copy]
    graph = any(f["graph"] for f in flags)
    gchg = any(f["student_grad_changed"] for f in flags)
    ok = not graph and not gchg
    detail = "no autograd graph through the update; student .grad untouched"
    if graph:
        detail += ": the updated teacher requires grad / has a grad_fn — wrap the update in torch.no_grad()"
    if gchg:
        detail += ": the student's .grad was modified by the EMA update"
    results.append(CheckResult("ema_no_grad", "PASS" if ok else "FAIL", float(graph) + float(gchg), 0.0, detail))
    return ConformanceReport(title, tuple(results))
