"""Off-policy baselines that D-OPSD is compared against (besides SFT, in :mod:`losses`).

Off-policy distillation queries the same teacher as D-OPSD, but on *noised targets*
``x_{σ_k} = (1 − σ_k)·x* + σ_k·ε`` instead of on the student's own roll-out states::

    L = (1/K)·Σ_k mean((u_s(x_{σ_k}) − u_t(x_{σ_k}))²)      (or in x0 space)

Same supervision, different states: the training states are not the sampler's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_finite_loss, check_state, check_velocity
from .conventions import VelocityFn, noise_state
from .losses import Space, check_space, dopsd_step_loss
from .sampling import sigma_batch
from .schedules import validate_sigmas

__all__ = ["offpolicy_distillation_loss"]


def offpolicy_distillation_loss(
    student: VelocityFn,
    teacher: VelocityFn,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    space: Space = "x0",
) -> Tensor:
    """Teacher-graded loss on noised targets at each grid level (no student roll-out).

    Args:
        student, teacher: ``(x, σ [B]) -> v`` in the σ-convention (contexts bound).
        x0: target images [B, ...]; noise: ε [B, ...]; sigmas: the grid.
        space: "x0" or "velocity".

    Returns:
        Scalar loss, mean over the K grid levels.
    """
    check_state(noise)
    check_space(space)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
    sig = validate_sigmas(sigmas).to(device=noise.device, dtype=noise.dtype)
    losses = []
    for k in range(sig.shape[0]):
        x = noise_state(x0, noise, sig[k])
        s = sigma_batch(sig[k], x)
        u_s = check_velocity(student(x, s), x, role="student", step=k, sigma=sig[k])
        with torch.no_grad():
            u_t = check_velocity(teacher(x, s), x, role="teacher", step=k, sigma=sig[k])
        loss_k = dopsd_step_loss(u_s, u_t, x, s, space)
        check_finite_loss(loss_k, step=k, sigma=sig[k], what="off-policy distillation loss")
        losses.append(loss_k)
    return torch.stack(losses).mean()
