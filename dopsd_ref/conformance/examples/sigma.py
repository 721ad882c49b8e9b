"""dopsd_ref in the σ-convention: the models are already ``(x, σ) -> v``."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from dopsd_ref import dopsd_rollout_loss


def rollout(student: Callable[..., Tensor], teacher: Callable[..., Tensor], noise: Tensor, sigmas: Tensor,
            space: str) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter: ``(loss, per_step, states)`` of :func:`dopsd_ref.dopsd_rollout_loss` (single graph)."""
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space)  # type: ignore[arg-type]
    return out.loss, out.per_step, out.states


def rollout_per_step_backward(student: Callable[..., Tensor], teacher: Callable[..., Tensor], noise: Tensor,
                              sigmas: Tensor, space: str) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter for the memory-flat variant: backward after every step, detached loss returned."""
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space, per_step_backward=True)  # type: ignore[arg-type]
    return out.loss, out.per_step, out.states
