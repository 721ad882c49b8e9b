"""Conformance kit: does an implementation do D-OPSD? Golden vectors + a property suite.

Wrap the implementation's roll-out loss in the adapter signature (see :mod:`.harness` and
README.md)::

    fn(student, teacher, noise, sigmas, space) -> (loss, per_step, states)

and run it::

    python -m dopsd_ref.conformance --impl my_pkg.adapter:rollout --convention zimage

or from a test::

    from dopsd_ref.conformance import run_conformance
    run_conformance(rollout, convention="zimage").assert_passed()

Imports torch and safetensors only.
"""

from .ema import run_ema_conformance
from .golden import CaseId, Golden, load_golden
from .harness import CONVENTIONS, AdapterError, EmaFn, RolloutFn
from .report import CheckResult, ConformanceError, ConformanceReport
from .runner import INVARIANTS, run_conformance

__all__ = [
    "AdapterError",
    "CONVENTIONS",
    "CaseId",
    "CheckResult",
    "ConformanceError",
    "ConformanceReport",
    "EmaFn",
    "Golden",
    "INVARIANTS",
    "RolloutFn",
    "load_golden",
    "run_conformance",
    "run_ema_conformance",
]
