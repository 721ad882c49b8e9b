"""The plain few-step Euler sampler: what inference runs, and what the student rolls out.

    x_{σ_1} = ε ~ N(0, I),   x_{σ_{k+1}} = x_{σ_k} + (σ_{k+1} − σ_k)·v(x_{σ_k}, σ_k),   σ_{K+1} = 0.

D-OPSD trains on exactly these states: :func:`dopsd_ref.dopsd_rollout_loss` visits the same
``states`` as :func:`euler_sample` for the same noise, grid and student.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_velocity
from .conventions import VelocityFn, euler_step
from .schedules import validate_sigmas

__all__ = ["euler_sample", "sigma_batch"]


def sigma_batch(sigma: Tensor, x: Tensor) -> Tensor:
    """A scalar σ as the per-sample tensor [B] that models receive (x's dtype and device)."""
    return sigma.to(device=x.device, dtype=x.dtype).expand(x.shape[0]).clone()


@torch.no_grad()
def euler_sample(
    model: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    return_states: bool = False,
) -> Tensor:
    """Sample with K Euler steps on the grid ``sigmas`` (terminal σ = 0 implied).

    Args:
        model: velocity model ``(x [B, ...], σ [B]) -> v [B, ...]`` in the σ-convention.
        noise: the start state ε at σ = 1, shape [B, ...].
        sigmas: the grid ``[1 = σ_1 > ... > σ_K > 0]``.
        return_states: return all K + 1 states instead of the final sample.

    Returns:
        The final sample [B, ...], or the states [K + 1, B, ...] with ``states[0] = noise``.
    """
    sig = validate_sigmas(sigmas).to(device=noise.device, dtype=noise.dtype)
    nxt = torch.cat([sig[1:], sig.new_zeros(1)])
    x = noise
    states = [x]
    for k in range(sig.shape[0]):
        s = sigma_batch(sig[k], x)
        v = check_velocity(model(x, s), x, role="model", step=k, sigma=sig[k])
        x = euler_step(x, v, sig[k], nxt[k])
        states.append(x)
    return torch.stack(states) if return_states else x
