"""dopsd_ref driving Z-Image-convention models ``(x, t) -> out`` with t = 1 − σ and v = −out."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from dopsd_ref import dopsd_rollout_loss, from_zimage


def rollout(student: Callable[[Tensor, Tensor], Tensor], teacher: Callable[[Tensor, Tensor], Tensor],
            noise: Tensor, sigmas: Tensor, space: str) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter: wrap both Z-Image models into σ-velocities with :func:`dopsd_ref.from_zimage`."""
    out = dopsd_rollout_loss(from_zimage(student), from_zimage(teacher), noise, sigmas, space)  # type: ignore[arg-type]
    return out.loss, out.per_step, out.states
