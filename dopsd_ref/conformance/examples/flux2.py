"""dopsd_ref driving FLUX.2-convention models ``(x, timestep) -> v`` with timestep = σ."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from dopsd_ref import dopsd_rollout_loss, from_flux2


def rollout(student: Callable[[Tensor, Tensor], Tensor], teacher: Callable[[Tensor, Tensor], Tensor],
            noise: Tensor, sigmas: Tensor, space: str) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter: wrap both FLUX.2 models into σ-velocities with :func:`dopsd_ref.from_flux2`."""
    out = dopsd_rollout_loss(from_flux2(student), from_flux2(teacher), noise, sigmas, space)  # type: ignore[arg-type]
    return out.loss, out.per_step, out.states
