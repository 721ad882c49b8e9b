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

The step is ``dopsd_ref.dopsd_train_step`` unchanged, with accelerate plugged in through its
hooks (``accelerator.clip_grad_norm_``; ``accelerator.backward`` for the single backward); this
file only binds contexts, drives accelerate, and does I/O.

Checkpoints are ``accelerator.save_state`` folders sealed by :mod:`dopsd_ref.checkpoint`:
written into ``checkpoints/.step_N.tmp``, fsynced, listed with sha256 in a manifest written
last, renamed into place, then ``latest``; a resume takes the newest complete one (a kill at
any point, a truncated or corrupted file only makes it fall back to the previous checkpoint).
Save/load hooks put the student and teacher tensors in safetensors files (LoRA: both adapters
in ``adapters.safetensors``, not the frozen base; full mode: accelerate's ``model.safetensors``
plus ``teacher.safetensors``) and each rank's RNG in safetensors + JSON. accelerate itself
pickles the optimizer state (``optimizer.bin``) and its own RNG copy (``random_states_R.pkl``);
it loads both with ``torch.load(weights_only=True)``, so no code is executed on load. Data
order and noise are pure functions of (seed, step, rank), so a resumed run continues
bit-for-bit. A resume may change only ``config.RESUMABLE_FIELDS``; a new lr / weight decay /
clip norm is applied to the optimizer and printed. Ctrl-C stops after the current step and
saves a checkpoint. Errors are one-line messages (``python -m paper_repro.train``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from dopsd_ref import MicroBatch, NonFiniteLossError, StepConfig, dopsd_train_step, ema_update_
from dopsd_ref.checkpoint import (CheckpointError, begin_checkpoint, checkpoint_name, clean_stale, commit_checkpoint,
                                  find_checkpoint, pack_rng, rng_state, set_rng_state, stop_on_interrupt, unpack_rng,
                                  verify_checkpoint)
from dopsd_ref.lora import STUDENT, TEACHER, add_student_teacher_lora, lora_ema_update_, lora_parameters, use_adapter
from dopsd_ref.sampling import euler_sample

from .adapters import Flux2Velocity, ZImageVelocity, flux2_packed_to_pipeline_latents
from .cache import BatchContexts, collate, context_source, encode_sample, load_run_components
from .components import Components
from .config import RunConfig, config_dict, load_config, resume_changes
from .data import BucketBatchPlan, FolderDataset
from .grids import training_grid
from .lora import LoraSpec, intended_modules, make_lora_config, missing_lora, resolve_targets, save_lora_for_pipeline

__all__ = ["DOPSDTrainer", "main", "cli"]

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
        if t.grad_strategy == "per_step" and (getattr(self.acc, "scaler", None) is not None
                                              or getattr(self.acc, "gradient_accumulation_steps", 1) != 1):
            raise ValueError("train.grad_strategy=per_step calls backward inside the roll-out, which bypasses a "
                             "gradient scaler and accelerate-side accumulation: use train.grad_strategy=single "
                             "(or an Accelerator without them; accumulate with train.grad_accum)")
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
        self.acc.register_save_state_pre_hook(self._save_state_hook)
        self.acc.register_load_state_pre_hook(self._load_state_hook)
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
        self.interrupted = False  # set when Ctrl-C stopped run() after a checkpoint
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

    def step_config(self) -> StepConfig:
        """The core step's settings from ``train.*`` (bf16 autocast as ``accelerator.autocast`` sets it)."""
        t = self.cfg.train
        return StepConfig(space=t.space, grad_strategy=t.grad_strategy, max_grad_norm=t.max_grad_norm,  # type: ignore[arg-type]
                          autocast_dtype=torch.bfloat16 if t.mixed_precision == "bf16" else None)

    def train_step(self) -> dict:
        """One optimizer step at ``self.step`` through ``dopsd_ref.dopsd_train_step``; returns the metrics.

        Each micro-batch carries its own σ grid (FLUX.2's depends on the bucket's token count).

        Raises:
            NonFiniteLossError: NaN/inf loss or gradient (names the step and, with per-step
                backward, the roll-out step and σ); nothing is applied, no gradient is kept.
        """
        t = self.cfg.train
        micro = []
        for m in range(t.grad_accum):
            noise, sigmas, student, teacher = self.micro_batch(self.step, m)
            micro.append(MicroBatch(noise, student, teacher, sigmas=sigmas))
        res = dopsd_train_step(
            lambda x, s, velocity: velocity(x, s),  # contexts are the bound velocity functions
            lambda x, s, velocity: velocity(x, s),
            micro, micro[0].sigmas, self.optimizer, self.params, self.step_config(),
            after_step=self.ema_update, step=self.step + 1,
            backward=self.acc.backward if t.grad_strategy == "single" else None,
            clip_grad_norm=self.acc.clip_grad_norm_,
        )
        self.step += 1
        metrics = {"step": self.step, "loss": res.loss, "grad_norm": res.grad_norm, "per_step": res.per_step.tolist()}
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
    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    def _trainable_state(self) -> dict[str, dict[str, Tensor]]:
        if self.teacher_module is None:
            return {
                "student": {k: v.detach().cpu().clone() for k, v in lora_parameters(self.unwrapped, STUDENT).items()},
                "teacher": {k: v.detach().cpu().clone() for k, v in lora_parameters(self.unwrapped, TEACHER).items()},
            }
        return {"student": {k: v.detach().cpu().clone() for k, v in self.unwrapped.state_dict().items()},
                "teacher": {k: v.detach().cpu().clone() for k, v in self.teacher_module.state_dict().items()}}

    def _save_state_hook(self, models: list, weights: list, output_dir: str) -> None:
        """``accelerator.save_state`` pre-hook: our tensors as safetensors, never pickled.

        LoRA (not sharded): both adapters to ``adapters.safetensors`` and the model's full state
        dict dropped from ``weights`` (the frozen base is not a checkpoint's business). Full
        mode: accelerate writes the student (``model.safetensors``), we add the EMA teacher.
        Sharded (FSDP/DeepSpeed): the engine saves the model, LoRA included. Every rank adds
        its RNG state (``rng-rank{r}.safetensors`` + ``.json``).
        """
        from safetensors.torch import save_file

        out = Path(output_dir)
        rank = self.acc.process_index
        tensors, plain = pack_rng(rng_state())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"rng-rank{rank}.safetensors"))
        (out / f"rng-rank{rank}.json").write_text(json.dumps(plain))
        if self._sharded:
            return
        if self.teacher_module is None:
            weights.clear()
            if self.acc.is_main_process:
                state = self._trainable_state()
                flat = {f"{role}/{k}": v.contiguous() for role in ("student", "teacher") for k, v in state[role].items()}
                save_file(flat, str(out / "adapters.safetensors"))
        elif self.acc.is_main_process:
            teacher = {k: v.detach().cpu().contiguous() for k, v in self.teacher_module.state_dict().items()}
            save_file(teacher, str(out / "teacher.safetensors"))

    def _load_state_hook(self, models: list, input_dir: str) -> None:
        """``accelerator.load_state`` pre-hook, the inverse of :meth:`_save_state_hook`."""
        from safetensors.torch import load_file

        inp = Path(input_dir)
        if self._sharded:
            return
        with torch.no_grad():
            if self.teacher_module is None:
                models.clear()  # accelerate must not look for a full model.safetensors
                flat = load_file(str(inp / "adapters.safetensors"))
                for role, adapter in (("student", STUDENT), ("teacher", TEACHER)):
                    params = lora_parameters(self.unwrapped, adapter)
                    saved = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(role + "/")}
                    if saved.keys() != params.keys():
                        raise CheckpointError(f"{inp / 'adapters.safetensors'}: {role} LoRA tensors do not match this "
                                              f"run's adapters ({len(saved)} saved, {len(params)} here)")
                    for k, v in saved.items():
                        if v.shape != params[k].shape:
                            raise CheckpointError(f"{inp / 'adapters.safetensors'}: {role}/{k} has shape "
                                                  f"{tuple(v.shape)}, this run's is {tuple(params[k].shape)}")
                        params[k].copy_(v)
            else:
                self.teacher_module.load_state_dict(load_file(str(inp / "teacher.safetensors")))

    def save_checkpoint(self) -> Path:
        """Crash-safe checkpoint ``checkpoints/step_XXXXXXXX`` of the current step (all ranks call it)."""
        root = self.checkpoint_root
        tmp = root / f".{checkpoint_name(self.step)}.tmp"
        if self.acc.is_main_process:
            begin_checkpoint(root, self.step)  # cleans what earlier kills left, creates tmp
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        final = root / checkpoint_name(self.step)
        if self.acc.is_main_process:
            state = {"step": self.step, "num_processes": self.acc.num_processes, "config": config_dict(self.cfg)}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            commit_checkpoint(root, tmp, self.step, keep=self.cfg.train.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def find_resumable(self) -> Path | None:
        """The newest complete checkpoint (notes printed by the main process), or None.

        Raises:
            CheckpointError: checkpoints exist but none is complete (never a silent restart).
        """
        if self.acc.is_main_process:
            for note in clean_stale(self.checkpoint_root):
                self.acc.print(f"checkpoint: {note}")
        self.acc.wait_for_everyone()
        found = find_checkpoint(self.checkpoint_root)
        for note in found.notes:
            self.acc.print(f"checkpoint: {note}")
        return found.path

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or the newest complete checkpoint; returns False if there is none.

        Raises:
            CheckpointError: a corrupt or incomplete checkpoint (names the file).
            ValueError: another number of processes, or a config change a resume may not make
                (names the field, see ``config.RESUMABLE_FIELDS``).
        """
        if path is None:
            found = self.find_resumable()
            if found is None:
                return False
            path = found
        else:
            path = Path(path)
            verify_checkpoint(path)
        try:
            state = json.loads((path / "state.json").read_text())
            saved_step, saved_procs = int(state["step"]), int(state["num_processes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from None
        if saved_procs != self.acc.num_processes:
            raise ValueError(f"checkpoint {path} was written with {saved_procs} processes, "
                             f"this run has {self.acc.num_processes}: data order would differ")
        changed = resume_changes(state.get("config", {}), self.cfg, saved_step)
        self.acc.load_state(str(path))
        rank = self.acc.process_index
        from safetensors.torch import load_file

        rng_file = path / f"rng-rank{rank}.safetensors"
        if not rng_file.exists():
            raise CheckpointError(f"{rng_file} is missing: the checkpoint has no RNG state for rank {rank}")
        set_rng_state(unpack_rng(load_file(str(rng_file)), json.loads((path / f"rng-rank{rank}.json").read_text())))
        t = self.cfg.train
        for g in self.optimizer.param_groups:  # the new values win; AdamW's moments are kept
            g["lr"], g["weight_decay"] = t.lr, t.weight_decay
        applied = {k: v for k, v in changed.items() if k in ("train.lr", "train.weight_decay", "train.max_grad_norm")}
        if applied:
            self.acc.print("resume: applied " + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in applied.items()))
        self.step = saved_step
        return True

    def prepare_output(self, resume: bool, overwrite: bool) -> None:
        """Refuse to start over an existing run unless ``overwrite``; ``--overwrite`` removes it first.

        Raises:
            ValueError: ``output_dir`` holds checkpoints or a log and neither resume nor
                overwrite is set, or both are.
        """
        if resume and overwrite:
            raise ValueError("--overwrite starts a new run: use it with --no-resume")
        present = [n for n in ("checkpoints", "log.jsonl", "lora", "lora_teacher", "transformer", "samples")
                   if (self.out / n).exists()]
        self.acc.wait_for_everyone()  # every rank looks before any rank writes (the main one logs early)
        if resume or not present:
            return
        if not overwrite:
            raise ValueError(f"output_dir={self.out} already holds a run ({', '.join(present)}): resume it (the "
                             "default, without --no-resume), pass --overwrite to replace it, or choose another output_dir")
        if self.acc.is_main_process:
            for n in present:
                trash = self.out / f".{n}.overwritten"
                if trash.exists():
                    shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
                os.replace(self.out / n, trash)
                shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
            self.acc.print(f"overwrite: removed the previous run in {self.out} ({', '.join(present)})")
        self.acc.wait_for_everyone()

    def _trim_log(self) -> None:
        """Drop log rows written after the checkpoint a run resumes from (they are re-run)."""
        if not self.acc.is_main_process or not self.log_path.exists():
            return
        rows = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r).get("step", 0) <= self.step]
        if len(keep) != len(rows):
            tmp = self.log_path.with_name(".log.jsonl.tmp")
            tmp.write_text("".join(r + "\n" for r in keep))
            os.replace(tmp, self.log_path)

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

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether any rank got Ctrl-C (all ranks must stop at the same step to save together)."""
        if self.acc.num_processes == 1:
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def run(self, resume: bool = True, overwrite: bool = False) -> None:
        """Train to ``train.steps`` with periodic logs, sample grids and checkpoints.

        Args:
            resume: continue from the newest complete checkpoint in ``output_dir`` (if any).
            overwrite: with ``resume=False``, replace a run already in ``output_dir``
                (without it that is an error).
        """
        t = self.cfg.train
        self.prepare_output(resume, overwrite)
        if resume and self.load_checkpoint():
            self.acc.print(f"resumed at step {self.step}")
            self._trim_log()
        if self.acc.is_main_process and self.comps.vlm_report is not None:
            self.acc.print(self.comps.vlm_report.summary())
            self.log({"vlm_matched": len(self.comps.vlm_report.matched), "vlm_total": self.comps.vlm_report.total_target})
        t0 = time.time()
        with stop_on_interrupt(self.acc.print) as interrupt:
            while self.step < t.steps:
                try:
                    metrics = self.train_step()
                except NonFiniteLossError as exc:
                    try:
                        found = find_checkpoint(self.checkpoint_root).path
                    except CheckpointError:
                        found = None
                    raise NonFiniteLossError(f"{exc}; training stopped, last good checkpoint: {found}") from exc
                if self.step % t.log_every == 0 or self.step == t.steps:
                    metrics["sec_per_step"] = (time.time() - t0) / max(1, self.step)
                    self.log(metrics)
                    self.acc.print(json.dumps(metrics))
                if self.step % t.sample_every == 0:
                    self.sample_grid()
                if self._stop_agreed(interrupt["stop"]) and self.step < t.steps:
                    self.save_checkpoint()
                    self.interrupted = True
                    self.acc.print(f"interrupted: checkpoint saved at step {self.step}; run again to resume")
                    return
                if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
        self.save_lora()


def main(argv: list[str] | None = None) -> DOPSDTrainer:
    """CLI: ``python -m paper_repro.train --config CFG [--set a.b=v ...] [--no-resume] [--preflight]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML/JSON run config (see paper_repro/configs)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    ap.add_argument("--no-resume", action="store_true", help="start at step 0 (refused if output_dir holds a run, "
                    "unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="with --no-resume: replace the run in output_dir")
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
    if args.preflight and cfg.data.cache:
        raise ValueError("--preflight encodes the targets with the live encoders and the VAE, which a run with "
                         "data.cache does not load: run the pre-flight without data.cache")
    trainer = DOPSDTrainer(cfg)
    if args.preflight:
        preflight_from_args(trainer, args, prefix="preflight-")
    trainer.run(resume=not args.no_resume, overwrite=args.overwrite)
    if args.dump_rank_params:
        trainer.out.mkdir(parents=True, exist_ok=True)
        torch.save(trainer._trainable_state(), trainer.out / f"rank{trainer.acc.process_index}_params.pt")
    return trainer


def cli(argv: list[str] | None = None) -> int:
    """``python -m paper_repro.train``: :func:`main` with errors as one-line messages.

    Returns 0 on success, 2 for a configuration, data, checkpoint or numerical error (the
    message names the field, file or step), 130 after Ctrl-C (a checkpoint was saved).
    """
    try:
        trainer = main(argv)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only output_dir, permissions
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write or read{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted: the newest complete checkpoint is kept; run again to resume", file=sys.stderr)
        return 130
    return 130 if getattr(trainer, "interrupted", False) else 0


if __name__ == "__main__":
    sys.exit(cli())
