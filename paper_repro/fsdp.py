"""FSDP2 (``torch.distributed.fsdp.fully_shard``) engine for LoRA D-OPSD runs, also on CPU (gloo).

accelerate enables its FSDP plugin only for accelerator-backed process groups (its
``distributed_type`` becomes FSDP only from MULTI_GPU/NPU/XPU/...; a CPU launch stays
MULTI_CPU), so ``accelerate/fsdp_4gpu.yaml`` cannot be exercised on a CPU machine. This module
drives FSDP2 directly with the training script's own pieces — components (live or cached),
LoRA set-up, data plan, per-(seed, step, rank) noise, σ grids, velocity adapters and
``dopsd_ref.dopsd_train_step`` — so the sharded LoRA path is tested where it can run:

* every ``ZImageTransformerBlock`` / ``Flux2TransformerBlock`` / ``Flux2SingleTransformerBlock``
  and the root are ``fully_shard``-ed; base weights, student and teacher LoRA all become
  DTensor shards (student and teacher adapters switch with ``use_adapter`` as before);
* gradients are reduce-scattered (averaged over ranks, as DDP), clipped with the DTensor-aware
  ``torch.nn.utils.clip_grad_norm_``; the EMA ``teacher ← d·teacher + (1 − d)·student`` runs
  shard by shard (element-wise, so it equals the unsharded update);
* checkpoints are ``torch.distributed.checkpoint`` (DCP) folders of the LoRA tensors (both
  adapters) and the sharded AdamW state, plus per-rank RNG and the step; written to a temporary
  folder and renamed by rank 0 after a barrier.

Run (one process per GPU or, for tests, CPU processes with gloo)::

    torchrun --nproc_per_node 4 -m paper_repro.fsdp --config paper_repro/configs/zimage_turbo_lora.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dopsd_ref import MicroBatch, StepConfig, dopsd_train_step
from dopsd_ref.lora import STUDENT, TEACHER, add_student_teacher_lora, lora_ema_update_, lora_parameters, use_adapter

from .adapters import Flux2Velocity, ZImageVelocity
from .cache import context_source, load_run_components
from .config import RunConfig, load_config
from .data import BucketBatchPlan, FolderDataset
from .grids import training_grid
from .lora import LoraSpec, make_lora_config, resolve_targets

__all__ = ["block_classes", "shard_lora_transformer", "FSDP2LoraRun", "main"]


def block_classes(backbone: str) -> tuple[type, ...]:
    """The transformer block classes that get their own FSDP2 unit."""
    if backbone == "zimage":
        from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

        return (ZImageTransformerBlock,)
    from diffusers.models.transformers.transformer_flux2 import Flux2SingleTransformerBlock, Flux2TransformerBlock

    return (Flux2TransformerBlock, Flux2SingleTransformerBlock)


def shard_lora_transformer(transformer: nn.Module, backbone: str, mesh=None) -> nn.Module:
    """``fully_shard`` every block, then the root (the remaining embedders and heads)."""
    from torch.distributed.fsdp import fully_shard

    blocks = block_classes(backbone)
    for module in list(transformer.modules()):
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    return transformer


def _seed_for(*parts: int) -> int:
    from .train import _seed_for as seed_for  # the training script's noise seeds

    return seed_for(*parts)


class FSDP2LoraRun:
    """A LoRA D-OPSD run sharded with FSDP2 (the process group must be initialised).

    Args:
        cfg: the run configuration (``train.mode`` must be "lora").
        device: this rank's device (CPU for gloo tests).
    """

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu"):
        from accelerate.utils import set_seed

        if cfg.train.mode != "lora":
            raise ValueError("paper_repro.fsdp shards LoRA runs only (train.mode=full keeps an unsharded EMA copy)")
        if not dist.is_initialized():
            raise RuntimeError("paper_repro.fsdp needs an initialised process group (torchrun or mp.spawn)")
        self.cfg, t = cfg, cfg.train
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.out = Path(cfg.output_dir)
        set_seed(t.seed)
        self.comps = load_run_components(cfg, self.device)
        set_seed(t.seed)  # same LoRA init on every rank (and as the single-process trainer)
        tr = self.comps.transformer
        spec = LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=resolve_targets(cfg.model.backbone,
                                                                                          cfg.lora.targets))
        self.lora_spec = spec
        add_student_teacher_lora(tr, make_lora_config(cfg.model.backbone, spec))
        with torch.no_grad():  # float32 adapters (AdamW, 0.9999 EMA), as the trainer keeps them
            for adapter in (STUDENT, TEACHER):
                for p in lora_parameters(tr, adapter).values():
                    p.data = p.data.float()
        if t.gradient_checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()
        self.model = shard_lora_transformer(tr, cfg.model.backbone)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        vsf = self.comps.vae_scale_factor
        self.vae_scale = vsf
        self.dataset = FolderDataset(cfg.data.root, cfg.data.resolution, multiple=2 * vsf,
                                     caption_prefix=cfg.data.caption_prefix)
        self.contexts = context_source(cfg, self.comps, self.dataset, self.device)
        self.plan = BucketBatchPlan(self.dataset, t.batch_size, self.world, t.seed)
        self.step = 0

    # ------------------------------------------------------------------ one step
    def _micro(self, step: int, micro: int) -> MicroBatch:
        t, m = self.cfg.train, self.cfg.model
        gstep = step * t.grad_accum + micro
        idx = self.plan.batch(gstep, self.rank)
        hb, wb = self.dataset.samples[idx[0]].bucket
        f = self.vae_scale * 2
        lh, lw = 2 * (hb // f), 2 * (wb // f)
        c = self.model.config.in_channels
        shape = (len(idx), c, lh, lw) if m.backbone == "zimage" else (len(idx), (lh // 2) * (lw // 2), c)
        h, w = (lh, lw) if m.backbone == "zimage" else (lh // 2, lw // 2)
        g = torch.Generator().manual_seed(_seed_for(t.seed, gstep, self.rank))
        noise = torch.randn(shape, generator=g).to(self.device)
        sigmas = training_grid(m.backbone, t.num_rollout_steps, h * w if m.backbone == "flux2" else None,
                               t.sigmas).to(torch.float32)
        ctx = self.contexts.batch(idx)
        if m.backbone == "zimage":
            student, teacher_inner = ZImageVelocity(self.model, ctx.student), ZImageVelocity(self.model, ctx.teacher)
        else:
            student = Flux2Velocity(self.model, ctx.student, h, w)
            teacher_inner = Flux2Velocity(self.model, ctx.teacher, h, w, reference=ctx.reference)

        def teacher(x: Tensor, s: Tensor) -> Tensor:
            with use_adapter(self.model, TEACHER):
                return teacher_inner(x, s)

        return MicroBatch(noise, student, teacher, sigmas=sigmas)

    def train_step(self) -> dict:
        """One optimizer step (gradients averaged over ranks by FSDP's reduce-scatter) + EMA."""
        t = self.cfg.train
        micro = [self._micro(self.step, m) for m in range(t.grad_accum)]
        cfg = StepConfig(space=t.space, grad_strategy=t.grad_strategy, max_grad_norm=t.max_grad_norm,  # type: ignore[arg-type]
                         autocast_dtype=torch.bfloat16 if t.mixed_precision == "bf16" else None)
        res = dopsd_train_step(
            lambda x, s, velocity: velocity(x, s), lambda x, s, velocity: velocity(x, s),
            micro, micro[0].sigmas, self.optimizer, self.params, cfg,
            after_step=lambda: lora_ema_update_(self.model, t.ema_decay), step=self.step + 1,
            clip_grad_norm=torch.nn.utils.clip_grad_norm_,
        )
        self.step += 1
        return {"step": self.step, "loss": res.loss, "grad_norm": res.grad_norm, "per_step": res.per_step.tolist()}

    # ------------------------------------------------------------------ state
    @torch.no_grad()
    def lora_state(self) -> dict[str, dict[str, Tensor]]:
        """Full (all-gathered) student and teacher LoRA tensors; every rank gets them."""
        def full(v: Tensor) -> Tensor:
            return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()

        return {role: {k: full(v) for k, v in lora_parameters(self.model, a).items()}
                for role, a in (("student", STUDENT), ("teacher", TEACHER))}

    def save_lora(self) -> Path:
        """Student and teacher LoRA (gathered) in the format ``pipe.load_lora_weights`` reads (all ranks call it)."""
        from .lora import save_lora_for_pipeline

        state = self.lora_state()  # collective: every rank takes part in the all-gather
        if self.rank == 0:
            for role, folder in (("student", "lora"), ("teacher", "lora_teacher")):
                save_lora_for_pipeline(state[role], self.comps.pipeline_cls, self.out / folder, self.lora_spec,
                                       self.cfg.model.backbone, STUDENT if role == "student" else TEACHER)
        dist.barrier()
        return self.out / "lora"

    def _dcp_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        model = {k: v for k, v in get_model_state_dict(self.model).items() if "lora_" in k}
        return {"model": model, "optim": get_optimizer_state_dict(self.model, self.optimizer)}

    def save_checkpoint(self) -> Path:
        """DCP checkpoint ``checkpoints/step-XXXXXXX`` (tmp folder + rename; all ranks call it)."""
        import torch.distributed.checkpoint as dcp

        from dopsd_ref.checkpoint import pack_rng, rng_state

        root = self.out / "checkpoints"
        final, tmp = root / f"step-{self.step:07d}", root / f".tmp-step-{self.step:07d}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        dcp.save(self._dcp_state(), checkpoint_id=str(tmp / "dcp"))
        from safetensors.torch import save_file

        tensors, plain = pack_rng(rng_state())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"rng-rank{self.rank}.safetensors"))
        (tmp / f"rng-rank{self.rank}.json").write_text(json.dumps(plain))
        dist.barrier()
        if self.rank == 0:
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "num_processes": self.world}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (root / ".latest.tmp").write_text(final.name)
            os.replace(root / ".latest.tmp", root / "latest")
        dist.barrier()
        return final

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Resume from ``path`` or ``checkpoints/latest``; False if there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from dopsd_ref.checkpoint import set_rng_state, unpack_rng

        if path is None:
            latest = self.out / "checkpoints" / "latest"
            if not latest.exists():
                return False
            path = latest.parent / latest.read_text().strip()
        path = Path(path)
        state = json.loads((path / "state.json").read_text())
        if state["num_processes"] != self.world:
            raise ValueError(f"checkpoint {path} was written with {state['num_processes']} processes, this run has "
                             f"{self.world}: data order would differ")
        sd = self._dcp_state()
        dcp.load(sd, checkpoint_id=str(path / "dcp"))
        set_model_state_dict(self.model, sd["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, sd["optim"])
        from safetensors.torch import load_file

        tensors = load_file(str(path / f"rng-rank{self.rank}.safetensors"))
        set_rng_state(unpack_rng(tensors, json.loads((path / f"rng-rank{self.rank}.json").read_text())))
        self.step = int(state["step"])
        return True


def main(argv: list[str] | None = None) -> FSDP2LoraRun:
    """CLI under ``torchrun``: train to ``train.steps`` with checkpoints; resumes from ``latest``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    run = FSDP2LoraRun(cfg, device)
    if not args.no_resume and run.load_checkpoint() and run.rank == 0:
        print(f"resumed at step {run.step}")
    while run.step < cfg.train.steps:
        metrics = run.train_step()
        if run.rank == 0 and run.step % cfg.train.log_every == 0:
            print(json.dumps(metrics))
        if run.step % cfg.train.checkpoint_every == 0 or run.step == cfg.train.steps:
            run.save_checkpoint()
    run.save_lora()
    return run


if __name__ == "__main__":
    main()
