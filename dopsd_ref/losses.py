"""Losses: the D-OPSD per-step loss, its KL reading, and the flow-matching (SFT) baseline.

D-OPSD grades one student state x at noise level σ with the student's and the teacher's
velocities ``u_s = v_θ(x, σ, c_s)`` and ``u_t = v_θ̄(x, σ, c_t)``:

    velocity space:  L = mean((u_s − u_t)²)
    x0 space:        L = mean((x0(x, σ, u_s) − x0(x, σ, u_t))²) = σ²·mean((u_s − u_t)²)

since ``x0 = x − σ·v`` and x cancels. The x0 loss (used by all released trainers) is the
velocity loss weighted toward high-noise steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .checks import check_velocity
from .conventions import VelocityFn, expand_sigma, noise_state, velocity_target, x0_from_velocity

Space = Literal["velocity", "x0"]

__all__ = [
    "Space",
    "check_space",
    "dopsd_step_loss",
    "per_sample_step_loss",
    "gaussian_kl_step",
    "flow_matching_loss",
    "sample_training_sigmas",
]


def check_space(space: str) -> None:
    """Raise ``ValueError`` unless ``space`` is "velocity" or "x0"."""
    if space not in ("velocity", "x0"):
        raise ValueError(f"space must be 'velocity' or 'x0', got {space!r}")


def per_sample_step_loss(u_s: Tensor, u_t: Tensor, x: Tensor, sigma: Tensor, space: Space) -> Tensor:
    """Per-sample D-OPSD loss at one state, shape [B] (mean over all non-batch elements).

    Args:
        u_s: student velocity [B, ...].
        u_t: teacher velocity [B, ...] (detached by the caller).
        x: the state both were queried on [B, ...].
        sigma: its noise level, scalar or [B].
        space: "velocity" → mean((u_s − u_t)²); "x0" → mean((x0_s − x0_t)²).
    """
    check_space(space)
    if space == "x0":
        diff = x0_from_velocity(x, sigma, u_s) - x0_from_velocity(x, sigma, u_t)
    else:
        diff = u_s - u_t
    return diff.pow(2).flatten(1).mean(dim=1)


def dopsd_step_loss(u_s: Tensor, u_t: Tensor, x: Tensor, sigma: Tensor, space: Space) -> Tensor:
    """D-OPSD loss at one roll-out state: the batch mean of :func:`per_sample_step_loss`."""
    return per_sample_step_loss(u_s, u_t, x, sigma, space).mean()


def gaussian_kl_step(
    u_s: Tensor, u_t: Tensor, sigma: Tensor | float, sigma_next: Tensor | float, variance: float = 1.0
) -> Tensor:
    """KL between the teacher's and the student's Gaussian transition from the same state.

    With both roles using the same isotropic transition covariance ``Σ = variance·I``::

        KL( N(x + Δσ·u_t, Σ) || N(x + Δσ·u_s, Σ) ) = Δσ²·||u_s − u_t||² / (2·variance),

    with ``Δσ = σ' − σ``: the per-step MSE is the per-step KL up to the constant
    ``Δσ²·D / (2·variance)`` (D = elements per sample), the diffusion analogue of per-token
    KL in on-policy distillation of language models.

    Returns:
        The KL per sample, shape [B] (summed over elements, not averaged).
    """
    if not variance > 0:
        raise ValueError(f"variance must be > 0, got {variance!r}")
    d_sigma = expand_sigma(sigma_next, u_s) - expand_sigma(sigma, u_s)
    sq = (d_sigma * (u_s - u_t)).pow(2).flatten(1).sum(dim=1)
    return sq / (2.0 * variance)


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None = None,
    kind: Literal["uniform", "logit_normal", "mixed"] = "logit_normal",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    eps: float = 1e-4,
) -> Tensor:
    """Random noise levels for flow-matching training, shape [B], in [eps, 1 − eps].

    ``uniform``: σ ~ U(0, 1). ``logit_normal``: σ = sigmoid(n), n ~ N(0, 1) (SD3). ``mixed``:
    each sample takes one of the two at random.
    """
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    ln = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float64))
    if kind == "uniform":
        s = u
    elif kind == "logit_normal":
        s = ln
    elif kind == "mixed":
        pick = torch.rand(batch, generator=generator, dtype=torch.float64) < 0.5
        s = torch.where(pick, u, ln)
    else:
        raise ValueError(f"kind must be 'uniform', 'logit_normal' or 'mixed', got {kind!r}")
    return s.clamp(eps, 1.0 - eps).to(device=device, dtype=dtype)


def flow_matching_loss(model: VelocityFn, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The flow-matching (SFT) loss on noised targets — the off-policy baseline.

    ``L = mean((v_θ(x_σ, σ) − (ε − x0))²)`` with ``x_σ = (1 − σ)·x0 + σ·ε``. The query
    states x_σ come from the *targets*, not from the few-step sampler: this is why SFT is
    off-policy for a step-distilled model.

    Args:
        model: velocity model ``(x, σ [B]) -> v``.
        x0: target images [B, ...]. noise: ε [B, ...]. sigma: noise levels [B].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
    x = noise_state(x0, noise, sigma)
    v = check_velocity(model(x, sigma), x, role="model", step=0, sigma=sigma.flatten()[0])
    return (v - velocity_target(x0, noise)).pow(2).mean()
