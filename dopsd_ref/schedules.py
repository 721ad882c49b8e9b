"""Few-step σ grids for the student's roll-out and for sampling.

A grid is a 1-D tensor ``sigmas = [σ_1, ..., σ_K]`` with ``1 = σ_1 > σ_2 > ... > σ_K > 0``.
The sampler takes K Euler steps ``σ_k → σ_{k+1}`` and the last one goes ``σ_K → 0``
(the terminal 0 is implicit and never stored). Every constructor here returns a grid that
:func:`validate_sigmas` accepts; every invalid grid raises ``ValueError`` naming the problem.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "validate_sigmas",
    "uniform_sigmas",
    "shifted_sigmas",
    "ZIMAGE_TURBO_4",
    "ZIMAGE_TURBO_8",
    "zimage_turbo_sigmas",
    "flux2_empirical_mu",
    "flux2_sigmas",
    "step_sizes",
]

# Z-Image-Turbo grids of the released D-OPSD training code (σ-convention, terminal 0 implied).
ZIMAGE_TURBO_4: tuple[float, ...] = (1.0, 0.9, 0.75, 0.5)
# The 8-step grid at full precision: the float32 values held by diffusers'
# FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0) after set_timesteps(9)
# (its first 8 σ), written out exactly. In closed form (real arithmetic):
#     σ_min = 6·0.001 / (1 + 5·0.001),  s_k = 1 − (k − 1)·(1 − σ_min)/8,  σ_k = 6·s_k / (1 + 5·s_k)
# for k = 1..8; the float32 rounding moves each value by < 3e-8. They agree with the released
# digits (0.9768991, ..., 0.4732203) to 7 decimals.
ZIMAGE_TURBO_8: tuple[float, ...] = (
    1.0,
    0.9768990874290466,
    0.9477646946907043,
    0.9098781943321228,
    0.8585987091064453,
    0.7852997779846191,
    0.6719211935997009,
    0.4732203483581543,
)


def validate_sigmas(sigmas: Sequence[float] | Tensor) -> Tensor:
    """Check a σ grid and return it as a 1-D float tensor.

    Args:
        sigmas: the K noise levels ``[σ_1, ..., σ_K]`` (terminal 0 not included).

    Returns:
        The grid as a 1-D floating tensor (float64 unless a floating tensor was given).

    Raises:
        ValueError: if the grid is empty, not 1-D, holds NaN/inf, does not start at exactly
            1, is not strictly decreasing, or has a value outside (0, 1].
    """
    if isinstance(sigmas, Tensor):
        s = sigmas.detach()
        if not s.is_floating_point():
            s = s.to(torch.float64)
    else:
        try:
            s = torch.tensor(list(sigmas), dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sigmas must be a sequence of numbers, got {sigmas!r}") from exc
    if s.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        raise ValueError("sigmas is empty: a roll-out needs at least one step")
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas contains NaN or inf: {s.tolist()}")
    if s[0].item() != 1.0:
        raise ValueError(f"sigmas[0] must be exactly 1 (pure noise), got {s[0].item()!r}")
    bad = ((s <= 0) | (s > 1)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"sigmas[{i}] = {s[i].item()!r} is outside (0, 1]")
    if s.numel() > 1:
        diffs = s[1:] - s[:-1]
        bad = (diffs >= 0).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"sigmas must be strictly decreasing: sigmas[{i}] = {s[i].item()!r} "
                f"<= sigmas[{i + 1}] = {s[i + 1].item()!r}"
            )
    return s


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


def uniform_sigmas(num_steps: int) -> Tensor:
    """Uniform grid ``σ_k = 1 − (k − 1)/K`` for k = 1..K (``linspace(1, 1/K, K)``)."""
    _check_steps(num_steps)
    return validate_sigmas(torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64))


def shifted_sigmas(num_steps: int, shift: float) -> Tensor:
    """Statically shifted uniform grid, as in SD3/Z-Image schedulers.

    ``σ' = s·σ / (1 + (s − 1)·σ)`` applied to :func:`uniform_sigmas`; ``s > 1`` spends
    more steps at high noise.
    """
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    s = uniform_sigmas(num_steps)
    shifted = shift * s / (1.0 + (shift - 1.0) * s)
    shifted[0] = 1.0  # exact in real arithmetic; pin it against rounding (e.g. 1 + (0.2 − 1) ≠ 0.2)
    return validate_sigmas(shifted)


def zimage_turbo_sigmas(num_steps: int) -> Tensor:
    """The Z-Image-Turbo grid of the released code for K = 4 or K = 8."""
    grids = {4: ZIMAGE_TURBO_4, 8: ZIMAGE_TURBO_8}
    if num_steps not in grids:
        raise ValueError(f"the released Z-Image-Turbo grids have K = 4 or 8, got {num_steps!r}")
    return validate_sigmas(grids[num_steps])


def flux2_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's empirical resolution/step-dependent shift ``mu``.

    A linear fit in the number of image tokens, interpolated in the number of steps between
    fits made at 10 and 200 steps (large images use the 200-step fit alone), as in the
    FLUX.2 pipelines of diffusers.
    """
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len!r}")
    _check_steps(num_steps)
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    m_200 = a2 * image_seq_len + b2
    if image_seq_len > 4300:
        return float(m_200)
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    return float(slope * num_steps + (m_200 - 200.0 * slope))


def flux2_sigmas(num_steps: int, image_seq_len: int) -> Tensor:
    """FLUX.2 grid: exponential time shift of ``linspace(1, 1/K, K)`` with the empirical mu.

    ``σ' = e^mu / (e^mu + (1/σ − 1))`` with ``mu = flux2_empirical_mu(image_seq_len, K)``;
    ``image_seq_len`` is the number of packed latent tokens (H·W/256 for pixel sizes H, W).
    """
    mu = flux2_empirical_mu(image_seq_len, num_steps)
    s = uniform_sigmas(num_steps)
    em = math.exp(mu)
    shifted = em / (em + (1.0 / s - 1.0))
    shifted[0] = 1.0  # exact in real arithmetic; pinned against rounding
    return validate_sigmas(shifted)


def step_sizes(sigmas: Tensor) -> Tensor:
    """The K Euler step sizes ``Δσ_k = σ_{k+1} − σ_k`` (negative), with σ_{K+1} = 0."""
    s = validate_sigmas(sigmas)
    return torch.cat([s[1:], s.new_zeros(1)]) - s
