"""The conformance run: the golden problems, every invariant of :mod:`.invariants`, one report.

The implementation is run on the golden problems (2 fields × 4 grids × the selected loss
spaces); each invariant of :data:`.invariants.ROLLOUT_INVARIANTS` reads those runs (some re-run
the implementation) and gives one PASS/FAIL line. Golden tolerances come from
``manifest.json`` (measured by :mod:`.make_golden` on the reference itself, with a margin);
property tolerances are derived from them. See README.md for what each invariant catches.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .golden import PROPERTY_CASE, QUANTITIES, CaseId, Golden, all_cases, dtype_from_name, dtype_name, load_golden
from .harness import CONVENTIONS, RolloutFn, load_callable, single_thread
from .invariants import INVARIANTS, TIME_TOLERANCE, Evidence, Problem, Subject, check_all, gather, rel_err
from .report import ConformanceReport

__all__ = ["run_conformance", "rel_err", "INVARIANTS", "TIME_TOLERANCE", "golden_problem", "golden_tolerances"]


def golden_problem(golden: Golden, case: CaseId) -> Problem:
    """The :class:`~.invariants.Problem` of one golden case, with its golden expected values."""

    def build(role: str, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        return golden.build(case.field, role, dtype, device)

    return Problem(name=f"{case.field}/{case.schedule}", space=case.space, sigmas=golden.sigmas(case.schedule),
                   noise=golden.noise(), build=build, expected=golden.expected(case))


def golden_tolerances(golden: Golden, dtype: str) -> dict[str, float]:
    """The manifest tolerances of ``dtype`` plus the model-time tolerance."""
    tol = {q: golden.tolerance(dtype, q) for q in QUANTITIES}
    tol["time"] = TIME_TOLERANCE[dtype]
    return tol


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
    subject = Subject(impl, convention, tdtype, torch.device(device), frozen_teacher)
    spaces = ("velocity", "x0") if space == "both" else (space,)
    selected = [c for c in (cases or all_cases()) if c.space in spaces]
    for sp in spaces:
        pc = CaseId(PROPERTY_CASE[0], PROPERTY_CASE[1], sp)
        if pc not in selected:
            selected.append(pc)
    title = f"D-OPSD conformance: impl={name} convention={convention} space={space} dtype={dtype_name(tdtype)}"
    if frozen_teacher:
        title += " (frozen teacher)"

    primary_space = "x0" if "x0" in spaces else spaces[0]
    primary = CaseId(PROPERTY_CASE[0], PROPERTY_CASE[1], primary_space)
    problems = {c: golden_problem(g, c) for c in selected}
    with single_thread():
        ev: Evidence = gather(subject, list(problems.values()), problems[primary],
                              golden_tolerances(g, dtype_name(tdtype)))
        return ConformanceReport(title, check_all(ev))
