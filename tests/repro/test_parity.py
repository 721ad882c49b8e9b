"""Training states are inference states: the adapters' Euler roll-outs reproduce the pipelines.

With the same noise, σ grid and prompt embeddings, ``dopsd_ref.sampling.euler_sample`` and the
states of ``dopsd_ref.dopsd_rollout_loss`` driven through the σ-velocity adapters must give the
latents that ``ZImagePipeline(..., output_type="latent")`` and ``Flux2KleinPipeline`` produce,
step by step (captured with ``callback_on_step_end``). Tiny components, CPU, float32.
"""

from __future__ import annotations

import pytest
import torch

from dopsd_ref import dopsd_rollout_loss
from dopsd_ref.sampling import euler_sample
from dopsd_ref.schedules import ZIMAGE_TURBO_4, uniform_sigmas
from paper_repro.grids import flux2_grid
from paper_repro.adapters import Flux2Velocity, ZImageVelocity, flux2_pack, flux2_packed_to_pipeline_latents

ATOL = 2e-5


def _capture():
    states = []

    def cb(pipe, i, t, kw):
        states.append(kw["latents"].clone())
        return {}

    return states, cb


def _zimage_caps(batch: int, dim: int = 32, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5 + 3 * i, dim, generator=g) for i in range(batch)]  # ragged lengths


@pytest.mark.parametrize("grid", ["turbo4", "uniform3"])
def test_zimage_rollout_matches_pipeline(zimage_pipe, grid):
    """Z-Image: −output at t = 1 − σ, list-of-latents and ragged captions give the pipeline's states."""
    sigmas = torch.tensor(ZIMAGE_TURBO_4) if grid == "turbo4" else uniform_sigmas(3)
    caps = _zimage_caps(2)
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    states, cb = _capture()
    ref = zimage_pipe(
        prompt_embeds=caps, latents=noise.clone(), sigmas=sigmas.tolist(), num_inference_steps=len(sigmas),
        guidance_scale=0.0, height=8, width=8, output_type="latent", callback_on_step_end=cb,
    ).images
    student = ZImageVelocity(zimage_pipe.transformer, caps)
    ours = euler_sample(student, noise, sigmas.float(), return_states=True)
    assert ours.shape == (len(sigmas) + 1, 2, 16, 4, 4)
    torch.testing.assert_close(ours[-1], ref, atol=ATOL, rtol=1e-4)
    for k, s in enumerate(states):
        torch.testing.assert_close(ours[k + 1], s, atol=ATOL, rtol=1e-4)
    # The training roll-out visits the same states (teacher = student here).
    out = dopsd_rollout_loss(student, student, noise, sigmas.float())
    torch.testing.assert_close(out.states, ours, atol=1e-6, rtol=0)


def test_zimage_shifted_scheduler_grid(zimage_pipe):
    """With the Turbo scheduler's static shift (3.0), the pipeline's own σ grid is reproduced too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    zimage_pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    caps = _zimage_caps(1)
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = zimage_pipe(prompt_embeds=caps, latents=noise.clone(), num_inference_steps=3, guidance_scale=0.0,
                      height=8, width=8, output_type="latent").images
    sigmas = zimage_pipe.scheduler.sigmas[:-1].clone()
    ours = euler_sample(ZImageVelocity(zimage_pipe.transformer, caps), noise, sigmas)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)


def test_flux2_rollout_matches_klein_pipeline(flux2_pipe):
    """FLUX.2: packed tokens, position ids, timestep σ and the empirical-mu grid give klein's latents."""
    b, h, w = 2, 4, 4  # latent token grid; pixels = 2 * 2 * 4 = 16 (tiny VAE scale 1, patch 2)
    steps = 4
    g = torch.Generator().manual_seed(0)
    noise4 = torch.randn(b, 4, h, w, generator=g)  # (B, 4C, h, w) patchified, as the pipeline's latents arg
    emb = torch.randn(b, 6, flux2_pipe.transformer.config.joint_attention_dim, generator=g)
    states, cb = _capture()
    ref = flux2_pipe(
        prompt_embeds=emb, latents=noise4.clone(), num_inference_steps=steps, guidance_scale=1.0,
        height=2 * h * flux2_pipe.vae_scale_factor, width=2 * w * flux2_pipe.vae_scale_factor,
        output_type="latent", callback_on_step_end=cb,
    ).images
    sigmas = flux2_grid(steps, image_seq_len=h * w).float()
    torch.testing.assert_close(sigmas, flux2_pipe.scheduler.sigmas[:-1], atol=1e-6, rtol=0)
    student = Flux2Velocity(flux2_pipe.transformer, emb, h, w)
    ours = euler_sample(student, flux2_pack(noise4), sigmas, return_states=True)
    for k, s in enumerate(states):
        torch.testing.assert_close(ours[k + 1], s, atol=ATOL, rtol=1e-4)
    final = flux2_packed_to_pipeline_latents(ours[-1], h, w, flux2_pipe.vae)
    torch.testing.assert_close(final, ref, atol=ATOL, rtol=1e-4)
    out = dopsd_rollout_loss(student, student, flux2_pack(noise4), sigmas)
    torch.testing.assert_close(out.states, ours, atol=1e-6, rtol=0)


def test_flux2_editing_teacher_matches_pipeline_with_reference_image(flux2_pipe):
    """Editing branch: reference tokens appended after the latents; only the first N tokens are v.

    Klein with an input image runs exactly this (latents ++ reference tokens, ids with time offset
    10), so the teacher adapter rolled out on its own reproduces the image-conditioned pipeline.
    """
    from PIL import Image

    from paper_repro.adapters import Flux2Reference, flux2_encode_reference, flux2_reference_ids

    h = w = 4
    img = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy())
    g = torch.Generator().manual_seed(1)
    noise4 = torch.randn(1, 4, h, w, generator=g)
    emb = torch.randn(1, 6, flux2_pipe.transformer.config.joint_attention_dim, generator=g)
    ref = flux2_pipe(image=img, prompt_embeds=emb, latents=noise4.clone(), num_inference_steps=2, guidance_scale=1.0,
                     height=8, width=8, output_type="latent").images
    pix = flux2_pipe.image_processor.preprocess(img, height=64, width=64, resize_mode="crop")
    tokens, rh, rw = flux2_encode_reference(flux2_pipe.vae, pix)
    teacher = Flux2Velocity(flux2_pipe.transformer, emb, h, w,
                            reference=Flux2Reference(tokens, flux2_reference_ids([(rh, rw)])))
    sigmas = flux2_grid(2, image_seq_len=h * w).float()
    ours = euler_sample(teacher, flux2_pack(noise4), sigmas)
    torch.testing.assert_close(flux2_packed_to_pipeline_latents(ours, h, w, flux2_pipe.vae), ref, atol=ATOL, rtol=1e-4)
    # And the reference really changes the velocity (it is not ignored).
    plain = Flux2Velocity(flux2_pipe.transformer, emb, h, w)
    x = flux2_pack(noise4)
    s = torch.ones(1)
    assert (teacher(x, s) - plain(x, s)).abs().max() > 1e-4
