"""pytest entry point: a ``dopsd_conformance`` fixture.

Enable it in your root ``conftest.py`` with ``pytest_plugins = ["dopsd_ref.conformance.pytest_plugin"]``
(or import the fixture into a conftest), then::

    def test_my_trainer_is_dopsd(dopsd_conformance):
        dopsd_conformance(my_adapter, convention="zimage")          # roll-out loss
        dopsd_conformance.ema(my_ema_adapter)                       # teacher EMA

Each call runs the kit and fails the test with the full per-invariant report on any failure;
it returns the :class:`~dopsd_ref.conformance.ConformanceReport` otherwise.
"""

from __future__ import annotations

from typing import Any

import pytest

from .ema import run_ema_conformance
from .report import ConformanceReport
from .runner import run_conformance

__all__ = ["ConformanceChecker", "dopsd_conformance"]


class ConformanceChecker:
    """Callable wrapper around :func:`run_conformance` that asserts the verdict."""

    def __call__(self, fn: Any, **kwargs: Any) -> ConformanceReport:
        """Run :func:`run_conformance(fn, **kwargs) <run_conformance>` and assert it passed."""
        report = run_conformance(fn, **kwargs)
        report.assert_passed()
        return report

    def ema(self, fn: Any, **kwargs: Any) -> ConformanceReport:
        """Run :func:`run_ema_conformance(fn, **kwargs) <run_ema_conformance>` and assert it passed."""
        report = run_ema_conformance(fn, **kwargs)
        report.assert_passed()
        return report


@pytest.fixture
def dopsd_conformance() -> ConformanceChecker:
    """Assert that a D-OPSD adapter conforms: ``dopsd_conformance(fn, convention=...)``."""
    return ConformanceChecker()
