"""Fine-tune the toy few-step model on a few targets with D-OPSD or a baseline.

One loop serves every method; only the loss of a step differs:

* ``dopsd``: the student rolls out K steps from noise on the *text* context; the EMA
  teacher grades each state with *text + target image* (:func:`dopsd_ref.dopsd_rollout_loss`).
* ``sft``: flow matching on noised targets (:func:`dopsd_ref.flow_matching_loss`).
* ``offpolicy``: the same teacher, queried on noised targets instead of student states.
* ``sft_teacher``: flow matching on samples the initial teacher drew for each target.

Checkpoints (student, teacher, optimizer, step, RNG) are atomic and resume exactly; a NaN/inf
loss stops the run with a message naming the step, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import dopsd_ref
from dopsd_ref import MicroBatch, NonFiniteLossError, SFTMicroBatch, StepConfig
from dopsd_ref.checkpoint import TrainState, latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from dopsd_ref.train import apply_gradients
from toy_models import vocab as V
from toy_models.context import ToyContext
from toy_models.dit import ToyDiT
from toy_models.finetune.adapters import add_local_adapters
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.reference import placement_matched_teacher
from toy_models.finetune.targets import TargetSet, load_targets

__all__ = ["Roles", "build_roles", "resolve_device", "run_finetune", "RunResult", "load_finetuned"]

ContextModel = Callable[[Tensor, Tensor, ToyContext], Tensor]
RARE_IDS = (V.WORD_TO_ID[V.SHAPE_TOKEN], V.WORD_TO_ID[V.STYLE_TOKEN])


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class Roles:
    """The student and teacher of one run, over one network.

    Attributes:
        module: the trainable network (``(x, σ, context) -> v``), student role.
        teacher: the teacher role (no grad).
        params: the trainable tensors.
        update_teacher: the EMA step after each optimizer step (no-op for frozen/live).
        student_state / teacher_state: the tensors a checkpoint or export holds.
        load_state: restore (student, teacher) tensors.
    """

    module: nn.Module
    teacher: ContextModel
    params: list[nn.Parameter]
    update_teacher: Callable[[], None]
    student_state: Callable[[], dict[str, Tensor]]
    teacher_state: Callable[[], dict[str, Tensor]]
    load_state: Callable[[dict[str, Tensor], dict[str, Tensor]], None]


def build_roles(model: ToyDiT, cfg: FinetuneConfig) -> Roles:
    """Wrap a loaded few-step model into student/teacher roles as the config asks."""
    if cfg.teacher == "live":
        import warnings

        warnings.warn("teacher 'live' = the student itself: for ablations; it collapses", dopsd_ref.LiveTeacherWarning)
    decay = {"ema": cfg.ema_decay, "frozen": 1.0, "live": 0.0}[cfg.teacher]
    if cfg.scope == "full":
        model.requires_grad_(True)
        teacher = dopsd_ref.Teacher(model, dopsd_ref.TeacherConfig(mode=cfg.teacher, decay=cfg.ema_decay)) \
            if cfg.teacher != "live" else None

        def teacher_fn(x, s, c):
            with torch.no_grad():
                return (teacher.module if teacher else model)(x, s, c)

        return Roles(
            module=model,
            teacher=teacher_fn,
            params=list(model.parameters()),
            update_teacher=(lambda: teacher.update(model)) if teacher else (lambda: None),
            student_state=model.state_dict,
            teacher_state=(teacher.state_dict if teacher else dict),
            load_state=lambda s, t: (model.load_state_dict(s), teacher.load_state_dict(t) if teacher else None),
        )
    wrapped = add_local_adapters(model, RARE_IDS, cfg.lora_rank, cfg.lora_alpha, cfg.scope, cfg.train_embedding)

    def teacher_fn(x, s, c):
        if cfg.teacher == "live":
            with torch.no_grad():
                return wrapped(x, s, c)
        return wrapped.teacher_forward(x, s, c)

    def load(s: dict[str, Tensor], t: dict[str, Tensor]) -> None:
        wrapped.load_adapter_state("student", s)
        wrapped.load_adapter_state("teacher", t)

    return Roles(
        module=wrapped,
        teacher=teacher_fn,
        params=wrapped.student_parameters(),
        update_teacher=lambda: wrapped.ema_update(decay) if decay < 1.0 and cfg.teacher == "ema" else None,
        student_state=lambda: wrapped.adapter_state("student"),
        teacher_state=lambda: wrapped.adapter_state("teacher"),
        load_state=load,
    )


@dataclass
class RunResult:
    """What a run produced: the roles (trained), its log rows and the run folder."""

    roles: Roles
    log: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None
    seconds: float = 0.0


def _contexts(targets: TargetSet, idx: Tensor, route: str, device: torch.device) -> tuple[ToyContext, ToyContext]:
    tokens = V.tokenize([targets.captions[i] for i in idx.tolist()])
    student = ToyContext(tokens).to(device)
    teacher = ToyContext(tokens, targets.images[idx], route).to(device)
    return student, teacher


@torch.no_grad()
def teacher_samples(roles: Roles, targets: TargetSet, cfg: FinetuneConfig, per_target: int, device: torch.device) -> TargetSet:
    """The initial teacher's K-step samples for each target (for ``sft_teacher``)."""
    idx = torch.arange(len(targets)).repeat_interleave(per_target)
    _, tctx = _contexts(targets, idx, cfg.teacher_route, device)
    g = torch.Generator().manual_seed(cfg.seed + 99)
    noise = torch.randn(len(idx), 3, *targets.images.shape[-2:], generator=g).to(device)
    sigmas = dopsd_ref.uniform_sigmas(cfg.rollout_steps)
    x = dopsd_ref.euler_sample(lambda x, s: roles.teacher(x, s, tctx), noise, sigmas).clamp(-1, 1).cpu()
    return TargetSet(x, [targets.captions[i] for i in idx.tolist()], None, targets.name + ":teacher")


def load_model(path: str, device: torch.device) -> ToyDiT:
    """The model to fine-tune: a folder, or the name of a shipped one (``toy-dit-turbo4``)."""
    from toy_models import hub

    folder = Path(path) if Path(path).exists() else hub.weights_path(path)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"model {path!r}: no model.safetensors in {folder} (shipped names: {hub.TURBO!r}, {hub.BASE!r};"
            " or train one with the toy_models recipes)"
        )
    return ToyDiT.from_pretrained(folder).to(device)


def run_finetune(
    cfg: FinetuneConfig,
    *,
    targets: TargetSet | None = None,
    model: ToyDiT | None = None,
    evaluate: Callable[[Roles, int], dict[str, float]] | None = None,
    resume: bool = False,
    progress: bool = True,
    write: bool = True,
) -> RunResult:
    """Run one fine-tuning job as configured.

    Args:
        cfg: the run's configuration.
        targets: override the configured target set.
        model: override loading ``cfg.model`` (e.g. an already loaded model; it is modified).
        evaluate: called every ``cfg.eval_every`` steps (and at 0 and the end) with the roles
            and the step; its metrics join the log.
        resume: continue from ``cfg.out/checkpoints`` if a checkpoint exists.
        progress: show a progress bar.
        write: write checkpoints, ``log.jsonl``, ``config.json`` and the final adapter.

    Raises:
        NonFiniteLossError: a NaN/inf loss (the last good checkpoint is kept).
    """
    t0 = time.time()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    targets = targets if targets is not None else load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
    model = model if model is not None else load_model(cfg.model, device)
    model = model.to(device)
    roles = build_roles(model, cfg)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(roles.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = tuple(0.0 if k < cfg.skip_first_steps else 1.0 for k in range(cfg.rollout_steps)) if cfg.skip_first_steps else None
    step_cfg = StepConfig(space=cfg.space, grad_strategy=cfg.grad_strategy, max_grad_norm=cfg.max_grad_norm,  # type: ignore[arg-type]
                          step_weights=weights)
    sigmas = dopsd_ref.uniform_sigmas(cfg.rollout_steps)
    log: list[dict[str, Any]] = []
    start = 0

    pool = targets  # sft_teacher: drawn by the *initial* teacher, before any resume
    if cfg.method == "sft_teacher":
        pool = teacher_samples(roles, targets, cfg, per_target=4, device=device)
    if resume and latest_checkpoint(ckpt_dir) is not None:
        state = load_checkpoint(ckpt_dir)
        roles.load_state(state.student, state.teacher)
        opt.load_state_dict(state.optimizer)
        set_rng_state(state.rng, {"data": gen})
        start = state.step
        log = list(state.extra.get("log", []))
    if write:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    def checkpoint(step: int) -> None:
        if write:
            save_checkpoint(ckpt_dir, TrainState(step, roles.student_state(), roles.teacher_state(), opt.state_dict(),
                                                 rng_state({"data": gen}), extra={"log": log, "config": cfg.to_dict()}))

    def maybe_eval(step: int, row: dict[str, Any]) -> None:
        if evaluate is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            roles.module.eval()
            row.update(evaluate(roles, step))
            roles.module.train()

    if start == 0 and evaluate is not None and cfg.eval_every:
        row: dict[str, Any] = {"step": 0}
        maybe_eval(0, row)
        log.append(row)

    bar = tqdm(range(start, cfg.steps), desc=f"{cfg.method}", disable=not progress, initial=start, total=cfg.steps,
               leave=False, dynamic_ncols=True)
    roles.module.train()
    for step in bar:
        idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen)
        noise = torch.randn(cfg.batch_size, *pool.images.shape[1:], generator=gen).to(device)
        sctx, tctx = _contexts(pool, idx, cfg.teacher_route, device)
        teacher = roles.teacher
        if cfg.teacher_ref == "moved":
            teacher = placement_matched_teacher(roles.teacher, roles.module, sctx, period=cfg.teacher_ref_period)
        try:
            if cfg.method == "dopsd":
                res = dopsd_ref.dopsd_train_step(roles.module, teacher, [MicroBatch(noise, sctx, tctx)], sigmas,
                                                 opt, roles.params, step_cfg, roles.update_teacher, step=step + 1)
                loss, per_step, gnorm = res.loss, res.per_step.tolist(), res.grad_norm
            elif cfg.method in ("sft", "sft_teacher"):
                sig = dopsd_ref.sample_training_sigmas(cfg.batch_size, gen, "mixed").to(device)
                res = dopsd_ref.sft_train_step(roles.module, [SFTMicroBatch(pool.images[idx].to(device), noise, sig, sctx)],
                                               opt, roles.params, step_cfg, roles.update_teacher, step=step + 1)
                loss, per_step, gnorm = res.loss, [], res.grad_norm
            else:  # offpolicy
                l = dopsd_ref.offpolicy_distillation_loss(
                    lambda x, s: roles.module(x, s, sctx), lambda x, s: teacher(x, s, tctx),
                    pool.images[idx].to(device), noise, sigmas, cfg.space)  # type: ignore[arg-type]
                l.backward()
                gnorm = apply_gradients(roles.params, opt, step_cfg, roles.update_teacher, step + 1)
                loss, per_step = float(l.detach()), []
        except NonFiniteLossError as exc:
            last = latest_checkpoint(ckpt_dir) if write else None
            raise NonFiniteLossError(f"{exc}; training stopped, last good checkpoint: {last}") from exc
        row = {"step": step + 1, "loss": loss, "grad_norm": gnorm}
        if per_step:
            row["per_step"] = per_step
        maybe_eval(step + 1, row)
        log.append(row)
        bar.set_postfix(loss=f"{loss:.4f}")
        if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
            checkpoint(step + 1)
    bar.close()
    if write:
        checkpoint(cfg.steps)
        with open(out / "log.jsonl", "w") as f:
            for r in log:
                f.write(json.dumps(r) + "\n")
        export(roles, cfg, out / "final")
    return RunResult(roles, log, out if write else None, time.time() - t0)


def export(roles: Roles, cfg: FinetuneConfig, folder: Path) -> None:
    """Write the trained student (adapter tensors, or the full model) + config to ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in roles.student_state().items()}
    tmp = folder / "student.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(folder / "student.safetensors")
    (folder / "finetune_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))


def load_finetuned(run: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, FinetuneConfig]:
    """Load a fine-tuned student from a run folder (its ``final/``) for sampling/evaluation.

    Returns the student model ``(x, σ, context) -> v`` and the run's config.
    """
    from safetensors.torch import load_file

    run = Path(run)
    folder = run / "final" if (run / "final").exists() else run
    cfg_file, weights = folder / "finetune_config.json", folder / "student.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: is {run} a finished fine-tuning run?")
    from toy_models.finetune.config import load_config

    cfg = load_config(cfg_file)
    device = resolve_device(str(device))
    model = load_model(cfg.model, device)
    roles = build_roles(model, cfg)
    state = load_file(str(weights))
    if cfg.scope == "full":
        roles.module.load_state_dict(state)
    else:
        roles.module.load_adapter_state("student", state)  # type: ignore[attr-defined]
    roles.module.eval()
    return roles.module, cfg


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m toy_models.finetune train|sample|eval ...")
