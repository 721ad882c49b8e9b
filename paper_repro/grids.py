"""σ grids for the real backbones: thin wrappers over ``dopsd_ref.schedules``."""

from __future__ import annotations

import torch
from torch import Tensor

from dopsd_ref.schedules import ZIMAGE_TURBO_4, ZIMAGE_TURBO_8, flux2_sigmas, validate_sigmas

__all__ = ["flux2_grid", "zimage_grid", "training_grid"]


def flux2_grid(num_steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2-klein grid: ``σ' = e^mu / (e^mu + (1/σ − 1))`` on ``linspace(1, 1/K, K)``.

    ``mu = flux2_empirical_mu(image_seq_len, K)`` with ``image_seq_len`` = packed latent
    tokens (H·W/256 at the VAE's 16x total down-sampling). Same values as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=compute_empirical_mu(...))``.
    """
    return flux2_sigmas(num_steps, image_seq_len)


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
