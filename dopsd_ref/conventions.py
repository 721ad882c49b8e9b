"""Time and parametrisation conventions of rectified-flow models.

dopsd_ref works in one convention only, the **σ-convention** (σ = noise level)::

    x_σ   = (1 − σ)·x0 + σ·ε          σ = 1: pure noise, σ = 0: data
    v     = dx_σ/dσ = ε − x0           the velocity every model in this package returns
    x0    = x_σ − σ·v                  clean-image prediction
    ε     = x_σ + (1 − σ)·v            noise prediction
    x_σ'  = x_σ + (σ' − σ)·v           one Euler step from σ to σ' (σ' < σ when sampling)

This is diffusers' ``FlowMatchEulerDiscreteScheduler`` and the FLUX convention. Real models
use others; the functions at the bottom convert exactly (they are sign flips and
reflections, so round trips are exact in float64):

* **Z-Image(-Turbo)**: model time ``t = 1 − σ`` (0 = noise, 1 = clean) and the pipeline uses
  the *negated* model output as the scheduler velocity: ``out = −v`` and
  ``x0 = x + (1 − t)·out``.
* **FLUX.2**: model timestep ``= σ`` (the scheduler's ×1000 is divided out before the
  transformer) and ``out = v``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

# A velocity model in the σ-convention: (x [B, ...], σ [B]) -> v [B, ...].
VelocityFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "VelocityFn",
    "expand_sigma",
    "noise_state",
    "velocity_target",
    "x0_from_velocity",
    "noise_from_velocity",
    "velocity_from_x0",
    "euler_step",
    "zimage_time_from_sigma",
    "sigma_from_zimage_time",
    "velocity_from_zimage_output",
    "zimage_output_from_velocity",
    "flux2_timestep_from_sigma",
    "sigma_from_flux2_timestep",
    "velocity_from_flux2_output",
    "flux2_output_from_velocity",
    "from_zimage",
    "from_flux2",
]


# -----------------------------------------------------------------------------
# σ-convention
# -----------------------------------------------------------------------------


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample σ to the shape of ``x``.

    Args:
        sigma: a scalar, a 0-d tensor or a tensor of shape [B].
        x: a tensor of shape [B, ...].

    Returns:
        σ reshaped to [B, 1, ..., 1] (or a 0-d tensor for a scalar σ), on ``x``'s device
        and dtype.

    Raises:
        ValueError: if ``sigma`` is 1-D and its length is not ``x.shape[0]``.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have shape [B]=[{x.shape[0]}], got {tuple(sigma.shape)}"
        )
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def noise_state(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """The point of the straight path at noise level σ: ``x_σ = (1 − σ)·x0 + σ·ε``."""
    s = expand_sigma(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The (constant) velocity of the straight path from x0 to ε: ``v = ε − x0``."""
    return noise - x0


def x0_from_velocity(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Clean-image prediction implied by a velocity: ``x0 = x_σ − σ·v``."""
    return x - expand_sigma(sigma, x) * v


def noise_from_velocity(x: Tensor, sigma: Tensor | float, v: Tensor) -> Tensor:
    """Noise prediction implied by a velocity: ``ε = x_σ + (1 − σ)·v``."""
    return x + (1.0 - expand_sigma(sigma, x)) * v


def velocity_from_x0(x: Tensor, sigma: Tensor | float, x0: Tensor) -> Tensor:
    """Velocity implied by a clean-image prediction: ``v = (x_σ − x0) / σ`` (σ > 0)."""
    return (x - x0) / expand_sigma(sigma, x)


def euler_step(x: Tensor, v: Tensor, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
    """One Euler step of the flow ODE from σ to σ': ``x_σ' = x_σ + (σ' − σ)·v``."""
    return x + (expand_sigma(sigma_next, x) - expand_sigma(sigma, x)) * v


# -----------------------------------------------------------------------------
# Z-Image convention: t = 1 − σ, output = −v
# -----------------------------------------------------------------------------


def zimage_time_from_sigma(sigma: Tensor) -> Tensor:
    """Z-Image model time from a noise level: ``t = 1 − σ`` (t = 0 is noise)."""
    return 1.0 - sigma


def sigma_from_zimage_time(t: Tensor) -> Tensor:
    """Noise level from Z-Image model time: ``σ = 1 − t``."""
    return 1.0 - t


def velocity_from_zimage_output(out: Tensor) -> Tensor:
    """σ-convention velocity from a Z-Image transformer output: ``v = −out``."""
    return -out


def zimage_output_from_velocity(v: Tensor) -> Tensor:
    """What a Z-Image transformer outputs for a σ-convention velocity: ``out = −v``."""
    return -v


# -----------------------------------------------------------------------------
# FLUX.2 convention: timestep = σ, output = v
# -----------------------------------------------------------------------------


def flux2_timestep_from_sigma(sigma: Tensor) -> Tensor:
    """FLUX.2 transformer timestep from a noise level: ``timestep = σ`` (in [0, 1])."""
    return sigma


def sigma_from_flux2_timestep(timestep: Tensor) -> Tensor:
    """Noise level from a FLUX.2 transformer timestep: ``σ = timestep``."""
    return timestep


def velocity_from_flux2_output(out: Tensor) -> Tensor:
    """σ-convention velocity from a FLUX.2 transformer output: ``v = out``."""
    return out


def flux2_output_from_velocity(v: Tensor) -> Tensor:
    """What a FLUX.2 transformer outputs for a σ-convention velocity: ``out = v``."""
    return v


# -----------------------------------------------------------------------------
# Wrapping a model written in another convention
# -----------------------------------------------------------------------------


def from_zimage(model: Callable[[Tensor, Tensor], Tensor]) -> VelocityFn:
    """Turn a Z-Image-convention callable ``(x, t) -> out`` into a σ-velocity callable.

    ``v(x, σ) = −model(x, 1 − σ)``.
    """

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        return velocity_from_zimage_output(model(x, zimage_time_from_sigma(sigma)))

    return velocity


def from_flux2(model: Callable[[Tensor, Tensor], Tensor]) -> VelocityFn:
    """Turn a FLUX.2-convention callable ``(x, timestep) -> out`` into a σ-velocity callable.

    ``v(x, σ) = model(x, σ)``.
    """

    def velocity(x: Tensor, sigma: Tensor) -> Tensor:
        return velocity_from_flux2_output(model(x, flux2_timestep_from_sigma(sigma)))

    return velocity
