"""One D-OPSD step through the real training script.

Invariants: the optimizer step changes only the student LoRA tensors (base weights and all
non-LoRA tensors are bit-identical), and the EMA teacher moves by exactly (1 − d)·Δ where Δ is
the student's change (teacher and student start equal, so θ̄' = d·θ̄ + (1 − d)·θ' gives
θ̄' − θ̄ = (1 − d)·(θ' − θ)). A resumed run continues bit-for-bit, and the saved LoRA loads
into the diffusers pipeline and reproduces the trained student's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dopsd_ref.lora import STUDENT, TEACHER, lora_parameters
from .helpers import make_folder, tiny_config


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backbone", ["zimage", "flux2"])
def test_one_step_updates_only_student_and_ema_moves_by_one_minus_d(tmp_path, backbone):
    from paper_repro.train import DOPSDTrainer

    cfg = tiny_config(backbone, make_folder(tmp_path / "data"), tmp_path / "run")
    tr = DOPSDTrainer(cfg)
    before = _snapshot(tr.unwrapped)
    s0 = {k: v.clone() for k, v in lora_parameters(tr.unwrapped, STUDENT).items()}
    t0 = {k: v.clone() for k, v in lora_parameters(tr.unwrapped, TEACHER).items()}
    assert all(torch.equal(s0[k], t0[k.replace(".student.", ".teacher.")]) for k in s0)
    metrics = tr.train_step()
    assert metrics["step"] == 1 and metrics["grad_norm"] > 0
    assert metrics["teacher_frac"] == pytest.approx(1 - cfg.train.ema_decay, rel=1e-5)  # B starts at 0
    after = _snapshot(tr.unwrapped)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing was trained"
    # Base weights and every non-LoRA tensor are untouched; the student moved by the optimizer,
    # the teacher only by the EMA (checked below).
    assert all("lora_" in k and (".student." in k or ".teacher." in k) for k in changed), sorted(changed)[:5]
    trainable = {id(p) for p in tr.params}
    assert trainable == {id(p) for p in lora_parameters(tr.unwrapped, STUDENT).values()}
    # LoRA B starts at 0 and must move (otherwise the student never leaves the base model).
    assert any("lora_B" in k for k in changed)
    d = cfg.train.ema_decay
    s1 = lora_parameters(tr.unwrapped, STUDENT)
    t1 = lora_parameters(tr.unwrapped, TEACHER)
    for k in s0:
        kt = k.replace(".student.", ".teacher.")
        delta = s1[k].detach() - s0[k]
        torch.testing.assert_close(t1[kt].detach() - t0[kt], (1 - d) * delta, atol=1e-7, rtol=1e-5)


def test_resume_is_exact(tmp_path):
    """2 steps straight == 1 step, atomic checkpoint, fresh process state, resume, 1 step."""
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    a = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "a"))
    a.train_step()
    a.train_step()
    b = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "b"))
    b.train_step()
    ck = b.save_checkpoint()
    assert ck.name == "step_00000001" and (ck.parent / "latest").read_text() == ck.name + "\n"
    assert not list(ck.parent.glob(".*")), "temporary checkpoint folder left behind"
    assert not list(ck.glob("*.pt")) and (ck / "adapters.safetensors").exists() and (ck / "manifest.json").exists()
    torch.manual_seed(1234)  # disturb the global RNG: the resume must restore it
    c = DOPSDTrainer(tiny_config("zimage", data, tmp_path / "b"))
    assert c.load_checkpoint() and c.step == 1
    c.train_step()
    for adapter in (STUDENT, TEACHER):
        pa, pc = lora_parameters(a.unwrapped, adapter), lora_parameters(c.unwrapped, adapter)
        for k in pa:
            assert torch.equal(pa[k], pc[k]), k
    sa, sc = a.optimizer.state_dict()["state"], c.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sc[i]["exp_avg"])


def test_saved_lora_loads_into_pipeline_and_reproduces_student(tmp_path):
    """pipe.load_lora_weights(saved) gives the trained student's latents (same noise and embeds)."""
    from dopsd_ref.sampling import euler_sample
    from paper_repro.adapters import ZImageVelocity
    from paper_repro.tiny import tiny_zimage_pipeline
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("zimage", make_folder(tmp_path / "data"), tmp_path / "run", lr=5e-2))
    tr.train_step()
    tr.train_step()
    path = tr.save_lora()
    assert (path / "pytorch_lora_weights.safetensors").exists()
    caps = [torch.randn(7, 32, generator=torch.Generator().manual_seed(0))]
    noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    sig = [1.0, 0.75, 0.5]
    tr.unwrapped.eval()
    ours = euler_sample(ZImageVelocity(tr.unwrapped, caps), noise, torch.tensor(sig))

    pipe = tiny_zimage_pipeline(seed=0)
    base = pipe(prompt_embeds=caps, latents=noise.clone(), sigmas=sig, num_inference_steps=3, guidance_scale=0.0,
                height=8, width=8, output_type="latent").images
    pipe.load_lora_weights(str(path))
    loaded = pipe(prompt_embeds=caps, latents=noise.clone(), sigmas=sig, num_inference_steps=3, guidance_scale=0.0,
                  height=8, width=8, output_type="latent").images
    assert (ours - base).abs().max() > 1e-4, "training did not change the output; the test would be vacuous"
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)


def test_saved_flux2_lora_loads_into_klein_pipeline_and_reproduces_student(tmp_path):
    """Same for FLUX.2-klein: double- and single-stream LoRA keys load through Flux2LoraLoaderMixin."""
    from dopsd_ref.sampling import euler_sample
    from paper_repro.adapters import Flux2Velocity, flux2_pack, flux2_packed_to_pipeline_latents
    from paper_repro.grids import flux2_grid
    from paper_repro.tiny import tiny_flux2_klein_pipeline
    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("flux2", make_folder(tmp_path / "data"), tmp_path / "run", lr=5e-2))
    tr.train_step()
    tr.train_step()
    path = tr.save_lora()
    emb = torch.randn(1, 6, 96, generator=torch.Generator().manual_seed(0))
    n4 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    tr.unwrapped.eval()
    pipe = tiny_flux2_klein_pipeline(seed=0)
    ours = euler_sample(Flux2Velocity(tr.unwrapped, emb, 4, 4), flux2_pack(n4), flux2_grid(3, 16).float())
    ours = flux2_packed_to_pipeline_latents(ours, 4, 4, pipe.vae)
    kw = dict(prompt_embeds=emb, num_inference_steps=3, guidance_scale=1.0, height=8, width=8, output_type="latent")
    base = pipe(latents=n4.clone(), **kw).images
    pipe.load_lora_weights(str(path))
    loaded = pipe(latents=n4.clone(), **kw).images
    assert (ours - base).abs().max() > 1e-5, "training did not change the output; the test would be vacuous"
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=1e-4)


def test_cli_resumes_from_latest_checkpoint_bit_exactly(tmp_path):
    """``python -m paper_repro.train`` twice (2 steps, then to 3) == one run of 3 steps."""
    from paper_repro.train import main

    data = make_folder(tmp_path / "data")
    cfg = Path(__file__).resolve().parents[2] / "paper_repro" / "configs" / "tiny_zimage.yaml"
    common = ["--config", str(cfg), "--set", f"data.root={data}", "--set", "train.gradient_checkpointing=false"]
    straight = main(common + ["--set", f"output_dir={tmp_path / 'a'}", "--set", "train.steps=3"])
    main(common + ["--set", f"output_dir={tmp_path / 'b'}", "--set", "train.steps=2"])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = main(common + ["--set", f"output_dir={tmp_path / 'b'}", "--set", "train.steps=3"])
    assert resumed.step == 3
    for adapter in (STUDENT, TEACHER):
        pa, pb = lora_parameters(straight.unwrapped, adapter), lora_parameters(resumed.unwrapped, adapter)
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    steps = [json.loads(line).get("step") for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3]


def test_checkpoint_restores_python_numpy_torch_rng(tmp_path):
    """Per-rank RNG states round-trip through the (pickle-free, weights_only) checkpoint."""
    import random

    import numpy as np

    from paper_repro.train import DOPSDTrainer

    tr = DOPSDTrainer(tiny_config("zimage", make_folder(tmp_path / "data"), tmp_path / "run"))
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    tr.save_checkpoint()
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    assert tr.load_checkpoint()
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


@pytest.mark.parametrize("backbone", ["zimage", "flux2"])
def test_pretrained_loading_path_from_local_folders(tmp_path, backbone):
    """The real-run path (``from_pretrained`` of the pipeline and of Qwen3-VL, by folder) trains a step.

    Tiny pipelines / VLM are saved with ``save_pretrained`` and loaded back exactly as a GPU run
    loads ``Tongyi-MAI/Z-Image-Turbo`` / ``Qwen/Qwen3-VL-4B-Instruct`` (no network involved).
    """
    import dataclasses

    from paper_repro.tiny import (build_tokenizer, tiny_flux2_klein_pipeline, tiny_qwen3_vl,
                                  tiny_qwen3_vl_image_processor, tiny_zimage_pipeline)
    from paper_repro.train import DOPSDTrainer

    pipe = tiny_zimage_pipeline() if backbone == "zimage" else tiny_flux2_klein_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    tok = build_tokenizer()
    tiny_qwen3_vl(tok).save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    tiny_qwen3_vl_image_processor().save_pretrained(tmp_path / "vlm")
    cfg = tiny_config(backbone, make_folder(tmp_path / "data"), tmp_path / "run")
    model = dataclasses.replace(cfg.model, tiny=False, pretrained=str(tmp_path / "pipe"), vlm=str(tmp_path / "vlm"),
                                vlm_min_pixels=16 * 16, vlm_max_pixels=32 * 32,
                                flux2_teacher="vlm" if backbone == "flux2" else "editing")
    tr = DOPSDTrainer(dataclasses.replace(cfg, model=model))
    assert tr.comps.vlm_report.fraction == 1.0
    assert tr.train_step()["grad_norm"] > 0
