"""A curriculum of roll-out lengths K over fine-tuning: K(t), then the σ grid of step t.

The schedule is a list of milestones ``(t_i, K_i)`` with ``0 = t_1 < t_2 < ...``::

    K(t) = K_i   for t_i ≤ t < t_{i+1}     (the last K holds for every later t)
    sigmas(t) = uniform_sigmas(K(t))       (or shifted_sigmas(K(t), shift) when shift ≠ 1)

``KSchedule.constant(K)`` gives the fixed-K behaviour (``sigmas(t) == uniform_sigmas(K)``
for every t). Pass a schedule as the ``sigmas`` of :func:`dopsd_ref.dopsd_train_step`; it is
read at that call's ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .schedules import shifted_sigmas, uniform_sigmas

__all__ = ["KSchedule"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class KSchedule:
    """Roll-out step count K as a step function of the optimizer step t.

    Attributes:
        milestones: ``((t_1, K_1), (t_2, K_2), ...)`` with ``t_1 = 0``, strictly increasing
            steps and every ``K_i >= 1``; K(t) = K_i on ``[t_i, t_{i+1})``.
        shift: σ-grid shift s (1: the uniform grid ``linspace(1, 1/K, K)``; s > 1 spends
            more steps at high noise, see :func:`dopsd_ref.shifted_sigmas`).

    Raises:
        ValueError: empty milestones, a first step other than 0, non-increasing steps, a
            non-integer step or K, K < 1, or a non-positive / non-finite shift.
    """

    milestones: tuple[tuple[int, int], ...]
    shift: float = 1.0

    def __post_init__(self) -> None:
        try:
            ms = tuple((m[0], m[1]) for m in self.milestones)
            if any(len(m) != 2 for m in self.milestones):
                raise TypeError
        except (TypeError, IndexError):
            raise ValueError(f"milestones must be (step, K) pairs, got {self.milestones!r}") from None
        object.__setattr__(self, "milestones", ms)
        if not ms:
            raise ValueError("milestones is empty: a K schedule needs at least one (step, K) pair")
        for i, (t, k) in enumerate(ms):
            if not (_is_int(t) and _is_int(k)):
                raise ValueError(f"milestone {i} {(t, k)!r}: step and K must be ints")
            if k < 1:
                raise ValueError(f"milestone {i} {(t, k)!r}: K must be >= 1")
        if ms[0][0] != 0:
            raise ValueError(f"the first milestone must be at step 0 (K is needed from the start), got step {ms[0][0]}")
        for i in range(1, len(ms)):
            if ms[i][0] <= ms[i - 1][0]:
                raise ValueError(f"milestone steps must be strictly increasing: milestone {i} at step {ms[i][0]} "
                                 f"<= milestone {i - 1} at step {ms[i - 1][0]}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a positive finite number, got {self.shift!r}")

    @classmethod
    def constant(cls, num_steps: int, shift: float = 1.0) -> "KSchedule":
        """The fixed-K schedule ``((0, K),)``."""
        return cls(((0, num_steps),), shift)

    @classmethod
    def parse(cls, text: str, shift: float = 1.0) -> "KSchedule":
        """From ``"0:2,100:4"`` (step:K pairs, comma separated), e.g. a CLI flag."""
        try:
            pairs = tuple(tuple(int(v) for v in item.split(":")) for item in text.split(","))
        except ValueError:
            raise ValueError(f"K schedule {text!r}: expected 'step:K,step:K,...' with integers") from None
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"K schedule {text!r}: expected 'step:K,step:K,...'")
        return cls(pairs, shift)  # type: ignore[arg-type]

    def num_steps(self, step: int) -> int:
        """K(t): the K of the last milestone at or before ``step`` (t >= 0)."""
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        k = self.milestones[0][1]
        for t, kk in self.milestones:
            if t > step:
                break
            k = kk
        return k

    def sigmas(self, step: int) -> Tensor:
        """The roll-out grid of optimizer step ``step``: K(t) levels from σ = 1."""
        k = self.num_steps(step)
        return uniform_sigmas(k) if self.shift == 1.0 else shifted_sigmas(k, float(self.shift))

    @property
    def max_steps(self) -> int:
        """The largest K of the schedule (memory and compute are planned for it)."""
        return max(k for _, k in self.milestones)
