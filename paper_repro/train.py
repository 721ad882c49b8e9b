"""D-OPSD training on Z-Image-Turbo / FLUX.2-klein with diffusers, peft and accelerate.

Run::

    python -m paper_repro.train --config paper_repro/configs/zimage_turbo_lora.yaml
    accelerate launch --config_file paper_repro/accelerate/ddp_4gpu.yaml \
        -m paper_repro.train --config paper_repro/configs/zimage_turbo_lora.yaml

One optimizer step (per process; gradients are averaged across processes)::

    for m in 1..grad_accum:
        images, prompts <- the rank's slice of one same-bucket global batch
        c_s = text context(prompts)                       exactly the inference path
        c_t = teacher context(prompts, images)            hybrid VLM / editing branch
        out = dopsd_rollout_loss(v_student(., ., c_s), v_teacher(., ., c_t), ε, σ-grid)
              (backward per roll-out step, or once: train.grad_strategy)
    clip ||∇|| to max_grad_norm; AdamW step; teacher <- d·teacher + (1 − d)·student

The roll-out and the loss are ``dopsd_ref.dopsd_rollout_loss`` unchanged; this file only
binds contexts, drives accelerate, and does I/O. Checkpoints (student + teacher weights,
optimizer, per-rank RNG, step) are written to a temporary folder and renamed, so a crash never
leaves a half checkpoint; data order and noise are pure functions of (seed, step, rank), so a
resumed run continues bit-for-bit.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from dopsd_ref import dopsd_rollout_loss, ema_update_
from dopsd_ref.lora import STUDENT, TEACHER, add_student_teacher_lora, lora_ema_update_, lora_parameters, use_adapter
from dopsd_ref.sampling import euler_sample

from .adapters import Flux2Velocity, ZImageVelocity, flux2_packed_to_pipeline_latents
from .cache import BatchContexts, collate, context_source, encode_sample, load_run_components
from .components import Components
from .config import RunConfig, load_config
from .data import BucketBatchPlan, FolderDataset
from .grids import training_grid
from .lora import LoraSpec, intended_modules, make_lora_config, missing_lora, resolve_targets, save_lora_for_pipeline

__all__ = ["DOPSDTrainer", "main"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _seed_for(*parts: int) -> int:
    """A 63-bit seed that is a pure function of the integers given (noise per step/rank)."""
    h = hashlib.sha256(",".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class DOPSDTrainer:
    """The training script's machinery (used by :func:`main` and by the tests).

    Args:
        cfg: the run configuration.
        accelerator: an ``accelerate.Accelerator`` (one is created from the config if None).
    """

    def __init__(self, cfg: RunConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import DistributedType, set_seed

        self.cfg = cfg
        t = cfg.train
        self.acc = accelerator or Accelerator(mixed_precision=t.mixed_precision)
        self.is_deepspeed = self.acc.distributed_type == DistributedType.DEEPSPEED
        if self.is_deepspeed and (t.grad_strategy != "single" or t.grad_accum != 1):
            raise ValueError("DeepSpeed runs its own backward/step: set train.grad_strategy=single and "
                             "train.grad_accum=1 (scale the global batch with processes x batch_size)")
        self._sharded = self.is_deepspeed or self.acc.distributed_type == DistributedType.FSDP
        if t.mode == "full" and self.acc.distributed_type == DistributedType.FSDP:
            raise ValueError("train.mode=full keeps an unsharded EMA copy of the transformer, which does not match "
                             "FSDP's sharded student: use DDP or DeepSpeed ZeRO-2 for full fine-tuning")
        set_seed(t.seed)
        self.out = Path(cfg.output_dir)
        self.device = self.acc.device
        self.comps: Components = load_run_components(cfg, self.device)  # transformer only with data.cache
        set_seed(t.seed)  # LoRA init must not depend on which components were built (cached vs live run)
        backbone = cfg.model.backbone
        tr = self.comps.transformer

        # --- trainable part and teacher -------------------------------------------------
        self.teacher_module: nn.Module | None = None
        if t.mode == "lora":
            targets = resolve_targets(backbone, cfg.lora.targets)  # None, "intended", "released" or names
            self.lora_spec = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=targets)
            self.intended = intended_modules(tr, targets)
            add_student_teacher_lora(tr, make_lora_config(backbone, self.lora_spec))
            # peft creates the adapters in the base weights' dtype (bf16 for real runs); AdamW and
            # the 0.9999 EMA need float32 tensors (peft casts activations to the adapter dtype).
            with torch.no_grad():
                for adapter in (STUDENT, TEACHER):
                    for p in lora_parameters(tr, adapter).values():
                        p.data = p.data.float()
            for adapter in (STUDENT, TEACHER):
                missing = missing_lora(tr, self.intended, adapter)
                if missing:
                    raise RuntimeError(f"LoRA adapter {adapter!r} missing on intended modules: {missing[:5]}")
        else:
            self.lora_spec = None
            self.intended = []
            tr.to(torch.float32).requires_grad_(True)
            self.teacher_module = copy.deepcopy(tr).requires_grad_(False).eval()
        if t.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()
        self.params = [p for p in tr.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.model, self.optimizer = self.acc.prepare(tr, opt)
        self.unwrapped = self.acc.unwrap_model(self.model)
        ema_tensors = (list(lora_parameters(self.unwrapped, TEACHER).values()) if self.teacher_module is None
                       else list(self.teacher_module.parameters()))
        low = {str(p.dtype) for p in ema_tensors if p.dtype != torch.float32}
        if low:
            import warnings

            warnings.warn(f"EMA teacher tensors are {sorted(low)}, not float32: with ema_decay={t.ema_decay} the "
                          "per-step update (1 - d)*delta is mostly below their resolution and the teacher may not "
                          "move (e.g. DeepSpeed bf16 casts the whole model); keep the teacher in float32",
                          stacklevel=2)

        # --- data --------------------------------------------------------------------------
        vsf = self.comps.vae_scale_factor
        self.vae_scale = vsf
        self.dataset = FolderDataset(cfg.data.root, cfg.data.resolution, multiple=2 * vsf,
                                     caption_prefix=cfg.data.caption_prefix)
        # live encoders, or the cache (checked against the data folder and the settings here)
        self.contexts = context_source(cfg, self.comps, self.dataset, self.device)
        self.plan = BucketBatchPlan(self.dataset, t.batch_size, self.acc.num_processes, t.seed)
        self.step = 0
        self.log_path = self.out / "log.jsonl"

    # ------------------------------------------------------------------ contexts & models
    def _latent_shape(self, batch: int, bucket: tuple[int, int]) -> tuple[tuple[int, ...], int, int]:
        """Noise shape for a bucket, and the (h, w) token grid (FLUX.2) / latent size (Z-Image)."""
        h, w = bucket
        f = self.vae_scale * 2
        lh, lw = 2 * (h // f), 2 * (w // f)
        c = self.comps.transformer.config.in_channels
        if self.cfg.model.backbone == "zimage":
            return (batch, c, lh, lw), lh, lw
        return (batch, (lh // 2) * (lw // 2), c), lh // 2, lw // 2

    def velocity_fns(self, prompts: list[str], images: list, h: int, w: int) -> tuple[VelocityFn, VelocityFn]:
        """Student (text context, trainable weights) and teacher (multimodal context, EMA weights).

        Encodes the pairs with the live encoders, one pair at a time (``paper_repro.cache.encode_sample``).
        """
        m = self.cfg.model
        samples = [encode_sample(self.comps, m, p, im, self.device) for p, im in zip(prompts, images)]
        grid = (h, w) if m.backbone == "flux2" else None  # reference image = target at the bucket size
        return self.velocity_fns_from(collate(m, samples, grid, self.device), h, w)

    def velocity_fns_from(self, ctx: BatchContexts, h: int, w: int) -> tuple[VelocityFn, VelocityFn]:
        """The two velocity functions of a micro-batch whose contexts are given (live or cached)."""
        teacher_net = self.teacher_module if self.teacher_module is not None else self.unwrapped
        if self.cfg.model.backbone == "zimage":
            student = ZImageVelocity(self.model, ctx.student)
            teacher_inner = ZImageVelocity(teacher_net, ctx.teacher)
        else:
            student = Flux2Velocity(self.model, ctx.student, h, w)
            teacher_inner = Flux2Velocity(teacher_net, ctx.teacher, h, w, reference=ctx.reference)
        return self._with_teacher_adapter(student, teacher_inner)

    def _with_teacher_adapter(self, student: VelocityFn, teacher_inner: VelocityFn) -> tuple[VelocityFn, VelocityFn]:
        """Run the teacher with the EMA weights: the "teacher" LoRA, or the full EMA copy."""
        if self.teacher_module is not None:
            return student, teacher_inner

        def teacher(x: Tensor, s: Tensor) -> Tensor:
            with use_adapter(self.unwrapped, TEACHER):
                return teacher_inner(x, s)

        return student, teacher

    def micro_batch(self, step: int, micro: int):
        """Noise, σ grid and the two velocity functions of one micro-batch (pure in step/rank)."""
        t = self.cfg.train
        gstep = step * t.grad_accum + micro
        idx = self.plan.batch(gstep, self.acc.process_index)
        bucket = self.dataset.samples[idx[0]].bucket
        shape, h, w = self._latent_shape(len(idx), bucket)
        g = torch.Generator().manual_seed(_seed_for(t.seed, gstep, self.acc.process_index))
        noise = torch.randn(shape, generator=g).to(self.device)
        seq = h * w if self.cfg.model.backbone == "flux2" else None
        sigmas = training_grid(self.cfg.model.backbone, t.num_rollout_steps, seq, t.sigmas).to(torch.float32)
        student, teacher = self.velocity_fns_from(self.contexts.batch(idx), h, w)
        return noise, sigmas, student, teacher

    # ------------------------------------------------------------------ one step
    def ema_update(self) -> None:
        """Teacher ← d·teacher + (1 − d)·student (LoRA A and B separately, or all weights)."""
        d = self.cfg.train.ema_decay
        if self.teacher_module is None:
            lora_ema_update_(self.unwrapped, d)
        else:
            s = [p for p in self.unwrapped.parameters()]
            te = [p for p in self.teacher_module.parameters()]
            ema_update_(te, s, d)

    def train_step(self) -> dict:
        """One optimizer step at ``self.step``; returns the logged metrics and advances the step."""
        t = self.cfg.train
        per_step_bw = t.grad_strategy == "per_step"
        losses, per_steps = [], []
        for micro in range(t.grad_accum):
            noise, sigmas, student, teacher = self.micro_batch(self.step, micro)
            with self.acc.autocast():
                out = dopsd_rollout_loss(student, teacher, noise, sigmas, space=t.space,
                                         per_step_backward=per_step_bw, grad_scale=1.0 / t.grad_accum)
            if not per_step_bw:
                self.acc.backward(out.loss / t.grad_accum)
            losses.append(out.loss.detach().float())
            per_steps.append(out.per_step.float())
        grad_norm = self.acc.clip_grad_norm_(self.params, t.max_grad_norm)
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        if grad_norm is not None and not np.isfinite(gn):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"gradient norm is {gn} at optimizer step {self.step}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema_update()
        self.step += 1
        metrics = {"step": self.step, "loss": float(torch.stack(losses).mean()), "grad_norm": gn,
                   "per_step": torch.stack(per_steps).mean(0).tolist()}
        if self.teacher_module is None:
            metrics["teacher_frac"] = self.teacher_fraction()
        return metrics

    @torch.no_grad()
    def teacher_fraction(self) -> float:
        """``||B_teacher|| / ||B_student||`` over all LoRA B tensors (both start at 0).

        How much of the student's update the EMA teacher holds: ≈ 1 − d^n after n steps for a
        steady student (method notes §4: ~18–26% after 2–3k steps at d = 0.9999).
        """
        s = lora_parameters(self.unwrapped, STUDENT)
        t = lora_parameters(self.unwrapped, TEACHER)
        num = sum(float(v.float().pow(2).sum()) for k, v in t.items() if "lora_B" in k)
        den = sum(float(v.float().pow(2).sum()) for k, v in s.items() if "lora_B" in k)
        return (num / den) ** 0.5 if den > 0 else 0.0

    # ------------------------------------------------------------------ checkpoints
    def _trainable_state(self) -> dict[str, dict[str, Tensor]]:
        if self.teacher_module is None:
            return {
                "student": {k: v.detach().cpu().clone() for k, v in lora_parameters(self.unwrapped, STUDENT).items()},
                "teacher": {k: v.detach().cpu().clone() for k, v in lora_parameters(self.unwrapped, TEACHER).items()},
            }
        return {"student": {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()},
                "teacher": {k: v.detach().cpu().clone() for k, v in self.teacher_module.state_dict().items()}}

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint ``checkpoints/step-XXXXXXX`` (tmp folder + rename, then ``latest``)."""
        ckdir = self.out / "checkpoints"
        final = ckdir / f"step-{self.step:07d}"
        tmp = ckdir / f".tmp-step-{self.step:07d}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
               "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, tmp / f"rng-rank{self.acc.process_index}.pt")
        if self._sharded:
            self.acc.save_state(str(tmp / "accelerate_state"))  # sharded model (incl. teacher LoRA) + optimizer
        if self.acc.is_main_process:
            torch.save(self._trainable_state(), tmp / "trainable.pt")
            if not self._sharded:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "num_processes": self.acc.num_processes}))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = ckdir / ".latest.tmp"
            latest_tmp.write_text(final.name)
            os.replace(latest_tmp, ckdir / "latest")
            kept = sorted(p for p in ckdir.glob("step-*") if p.is_dir())
            for old in kept[: -self.cfg.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or ``checkpoints/latest``; returns False if there is none."""
        ckdir = self.out / "checkpoints"
        if path is None:
            latest = ckdir / "latest"
            if not latest.exists():
                return False
            path = ckdir / latest.read_text().strip()
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        if state["num_processes"] != self.acc.num_processes:
            raise ValueError(f"checkpoint {path} was written with {state['num_processes']} processes, "
                             f"this run has {self.acc.num_processes}: data order would differ")
        sharded_state = (path / "accelerate_state").exists()
        if sharded_state:
            self.acc.load_state(str(path / "accelerate_state"))
        train = torch.load(path / "trainable.pt", map_location="cpu", weights_only=True)
        with torch.no_grad():
            if sharded_state and self.teacher_module is None:
                pass  # student and teacher LoRA are model parameters: restored by load_state
            elif self.teacher_module is None:
                for adapter in (STUDENT, TEACHER):
                    params = lora_parameters(self.unwrapped, adapter)
                    for k, v in train[adapter if adapter == STUDENT else "teacher"].items():
                        params[k].copy_(v)
            else:
                self.unwrapped.load_state_dict(train["student"])
                self.teacher_module.load_state_dict(train["teacher"])
        if (path / "optimizer.pt").exists():
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        rng = torch.load(path / f"rng-rank{self.acc.process_index}.pt", weights_only=True)  # no pickle execution
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ outputs
    def save_lora(self) -> Path | None:
        """Student (and teacher) LoRA in the format ``pipe.load_lora_weights`` reads."""
        if self.teacher_module is not None:
            if self.acc.is_main_process:
                self.unwrapped.save_pretrained(self.out / "transformer")
            return None
        # get_state_dict gathers sharded (FSDP) tensors; for DDP/single it is the plain state dict.
        sd = self.acc.get_state_dict(self.model) if self._sharded else self.unwrapped
        if self.acc.is_main_process:
            save_lora_for_pipeline(sd, self.comps.pipeline_cls, self.out / "lora", self.lora_spec,
                                   self.cfg.model.backbone, STUDENT)
            save_lora_for_pipeline(sd, self.comps.pipeline_cls, self.out / "lora_teacher",
                                   self.lora_spec, self.cfg.model.backbone, TEACHER)
        self.acc.wait_for_everyone()
        return self.out / "lora"

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Student samples of ``train.sample_prompts`` (fixed seed, training grid) as a PNG grid."""
        t, m = self.cfg.train, self.cfg.model
        if not t.sample_prompts or not self.acc.is_main_process:
            return None
        from PIL import Image

        prompts = list(t.sample_prompts)
        bucket = self.dataset.buckets[0]
        shape, h, w = self._latent_shape(len(prompts), bucket)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(t.sample_seed)).to(self.device)
        seq = h * w if m.backbone == "flux2" else None
        sigmas = training_grid(m.backbone, t.num_rollout_steps, seq, t.sigmas).to(torch.float32)
        vae = self.comps.vae
        caps = self.contexts.prompts(prompts).student
        with self.acc.autocast():
            if m.backbone == "zimage":
                lat = euler_sample(ZImageVelocity(self.unwrapped, caps), noise, sigmas)
            else:
                lat = euler_sample(Flux2Velocity(self.unwrapped, caps, h, w), noise, sigmas)
            if vae is None:  # cached run: no VAE; `python -m paper_repro.cache decode` turns these into a PNG
                from safetensors.torch import save_file

                path = self.out / "samples" / f"step-{self.step:07d}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({"latents": lat.float().cpu().contiguous()}, str(path), metadata={"h": str(h), "w": str(w)})
                return path
            if m.backbone == "zimage":
                lat = lat / vae.config.scaling_factor + vae.config.shift_factor
            else:
                lat = flux2_packed_to_pipeline_latents(lat, h, w, vae)
            img = vae.decode(lat.to(next(vae.parameters()).dtype), return_dict=False)[0]
        img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        grid = np.concatenate(list(img), axis=1)
        path = self.out / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
        return path

    def log(self, metrics: dict) -> None:
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def run(self, resume: bool = True) -> None:
        """Train to ``train.steps`` with periodic logs, sample grids and checkpoints."""
        t = self.cfg.train
        if resume and self.load_checkpoint():
            self.acc.print(f"resumed at step {self.step}")
        if self.acc.is_main_process and self.comps.vlm_report is not None:
            self.acc.print(self.comps.vlm_report.summary())
            self.log({"vlm_matched": len(self.comps.vlm_report.matched), "vlm_total": self.comps.vlm_report.total_target})
        t0 = time.time()
        while self.step < t.steps:
            metrics = self.train_step()
            if self.step % t.log_every == 0 or self.step == t.steps:
                metrics["sec_per_step"] = (time.time() - t0) / max(1, self.step)
                self.log(metrics)
                self.acc.print(json.dumps(metrics))
            if self.step % t.sample_every == 0:
                self.sample_grid()
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                self.save_checkpoint()
        self.save_lora()


def main(argv: list[str] | None = None) -> DOPSDTrainer:
    """CLI: ``python -m paper_repro.train --config CFG [--set a.b=v ...] [--no-resume] [--preflight]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML/JSON run config (see paper_repro/configs)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    ap.add_argument("--no-resume", action="store_true", help="ignore checkpoints/latest in output_dir")
    ap.add_argument("--random-init", action="store_true",
                    help="real-size components from the published configs with random weights (dry run; "
                         "= --set model.random_init=true; model.pretrained picks the configs)")
    ap.add_argument("--dump-rank-params", action="store_true",
                    help="after training, every rank writes its trainable + teacher tensors to "
                         "output_dir/rank<r>_params.pt (to verify that ranks stay identical)")
    from .preflight import add_preflight_flags, preflight_from_args

    ap.add_argument("--preflight", action="store_true", help="first measure whether the untrained teacher beats the "
                    "student (paper_repro.preflight); warn if not, then train")
    add_preflight_flags(ap, prefix="preflight-")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set + (["model.random_init=true"] if args.random_init else []))
    trainer = DOPSDTrainer(cfg)
    if args.preflight:
        preflight_from_args(trainer, args, prefix="preflight-")
    trainer.run(resume=not args.no_resume)
    if args.dump_rank_params:
        trainer.out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer._trainable_state(), trainer.out / f"rank{trainer.acc.process_index}_params.pt")
    return trainer


if __name__ == "__main__":
    main()
