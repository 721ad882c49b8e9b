"""Few-step Euler sampling of toy denoisers (σ = 1 noise → σ = 0 data).

``x_{σ'} = x_σ + (σ' − σ)·v(x_σ, σ, c)`` on the grid ``σ_1 = 1 > … > σ_K`` then 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dopsd_ref.sampling import euler_sample
from dopsd_ref.schedules import uniform_sigmas

from toy_models.models.context import ToyContext


def noise_like(n: int, seed: int, shape: tuple[int, ...] = (3, 16, 16)) -> Tensor:
    """Deterministic standard-normal noise [n, *shape] from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


@torch.no_grad()
def sample(
    model: nn.Module,
    context: ToyContext,
    steps: int = 4,
    seed: int = 0,
    noise: Optional[Tensor] = None,
    sigmas: Optional[Tensor] = None,
    batch_size: int = 256,
) -> Tensor:
    """Sample images [B, 3, 16, 16] (clamped to [−1, 1]) with a K-step Euler sampler.

    Args:
        model: velocity model ``model(x, sigma[B], context)``.
        context: B contexts (text-only for the student, with ``ref`` for the teacher).
        steps: K, used with the uniform grid ``linspace(1, 1/K, K)`` unless ``sigmas``.
        seed: noise seed (ignored when ``noise`` is given).
    """
    was_training = model.training
    model.eval()
    B = context.batch_size
    x = noise_like(B, seed) if noise is None else noise.clone()
    grid = uniform_sigmas(steps) if sigmas is None else sigmas
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, B, batch_size):
        xi = x[i : i + batch_size].to(dev)
        ci = context[i : i + batch_size].to(dev)
        xi = euler_sample(lambda z, sig: model(z, sig, ci), xi, grid)
        outs.append(xi.clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(outs)
