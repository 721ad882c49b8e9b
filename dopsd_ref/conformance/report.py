"""Per-invariant results and the printed PASS/FAIL report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Status", "CheckResult", "ConformanceReport", "ConformanceError"]

Status = Literal["PASS", "FAIL", "ERROR", "SKIP"]


class ConformanceError(AssertionError):
    """Raised by :meth:`ConformanceReport.assert_passed`; the message is the full report."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one invariant.

    Attributes:
        name: stable invariant id, e.g. ``"teacher_queried_on_student_states"``.
        status: PASS, FAIL, ERROR (the implementation raised or returned malformed output)
            or SKIP (not applicable to this run, e.g. a cross-space check with one space).
        error: the measured error (its meaning is in ``detail``); NaN if not measured.
        tol: the tolerance it is compared with (pass iff ``error <= tol``, unless stated).
        detail: one line: what was measured and, on failure, which slip it points to.
        where: the worst case / step, if any.
    """

    name: str
    status: Status
    error: float = math.nan
    tol: float = math.nan
    detail: str = ""
    where: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("PASS", "SKIP")

    def line(self) -> str:
        err = "-" if math.isnan(self.error) else f"{self.error:.3g}"
        tol = "-" if math.isnan(self.tol) else f"{self.tol:.3g}"
        where = f" [{self.where}]" if self.where else ""
        return f"{self.status:5s} {self.name:44s} err={err:>9s} tol={tol:>9s}{where}  {self.detail}"


@dataclass(frozen=True)
class ConformanceReport:
    """All invariant results of one conformance run.

    Attributes:
        title: what was tested (implementation, convention, space, dtype).
        results: one :class:`CheckResult` per invariant, in report order.
    """

    title: str
    results: tuple[CheckResult, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        """True iff no invariant failed or errored."""
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> list[str]:
        """Names of the invariants that FAILed or ERRORed."""
        return [r.name for r in self.results if not r.ok]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(f"no invariant {name!r} in this report; have {[r.name for r in self.results]}")

    def format(self) -> str:
        """The human-readable report: one line per invariant and a summary."""
        n = {s: sum(r.status == s for r in self.results) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
        lines = [self.title, *(r.line() for r in self.results)]
        verdict = "CONFORMS" if self.passed else "DOES NOT CONFORM (failed: " + ", ".join(self.failed) + ")"
        lines.append(f"{n['PASS']} passed, {n['FAIL']} failed, {n['ERROR']} errors, {n['SKIP']} skipped: {verdict}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def assert_passed(self) -> None:
        """Raise :class:`ConformanceError` (an AssertionError) with the report if anything failed."""
        if not self.passed:
            raise ConformanceError("\n" + self.format())
