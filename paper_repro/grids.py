"""σ grids for the real backbones: thin wrappers over ``dopsd_ref.schedules``.

FLUX.2-klein has two 4-step grids that differ, both built by diffusers'
``FlowMatchEulerDiscreteScheduler`` with the exponential time shift
``σ' = e^mu / (e^mu + (1/σ − 1))`` and ``mu = compute_empirical_mu(image_seq_len, K)``:

* ``"flux2_sampler"`` (default) — what ``Flux2KleinPipeline`` samples with: it calls
  ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=mu)``. At 1024² (4096 tokens), K = 4:
  σ ≈ {1, 0.967, 0.908, 0.767}.
* ``"flux2_released"`` — what the released klein D-OPSD trainer rolls out on: it calls
  ``set_timesteps(K, mu=mu)`` without ``sigmas``, so the scheduler starts from
  ``linspace(σ_max, σ_min, K) = linspace(1, 1/1000, K)`` (its 1000 training timesteps)
  before the shift. At 4096 tokens, K = 4: σ ≈ {1, 0.952, 0.832, 0.0098}, a last step that
  ends almost at the data, unlike the sampler's.

The default is the sampler's grid because D-OPSD's premise is on-policy training: the
student should be trained on the states its few-step sampler visits at inference
(``dopsd_ref.dopsd_rollout_loss`` visits exactly ``euler_sample``'s states for the same
grid). The released grid is offered to reproduce the released runs (``train.sigmas:
flux2_released`` in a run config). The Z-Image-Turbo grids are the released training grids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dopsd_ref.schedules import ZIMAGE_TURBO_4, ZIMAGE_TURBO_8, flux2_empirical_mu, flux2_sigmas, validate_sigmas

__all__ = ["FLUX2_GRIDS", "flux2_grid", "flux2_released_grid", "zimage_grid", "training_grid"]

# Named FLUX.2 grids accepted as ``sigmas`` by :func:`training_grid` (and ``train.sigmas`` in a config).
FLUX2_GRIDS: tuple[str, ...] = ("flux2_sampler", "flux2_released")


def flux2_grid(num_steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2-klein sampler grid: ``σ' = e^mu / (e^mu + (1/σ − 1))`` on ``linspace(1, 1/K, K)``.

    ``mu = flux2_empirical_mu(image_seq_len, K)`` with ``image_seq_len`` = packed latent
    tokens (H·W/256 at the VAE's 16x total down-sampling). Same values as diffusers'
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/K, K), mu=...)``,
    which is what ``Flux2KleinPipeline`` calls.
    """
    return flux2_sigmas(num_steps, image_seq_len)


def flux2_released_grid(num_steps: int, image_seq_len: int, num_train_timesteps: int = 1000) -> Tensor:
    """The released klein trainer's roll-out grid: ``set_timesteps(K, mu=...)`` without ``sigmas``.

    ``σ_k = e^mu / (e^mu + (1/s_k − 1))`` with ``s = linspace(1, 1/N, K)``, N = the scheduler's
    ``num_train_timesteps`` (its σ_min = 1/N with dynamic shifting) and the same
    ``mu = flux2_empirical_mu(image_seq_len, K)`` as :func:`flux2_grid`.
    """
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps!r}")
    mu = flux2_empirical_mu(image_seq_len, num_steps)
    s = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps, dtype=torch.float64)
    em = math.exp(mu)
    shifted = em / (em + (1.0 / s - 1.0))
    shifted[0] = 1.0  # exact in real arithmetic; pinned against rounding
    return validate_sigmas(shifted)


def zimage_grid(num_steps: int) -> Tensor:
    """Released Z-Image-Turbo training grids: K = 4 {1, .9, .75, .5} or the native K = 8."""
    grids = {4: ZIMAGE_TURBO_4, 8: ZIMAGE_TURBO_8}
    if num_steps not in grids:
        raise ValueError(f"Z-Image-Turbo training grids exist for K = 4 or 8, got num_steps={num_steps}")
    return validate_sigmas(grids[num_steps])


def training_grid(backbone: str, num_steps: int, image_seq_len: int | None = None,
                  sigmas: tuple[float, ...] | str | None = None) -> Tensor:
    """The roll-out grid for ``backbone`` ("zimage" | "flux2").

    ``sigmas``: None (the backbone's default: Z-Image's released grid, FLUX.2's sampler grid),
    a name from :data:`FLUX2_GRIDS` (FLUX.2 only), or explicit values.
    """
    if isinstance(sigmas, str):
        if sigmas not in FLUX2_GRIDS:
            raise ValueError(f"train.sigmas: unknown grid name {sigmas!r}; named grids: {FLUX2_GRIDS} "
                             "(or give the σ values)")
        if backbone != "flux2":
            raise ValueError(f"train.sigmas: the named grid {sigmas!r} is a FLUX.2 grid, but the backbone is {backbone!r}")
    elif sigmas:
        return validate_sigmas(torch.tensor(sigmas, dtype=torch.float64))
    if backbone == "zimage":
        return zimage_grid(num_steps)
    if backbone == "flux2":
        if image_seq_len is None:
            raise ValueError("flux2 grid needs image_seq_len (packed latent tokens)")
        if sigmas == "flux2_released":
            return flux2_released_grid(num_steps, image_seq_len)
        return flux2_grid(num_steps, image_seq_len)
    raise ValueError(f"unknown backbone {backbone!r}; expected 'zimage' or 'flux2'")
