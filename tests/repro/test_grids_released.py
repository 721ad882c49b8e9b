"""FLUX.2-klein's two roll-out grids, checked against diffusers' own scheduler.

* ``flux2_released_grid`` is what the released klein trainer rolls out on:
  ``FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=compute_empirical_mu(N, K))`` with the
  klein scheduler config and no ``sigmas``.
* It is not the sampler's grid (``set_timesteps(sigmas=linspace(1, 1/K, K), mu=...)``, what
  ``Flux2KleinPipeline`` calls): at 4096 tokens, K = 4, its last σ is ≈ 0.0098, the sampler's ≈ 0.767.
* The sampler's grid stays the default; the released one is the named option ``flux2_released``,
  reaching the trainer through ``train.sigmas``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CASES = [(4, 4096), (4, 1024), (8, 256), (2, 5000), (3, 16), (1, 64)]


@pytest.mark.parametrize("k, seq", CASES)
def test_released_grid_is_set_timesteps_without_sigmas(k, seq):
    """Our closed form equals the scheduler's sigmas for set_timesteps(K, mu) (klein config)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from paper_repro.grids import flux2_released_grid
    from paper_repro.tiny import klein_scheduler

    sch = klein_scheduler()
    sch.set_timesteps(k, mu=compute_empirical_mu(seq, k))
    torch.testing.assert_close(flux2_released_grid(k, seq).float(), sch.sigmas[:-1].float(), atol=1e-6, rtol=0)


def test_released_grid_differs_from_the_samplers():
    """At 1024² (4096 tokens), K = 4: released {1, .952, .832, .0098}, sampler {1, .967, .908, .767},
    both reproduced from the scheduler; the two coincide only at σ = 1."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from paper_repro.grids import flux2_grid, flux2_released_grid
    from paper_repro.tiny import klein_scheduler

    mu = compute_empirical_mu(4096, 4)
    sampler = klein_scheduler()
    sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=mu)
    torch.testing.assert_close(flux2_grid(4, 4096).float(), sampler.sigmas[:-1], atol=1e-6, rtol=0)
    released = flux2_released_grid(4, 4096)
    torch.testing.assert_close(released, torch.tensor([1.0, 0.9519, 0.8322, 0.0098], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(flux2_grid(4, 4096), torch.tensor([1.0, 0.9674, 0.9081, 0.7672], dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert bool((released[1:] < flux2_grid(4, 4096)[1:]).all())


def test_training_grid_names_and_errors():
    """Default = sampler grid; "flux2_released" = the released grid; "flux2_sampler" = the default;
    a unknown name or a FLUX.2 name for Z-Image is an error that names train.sigmas."""
    from paper_repro.grids import flux2_grid, flux2_released_grid, training_grid

    assert torch.equal(training_grid("flux2", 4, 4096), flux2_grid(4, 4096))
    assert torch.equal(training_grid("flux2", 4, 4096, "flux2_sampler"), flux2_grid(4, 4096))
    assert torch.equal(training_grid("flux2", 4, 4096, "flux2_released"), flux2_released_grid(4, 4096))
    assert training_grid("flux2", 2, 16, (1.0, 0.5)).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="train.sigmas: unknown grid name 'released'"):
        training_grid("flux2", 4, 4096, "released")
    with pytest.raises(ValueError, match="FLUX.2 grid, but the backbone is 'zimage'"):
        training_grid("zimage", 4, None, "flux2_released")


def test_trainer_rolls_out_on_the_named_grid(tmp_path):
    """``train.sigmas: flux2_released`` reaches the trainer's micro-batch grid."""
    from paper_repro.grids import flux2_released_grid
    from paper_repro.train import DOPSDTrainer

    from .helpers import make_folder, tiny_config

    data = make_folder(tmp_path / "data", sizes=((32, 32), (32, 32)))
    tr = DOPSDTrainer(tiny_config("flux2", data, tmp_path / "run", sigmas="flux2_released"))
    noise, sigmas, _, _ = tr.micro_batch(0, 0)
    torch.testing.assert_close(sigmas, flux2_released_grid(4, noise.shape[1]).float())
