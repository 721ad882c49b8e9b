"""Fine-tune the toy few-step model on a few targets with D-OPSD or a baseline.

One loop serves every method; only the loss of a step differs:

* ``dopsd``: the student rolls out K steps from noise on the *text* context; the EMA
  teacher grades each state with *text + target image* (:func:`dopsd_ref.dopsd_rollout_loss`).
* ``sft``: flow matching on noised targets (:func:`dopsd_ref.flow_matching_loss`).
* ``offpolicy``: the same teacher, queried on noised targets instead of student states.
* ``sft_teacher``: flow matching on samples the initial teacher drew for each target.
* ``dreambooth``: flow matching on the targets plus ``prior_weight`` × flow matching on
  prior-preservation pairs (the initial model's 4-step samples of known-shape prompts).
* ``dopsd_prior``: D-OPSD plus an on-policy prior batch: the student also rolls out from
  known-shape prompts (text only) and is graded there by the EMA teacher on the same text
  only, ``L = ½ (L_D-OPSD(targets) + L_D-OPSD(prior prompts))`` (two equal micro-batches).

Options of ``dopsd``: ``recon_weight`` λ adds λ × flow matching on the targets (text context)
to the roll-out loss; ``rollout_schedule`` sets K per optimizer step (:class:`dopsd_ref.KSchedule`).

Checkpoints (student, teacher, optimizer, step, RNG) are crash-safe and verified
(:mod:`dopsd_ref.checkpoint`) and resume exactly; a NaN/inf loss stops the run with a message
naming the step, keeping the last good checkpoint. An existing run is never overwritten
silently (``resume`` or ``overwrite``); Ctrl-C stops after the current step with a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
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
from dopsd_ref.checkpoint import (CheckpointError, TrainState, clean_stale, find_checkpoint, load_checkpoint, rng_state,
                                  save_checkpoint, set_rng_state, stop_on_interrupt)
from dopsd_ref.train import apply_gradients
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.models.dit import ToyDiT
from toy_models.finetune.adapters import add_local_adapters
from toy_models.finetune.config import FinetuneConfig, resume_changes
from toy_models.finetune.reference import placement_matched_teacher
from toy_models.finetune.targets import TargetSet, load_targets
from toy_models.world.folder import shorten

__all__ = ["Roles", "build_roles", "resolve_device", "run_finetune", "RunResult", "RunExistsError", "load_finetuned",
           "check_trainable_captions"]

ContextModel = Callable[[Tensor, Tensor, ToyContext], Tensor]
RARE_IDS = (V.WORD_TO_ID[V.SHAPE_TOKEN], V.WORD_TO_ID[V.STYLE_TOKEN])


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when available, else CPU; any other name must exist on this machine.

    Raises:
        ValueError: an unknown device name, CUDA on a build or machine without it (says
            which), a CUDA index beyond the GPUs present, or MPS where it is unavailable.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"config field 'device': unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if torch.version.cuda is None or not torch.cuda.is_available():
            why = (f"this torch build ({torch.__version__}) has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise ValueError(f"config field 'device' is {name!r} but {why}; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"config field 'device' is {name!r} but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"config field 'device' is {name!r} but MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"config field 'device': {name!r} is not supported here (use auto, cpu, cuda, cuda:N or mps)")
    return dev


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
    """What a run produced: the roles (trained), its log rows and the run folder.

    Attributes:
        start: the step the run started (or resumed) at.
        interrupted: Ctrl-C stopped the run after a complete step (its checkpoint was saved).
    """

    roles: Roles
    log: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None
    seconds: float = 0.0
    start: int = 0
    interrupted: bool = False


class RunExistsError(ValueError):
    """The output folder already holds a run and neither resume nor overwrite was asked for."""


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


@torch.no_grad()
def prior_samples(roles: Roles, cfg: FinetuneConfig, device: torch.device) -> TargetSet:
    """Prior-preservation pairs (for ``dreambooth``): the initial student's own K-step samples
    of ``cfg.prior_images`` known-shape prompts (solid shapes, base domain), text context only.

    Drawn before any training step (the student is still the base model) with their own
    generator, so a resumed run draws the same pairs. The prompts come from a seed of their
    own (``data_seed + 17``), not the evaluation's known prompts.
    """
    from toy_models.world import data as D
    from toy_models.world.concepts import prior_specs

    specs = prior_specs(cfg.prior_images, cfg.data_seed + 17)
    captions = [D.caption(s) for s in specs]
    ctx = ToyContext(V.tokenize(captions)).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 199)
    noise = torch.randn(len(captions), 3, 16, 16, generator=g).to(device)
    was = roles.module.training
    roles.module.eval()
    x = dopsd_ref.euler_sample(lambda x, s: roles.module(x, s, ctx), noise, dopsd_ref.uniform_sigmas(cfg.rollout_steps))
    roles.module.train(was)
    return TargetSet(x.clamp(-1, 1).cpu(), captions, specs, "prior")


def load_model(path: str, device: torch.device) -> ToyDiT:
    """The model to fine-tune: a folder, or the name of a shipped one (``toy-dit-turbo4``)."""
    from toy_models.models import hub

    folder = Path(path) if Path(path).exists() else hub.weights_path(path)
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(
            f"model {path!r}: no model.safetensors in {folder} (shipped names: {hub.TURBO!r}, {hub.BASE!r};"
            " or train one with the toy_models recipes)"
        )
    return ToyDiT.from_pretrained(folder).to(device)


def check_trainable_captions(targets: TargetSet, scope: str) -> None:
    """Under a rare-token-local scope every caption must carry a rare token.

    ``prompt_gated`` and ``token_kv`` adapters act only on prompts (positions) with ``sks`` or
    ``zwx``: a pair whose caption has neither trains nothing (zero gradient), and a set of
    such pairs would "train" to completion without changing the model.

    Raises:
        ValueError: naming how many captions lack the token and the first ones (with their
            captions-file line when the targets come from a folder).
    """
    if scope not in ("prompt_gated", "token_kv"):
        return
    rare = {V.SHAPE_TOKEN, V.STYLE_TOKEN}
    bad = [i for i, c in enumerate(targets.captions) if not rare & set(c.split())]
    if not bad:
        return
    src = targets.sources or [f"target {i}" for i in range(len(targets))]
    shown = "; ".join(f"{src[i]}: {shorten(targets.captions[i], 40)}" for i in bad[:3])
    what = "none" if len(bad) == len(targets) else f"{len(bad)} of {len(targets)}"
    raise ValueError(
        f"{what} of the captions contain a rare token ({V.SHAPE_TOKEN} or {V.STYLE_TOKEN}): with scope={scope!r} the "
        f"adapter acts only on prompts with one, so {'training would change nothing' if what == 'none' else 'those pairs would train nothing'} "
        f"({shown}{'; ...' if len(bad) > 3 else ''}); add the token to the captions, or use --scope cross_attn or full"
    )


_RUN_FILES = ("config.json", "checkpoints", "log.jsonl", "final")


def prepare_run_folder(out: Path, resume: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """Refuse to train into an existing run unless resuming; ``overwrite`` removes it first.

    Raises:
        RunExistsError: ``out`` holds a run (config, checkpoints, log or final weights) and
            neither ``resume`` nor ``overwrite`` is set; ValueError: both are set.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: choose one")
    present = [name for name in _RUN_FILES if (out / name).exists()]
    if not present or resume:
        return
    if not overwrite:
        raise RunExistsError(f"{out} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --out")
    for name in present:  # checkpoints first: a kill here leaves no half-old run to resume from
        path = out / name
        trash = out / f".{name}.overwritten"
        if trash.exists():
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        os.replace(path, trash)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    say(f"overwrite: removed the previous run in {out} ({', '.join(present)})")


def read_resume_state(ckpt_dir: Path, cfg: FinetuneConfig, say: Callable[[str], None]) -> tuple[TrainState | None, dict]:
    """The newest complete checkpoint and the config fields changed since it was written.

    Raises:
        CheckpointError: checkpoints exist but none is complete (never a silent restart).
        ValueError: a config change a resume may not make (see :func:`resume_changes`).
    """
    clean_stale(ckpt_dir)
    found = find_checkpoint(ckpt_dir)
    for note in found.notes:
        say(f"checkpoint: {note}")
    if found.path is None:
        say(f"no checkpoint in {ckpt_dir}: starting at step 0")
        return None, {}
    state = load_checkpoint(found.path, verify=False)  # find_checkpoint verified it
    changed = resume_changes(state.extra.get("config", {}), cfg, state.step)
    return state, changed


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_log(out: Path, log: list[dict[str, Any]]) -> None:
    _write_text_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))


def run_finetune(
    cfg: FinetuneConfig,
    *,
    targets: TargetSet | None = None,
    model: ToyDiT | None = None,
    evaluate: Callable[[Roles, int], dict[str, float]] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    write: bool = True,
    say: Callable[[str], None] | None = None,
) -> RunResult:
    """Run one fine-tuning job as configured.

    Args:
        cfg: the run's configuration.
        targets: override the configured target set.
        model: override loading ``cfg.model`` (e.g. an already loaded model; it is modified).
        evaluate: called every ``cfg.eval_every`` steps (and at 0 and the end) with the roles
            and the step; its metrics join the log.
        resume: continue from the newest complete checkpoint in ``cfg.out/checkpoints``
            (allowed config changes: :data:`~toy_models.finetune.config.RESUMABLE_CHANGES`;
            a new lr/weight_decay is applied to the optimizer and said so).
        overwrite: replace a run already in ``cfg.out`` (without it, and without ``resume``,
            an existing run is an error).
        progress: show a progress bar.
        write: write checkpoints, ``log.jsonl``, ``config.json`` and the final adapter.
        say: where status lines go (default: stderr).

    Raises:
        NonFiniteLossError: a NaN/inf loss (the last good checkpoint is kept).
        RunExistsError, CheckpointError, ValueError: refused before training (named cause).

    The first Ctrl-C stops the run after the current step and saves a checkpoint
    (``RunResult.interrupted``); a second one aborts at once (checkpoints stay consistent).
    """
    t0 = time.time()
    say = say or (lambda m: print(m, file=sys.stderr))
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    state, changed = None, {}
    if write:
        prepare_run_folder(out, resume, overwrite, say)
    if resume:
        state, changed = read_resume_state(ckpt_dir, cfg, say)
    torch.manual_seed(cfg.seed)
    targets = targets if targets is not None else load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
    check_trainable_captions(targets, cfg.scope)
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2))  # fails early if unwritable
    model = model if model is not None else load_model(cfg.model, device)
    model = model.to(device)
    roles = build_roles(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(roles.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = tuple(0.0 if k < cfg.skip_first_steps else 1.0 for k in range(cfg.rollout_steps)) if cfg.skip_first_steps else None
    step_cfg = StepConfig(space=cfg.space, grad_strategy=cfg.grad_strategy, max_grad_norm=cfg.max_grad_norm,  # type: ignore[arg-type]
                          step_weights=weights)
    sigmas = dopsd_ref.uniform_sigmas(cfg.rollout_steps)
    schedule = cfg.k_schedule() if cfg.rollout_schedule else None  # K per 1-based optimizer step
    log: list[dict[str, Any]] = []
    resumes: list[dict[str, Any]] = []
    start = 0

    pool = targets  # sft_teacher: drawn by the *initial* teacher, before any resume
    if cfg.method == "sft_teacher":
        pool = teacher_samples(roles, targets, cfg, per_target=4, device=device)
    prior = prior_samples(roles, cfg, device) if cfg.method in ("dreambooth", "dopsd_prior") else None
    if state is not None:
        roles.load_state(state.student, state.teacher)
        opt.load_state_dict(state.optimizer)
        set_rng_state(state.rng, {"data": gen})
        start = state.step
        log = list(state.extra.get("log", []))
        resumes = list(state.extra.get("resumes", []))
        for g in opt.param_groups:  # the new values win; AdamW's moments are kept
            g["lr"], g["weight_decay"] = cfg.lr, cfg.weight_decay
        applied = {k: v for k, v in changed.items() if k in ("lr", "weight_decay")}
        resumes.append({"step": start, "changed": {k: list(v) for k, v in changed.items()}})
        say(f"resumed at step {start}" + ("; applied to the optimizer: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in applied.items()) if applied else ""))

    def checkpoint(step: int) -> None:
        if write:
            save_checkpoint(ckpt_dir, TrainState(step, roles.student_state(), roles.teacher_state(), opt.state_dict(),
                                                 rng_state({"data": gen}),
                                                 extra={"log": log, "config": cfg.to_dict(), "resumes": resumes}))

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
    interrupted = False
    with stop_on_interrupt(say) as interrupt:
        for step in bar:
            grid = schedule.sigmas(step + 1) if schedule is not None else sigmas
            row = train_one_step(cfg, roles, opt, step_cfg, grid, pool, gen, device, step, ckpt_dir if write else None,
                                 prior=prior)
            maybe_eval(step + 1, row)
            log.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if interrupt["stop"] and step + 1 < cfg.steps:
                checkpoint(step + 1)
                interrupted = True
                break
            if cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0:
                checkpoint(step + 1)
        bar.close()
        if write:
            if not interrupted:
                checkpoint(cfg.steps)
            _write_log(out, log)
            if not interrupted:
                export(roles, cfg, out / "final")
    if interrupted:
        say(f"interrupted: checkpoint saved at step {step + 1}; continue with --resume")
    return RunResult(roles, log, out if write else None, time.time() - t0, start, interrupted)


def train_one_step(cfg: FinetuneConfig, roles: Roles, opt: torch.optim.Optimizer, step_cfg: StepConfig, sigmas: Tensor,
                   pool: TargetSet, gen: torch.Generator, device: torch.device, step: int,
                   ckpt_dir: Path | None, *, prior: TargetSet | None = None) -> dict[str, Any]:
    """Draw one batch from ``pool`` and take one optimizer step of ``cfg.method``; returns the log row.

    ``prior``: the prior-preservation pairs of ``dreambooth`` (see :func:`prior_samples`).

    Raises:
        NonFiniteLossError: naming the step (and σ where traceable) and the last good checkpoint.
    """
    idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen)
    noise = torch.randn(cfg.batch_size, *pool.images.shape[1:], generator=gen).to(device)
    sctx, tctx = _contexts(pool, idx, cfg.teacher_route, device)
    teacher = roles.teacher
    if cfg.teacher_ref == "moved":
        teacher = placement_matched_teacher(roles.teacher, roles.module, sctx, period=cfg.teacher_ref_period)
    try:
        recon_loss = None
        if cfg.method == "dopsd":
            recon = None
            if cfg.recon_weight > 0:  # λ·flow matching on the targets; extra draws only when on
                rsig = dopsd_ref.sample_training_sigmas(cfg.batch_size, gen, "mixed").to(device)
                rnoise = torch.randn(cfg.batch_size, *pool.images.shape[1:], generator=gen).to(device)
                recon = [SFTMicroBatch(pool.images[idx].to(device), rnoise, rsig, sctx)]
            res = dopsd_ref.dopsd_train_step(roles.module, teacher, [MicroBatch(noise, sctx, tctx)], sigmas,
                                             opt, roles.params, step_cfg, roles.update_teacher, step=step + 1,
                                             reconstruction=recon, reconstruction_weight=cfg.recon_weight)
            loss, per_step, gnorm, recon_loss = res.loss, res.per_step.tolist(), res.grad_norm, res.reconstruction_loss
        elif cfg.method == "dopsd_prior":
            if prior is None:
                raise ValueError("method 'dopsd_prior' needs its prior prompts (prior=prior_samples(...))")
            res = _dopsd_prior_step(cfg, roles, opt, step_cfg, sigmas, prior, MicroBatch(noise, sctx, tctx), teacher,
                                    gen, device, step)
            loss, per_step, gnorm = res.loss, res.per_step.tolist(), res.grad_norm
        elif cfg.method == "dreambooth":
            if prior is None:
                raise ValueError("method 'dreambooth' needs its prior-preservation pairs (prior=prior_samples(...))")
            loss, gnorm, recon_loss = _dreambooth_step(cfg, roles, opt, step_cfg, pool, prior, idx, noise, sctx, gen,
                                                       device, step)
            per_step = []
        elif cfg.method in ("sft", "sft_teacher"):
            sig = dopsd_ref.sample_training_sigmas(cfg.batch_size, gen, "mixed").to(device)
            res = dopsd_ref.sft_train_step(roles.module, [SFTMicroBatch(pool.images[idx].to(device), noise, sig, sctx)],
                                           opt, roles.params, step_cfg, roles.update_teacher, step=step + 1)
            loss, per_step, gnorm = res.loss, [], res.grad_norm
        else:  # offpolicy
            try:
                l = dopsd_ref.offpolicy_distillation_loss(
                    lambda x, s: roles.module(x, s, sctx), lambda x, s: teacher(x, s, tctx),
                    pool.images[idx].to(device), noise, sigmas, cfg.space)  # type: ignore[arg-type]
                l.backward()
                gnorm = apply_gradients(roles.params, opt, step_cfg, roles.update_teacher, step + 1)
            except BaseException:
                opt.zero_grad(set_to_none=True)
                raise
            loss, per_step = float(l.detach()), []
    except NonFiniteLossError as exc:
        try:
            last = find_checkpoint(ckpt_dir).path if ckpt_dir is not None else None
        except CheckpointError:
            last = None
        raise NonFiniteLossError(f"{exc}; training stopped, last good checkpoint: {last}") from exc
    row: dict[str, Any] = {"step": step + 1, "loss": loss, "grad_norm": gnorm}
    if per_step:
        row["per_step"] = per_step
    if recon_loss is not None:
        row["recon_loss" if cfg.method == "dopsd" else "prior_loss"] = recon_loss
    return row


def _dopsd_prior_step(cfg: FinetuneConfig, roles: Roles, opt: torch.optim.Optimizer, step_cfg: StepConfig,
                      sigmas, prior: TargetSet, target_mb: MicroBatch, target_teacher, gen: torch.Generator,
                      device: torch.device, step: int) -> dopsd_ref.StepResult:
    """One D-OPSD step with an on-policy prior micro-batch: ``L = ½ (L_targets + L_prior)``.

    The prior micro-batch (as large as the target batch, prompts drawn from ``gen`` after the
    target batch) holds known-shape captions of ``prior``; there both roles see the text only,
    so the student is held to the EMA teacher's own text-only velocities on the states it
    visits for prompts it already knows (D-OPSD's analogue of prior preservation; the prior
    images are not used). Target micro-batch: exactly as ``dopsd``.
    """
    b = target_mb.noise.shape[0]
    pidx = torch.randint(len(prior), (b,), generator=gen)
    pnoise = torch.randn(b, *prior.images.shape[1:], generator=gen).to(device)
    pctx = ToyContext(V.tokenize([prior.captions[i] for i in pidx.tolist()])).to(device)

    def teacher(x: Tensor, s: Tensor, c: ToyContext) -> Tensor:  # text-only context: the plain EMA teacher
        return roles.teacher(x, s, c) if c.ref is None else target_teacher(x, s, c)

    return dopsd_ref.dopsd_train_step(roles.module, teacher, [target_mb, MicroBatch(pnoise, pctx, pctx)], sigmas, opt,
                                      roles.params, step_cfg, roles.update_teacher, step=step + 1)


def _dreambooth_step(cfg: FinetuneConfig, roles: Roles, opt: torch.optim.Optimizer, step_cfg: StepConfig,
                     pool: TargetSet, prior: TargetSet, idx: Tensor, noise: Tensor, sctx: ToyContext,
                     gen: torch.Generator, device: torch.device, step: int) -> tuple[float, float, float]:
    """One DreamBooth step: ``L = L_FM(targets) + w·L_FM(prior pairs)``; returns (L, ||∇||, L_FM(prior)).

    Both terms are :func:`dopsd_ref.flow_matching_loss` with the text context of their own
    prompts; the prior batch (as large as the target batch) is drawn from ``gen`` after the
    target batch.
    """
    b = cfg.batch_size
    sig = dopsd_ref.sample_training_sigmas(b, gen, "mixed").to(device)
    pidx = torch.randint(len(prior), (b,), generator=gen)
    pnoise = torch.randn(b, *prior.images.shape[1:], generator=gen).to(device)
    psig = dopsd_ref.sample_training_sigmas(b, gen, "mixed").to(device)
    pctx = ToyContext(V.tokenize([prior.captions[i] for i in pidx.tolist()])).to(device)
    try:
        l_target = dopsd_ref.flow_matching_loss(lambda x, s: roles.module(x, s, sctx), pool.images[idx].to(device), noise, sig)
        l_prior = dopsd_ref.flow_matching_loss(lambda x, s: roles.module(x, s, pctx), prior.images[pidx].to(device),
                                               pnoise, psig)
        l = l_target + cfg.prior_weight * l_prior
        if not torch.isfinite(l.detach()):
            raise NonFiniteLossError(f"DreamBooth loss is {l.item()} (target {l_target.item()}, prior {l_prior.item()}) "
                                     f"at optimizer step {step + 1}")
        l.backward()
        gnorm = apply_gradients(roles.params, opt, step_cfg, roles.update_teacher, step + 1)
    except BaseException:
        opt.zero_grad(set_to_none=True)
        raise
    return float(l.detach()), gnorm, float(l_prior.detach())


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

    device = resolve_device(str(device))
    run = Path(run)
    folder = run / "final" if (run / "final").exists() else run
    cfg_file, weights = folder / "finetune_config.json", folder / "student.safetensors"
    for f in (cfg_file, weights):
        if not f.exists():
            raise FileNotFoundError(f"{f} is missing: is {run} a finished fine-tuning run?")
    from toy_models.finetune.config import load_config

    cfg = load_config(cfg_file)
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
