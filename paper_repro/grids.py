"""σ grids for the real backbones, built on ``dopsd_ref.schedules``.

``flux2_grid`` evaluates FLUX.2's exponential time shift in Python floats, so σ_1 is exactly
1 (``dopsd_ref.schedules.validate_sigmas`` insists on it). ``torch``'s ``scalar / tensor``
goes through a reciprocal and can give ``0.9999999999999999`` there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dopsd_ref.schedules import ZIMAGE_TURBO_4, ZIMAGE_TURBO_8, flux2_empirical_mu, validate_sigmas

__all__ = ["flux2_grid", "zimage_grid", "training_grid"]


def flux2_grid(num_steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2-klein grid: ``σ' = e^mu / (e^mu + (1/σ − 1))`` on ``linspace(1, 1/K, K)``.

    ``mu = flux2_empirical_mu(image_seq_len, K)`` with ``image_seq_len`` = packed latent
    tokens (H·W/256 at the VAE's 16x total down-sampling). Same values as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=compute_empirical_mu(...))``.
    """
    mu = flux2_empirical_mu(image_seq_len, num_steps)
    em = math.exp(mu)
    base = [1.0 - i * (1.0 - 1.0 / num_steps) / max(num_steps - 1, 1) for i in range(num_steps)]
    return validate_sigmas([em / (em + (1.0 / s - 1.0)) for s in base])


def zimage_grid(num_steps: int) -> Tensor:
    """Released Z-Image-Turbo training grids: K = 4 {1, .9, .75, .5} or the native K = 8."""
    grids = {4: ZIMAGE_TURBO_4, 8: ZIMAGE_TURBO_8}
    if num_steps not in grids:
        raise ValueError(f"Z-Image-Turbo training grids exist for K = 4 or 8, got num_steps={num_steps}")
    return validate_sigmas(grids[num_steps])


def training_grid(backbone: str, num_steps: int, image_seq_len: int | None = None,
                  sigmas: tuple[float, ...] | None = None) -> Tensor:
    """The roll-out grid for ``backbone`` ("zimage" | "flux2"), or explicit ``sigmas``."""
    if sigmas:
        return validate_sigmas(torch.tensor(sigmas, dtype=torch.float64))
    if backbone == "zimage":
        return zimage_grid(num_steps)
    if backbone == "flux2":
        if image_seq_len is None:
            raise ValueError("flux2 grid needs image_seq_len (packed latent tokens)")
        return flux2_grid(num_steps, image_seq_len)
    raise ValueError(f"unknown backbone {backbone!r}; expected 'zimage' or 'flux2'")
