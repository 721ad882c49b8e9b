"""Fine-tuning configuration: a frozen dataclass, loadable from JSON with CLI overrides.

``python -m toy_models.finetune train --config my.json --lr 1e-3 --method sft`` reads
``my.json`` (any subset of the fields below) and then applies the flags; every field is a
flag of the same name. Unknown fields and ill-typed values are errors that name the field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

from toy_models.finetune.adapters import SCOPES

__all__ = ["FinetuneConfig", "METHODS", "RESUMABLE_CHANGES", "load_config", "add_config_flags", "config_from_args",
           "resume_changes"]

METHODS = ("dopsd", "sft", "offpolicy", "sft_teacher", "dreambooth", "dopsd_prior")
# Fields a resumed run may change. lr and weight_decay are written into the optimizer's param
# groups; the others only steer the loop (how far, how often to save/evaluate, where). Every
# other field (method, data, seeds, batch, adapter shape, objective) would make the resumed run
# a different run than the one in its checkpoint.
RESUMABLE_CHANGES = ("steps", "lr", "weight_decay", "max_grad_norm", "ckpt_every", "eval_every", "eval_seeds",
                     "device", "out")


def _valid_device(name: str) -> bool:
    if name == "auto":
        return True
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run of the toy model.

    Attributes:
        method: "dopsd" (on-policy self-distillation), "sft" (flow matching on the targets),
            "offpolicy" (teacher-graded, on noised targets), "sft_teacher" (flow matching on
            the initial teacher's samples), "dreambooth" (flow matching on the targets plus
            ``prior_weight`` times flow matching on prior-preservation pairs: the initial
            model's own samples of known-concept prompts), "dopsd_prior" (D-OPSD plus an equal
            micro-batch of known-shape prompts, text only for student and teacher: on-policy
            prior preservation).
        model: folder of the few-step model to fine-tune, or a shipped name
            ("toy-dit-turbo4", "toy-dit-base").
        data: a built-in target set ("concept:ell", "style:hstripe", "domain:pastel") or a
            folder with ``images/`` and ``captions.jsonl``.
        num_targets: how many image–caption pairs a built-in set provides.
        data_seed: seed of a built-in set.
        steps, batch_size, lr, weight_decay, max_grad_norm: optimisation.
        rollout_steps: K, the student's roll-out length (uniform grid).
        skip_first_steps: D-OPSD loss weight 0 on the first roll-out steps (a teacher-timestep
            subset: the student still takes them, the teacher does not grade them).
        space: D-OPSD loss space, "x0" or "velocity".
        teacher: "ema", "frozen" or "live"; ema_decay: d.
        grad_strategy: "per_step" or "single".
        scope: "prompt_gated" (default: LoRA on attention and MLP, active only for prompts
            with a rare token), "token_kv" (LoRA on cross-attention k/v at the rare token's
            positions), "cross_attn" (every cross-attention k/v, not local) or "full".
        lora_rank, lora_alpha, train_embedding: adapter shape.
        teacher_route: how the teacher sees the target, "tokens" or "encoder".
        teacher_ref: "moved" (the target translated to the student's current layout, a
            placement-free teacher context: :mod:`toy_models.finetune.reference`) or
            "target" (the raw target: the toy teacher then copies its placement).
        teacher_ref_period: the moved target's shift is rounded to multiples of this many
            pixels. 1 (default) for shapes; 2 for the held-out stripes, whose pattern is
            anchored to the pixel grid (an odd shift puts it out of phase and the teacher
            stops drawing it; the style suite uses 2).
        seed: training seed; device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        ckpt_every: checkpoint period in steps (0: only at the end).
        eval_every: evaluation period in steps for the curves (0: never).
        eval_seeds: generation seeds per evaluation prompt.
        out: run folder (non-empty).
        recon_weight: λ of the auxiliary reconstruction (flow-matching) loss on the targets
            added to the D-OPSD loss (0: off, as the released code; dopsd only).
        rollout_schedule: a curriculum of roll-out lengths, ``"step:K,step:K,..."`` starting
            at step 0 (e.g. ``"0:2,100:4"``; read at the 1-based optimizer step); empty: the
            fixed ``rollout_steps``. It sets the D-OPSD and off-policy grids.
        prior_weight, prior_images: "dreambooth" (and "dopsd_prior": its prompts): weight of the prior-preservation loss
            and how many prior pairs the initial model draws (4-step samples of known-shape
            prompts, drawn once before training).

    On ``--resume`` only the fields in :data:`RESUMABLE_CHANGES` may differ from the
    checkpoint's config; a new ``lr``/``weight_decay`` is applied to the optimizer's param
    groups (its moments are kept). Any other change is refused, naming the field.
    """

    method: str = "dopsd"
    model: str = "toy-dit-turbo4"
    data: str = "concept:ell"
    num_targets: int = 12
    data_seed: int = 1234
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    rollout_steps: int = 4
    skip_first_steps: int = 0
    space: str = "x0"
    teacher: str = "ema"
    ema_decay: float = 0.999
    grad_strategy: str = "per_step"
    scope: str = "prompt_gated"
    lora_rank: int = 8
    lora_alpha: float = 8.0
    train_embedding: bool = True
    teacher_route: str = "tokens"
    teacher_ref: str = "moved"
    teacher_ref_period: int = 1
    seed: int = 0
    device: str = "auto"
    ckpt_every: int = 50
    eval_every: int = 0
    eval_seeds: int = 3
    out: str = "runs/finetune"
    recon_weight: float = 0.0
    rollout_schedule: str = ""
    prior_weight: float = 1.0
    prior_images: int = 48

    def __post_init__(self) -> None:
        checks = {
            "method": (self.method in METHODS, f"one of {METHODS}"),
            "space": (self.space in ("x0", "velocity"), "'x0' or 'velocity'"),
            "teacher": (self.teacher in ("ema", "frozen", "live"), "'ema', 'frozen' or 'live'"),
            "ema_decay": (0.0 <= self.ema_decay <= 1.0, "in [0, 1]"),
            "grad_strategy": (self.grad_strategy in ("per_step", "single"), "'per_step' or 'single'"),
            "scope": (self.scope in (*SCOPES, "full"), f"one of {(*SCOPES, 'full')}"),
            "teacher_route": (self.teacher_route in ("tokens", "encoder"), "'tokens' or 'encoder'"),
            "teacher_ref": (self.teacher_ref in ("moved", "target"), "'moved' or 'target'"),
            "teacher_ref_period": (self.teacher_ref_period >= 1, ">= 1"),
            "steps": (self.steps >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "rollout_steps": (self.rollout_steps >= 1, ">= 1"),
            "skip_first_steps": (0 <= self.skip_first_steps < self.rollout_steps, "in [0, rollout_steps)"),
            "lr": (self.lr > 0, "> 0"),
            "num_targets": (self.num_targets >= 1, ">= 1"),
            "lora_rank": (self.lora_rank >= 1, ">= 1"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "max_grad_norm": (self.max_grad_norm > 0, "> 0"),
            "ckpt_every": (self.ckpt_every >= 0, ">= 0"),
            "eval_every": (self.eval_every >= 0, ">= 0"),
            "out": (bool(self.out.strip()), "a non-empty folder path"),
            "device": (_valid_device(self.device), "'auto' or a torch device such as 'cpu', 'cuda', 'cuda:1', 'mps'"),
        }
        checks.update(self._option_checks())
        for name, (ok, want) in checks.items():
            if not ok:
                raise ValueError(f"config field {name!r} must be {want}, got {getattr(self, name)!r}")

    def _option_checks(self) -> dict[str, tuple[bool, str]]:
        """Checks of the reconstruction loss, the K curriculum and the prior preservation."""
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
        schedule_ok, schedule_want = True, ""
        if self.rollout_schedule:
            try:
                self.k_schedule()
            except ValueError as exc:
                schedule_ok, schedule_want = False, f"'step:K,step:K,...' ({exc})"
            if schedule_ok and self.skip_first_steps:
                schedule_ok, schedule_want = False, "empty when skip_first_steps > 0 (the skipped steps need a fixed K)"
        return {
            "recon_weight": (finite(self.recon_weight) and self.recon_weight >= 0
                             and (self.recon_weight == 0 or self.method == "dopsd"), "finite, >= 0 (and > 0 only for method 'dopsd')"),
            "rollout_schedule": (schedule_ok, schedule_want),
            "prior_weight": (finite(self.prior_weight) and self.prior_weight >= 0
                             and (self.prior_weight == 1.0 or self.method != "dopsd_prior"),
                             "finite and >= 0 (and 1 for method 'dopsd_prior': its two micro-batches weigh equally)"),
            "prior_images": (self.prior_images >= 1, ">= 1"),
        }

    def k_schedule(self) -> "KSchedule":
        """The roll-out schedule of this run: ``rollout_schedule`` or the constant ``rollout_steps``."""
        from dopsd_ref.curriculum import KSchedule

        if self.rollout_schedule:
            return KSchedule.parse(self.rollout_schedule)
        return KSchedule.constant(self.rollout_steps)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resume_changes(saved: dict[str, Any], new: FinetuneConfig, step: int) -> dict[str, tuple[Any, Any]]:
    """The fields that differ between a checkpoint's config and ``new``: ``{field: (old, new)}``.

    Args:
        saved: the config stored in the checkpoint (``FinetuneConfig.to_dict()``).
        new: the config of the resumed run.
        step: the checkpoint's step.

    Raises:
        ValueError: a changed field outside :data:`RESUMABLE_CHANGES` (each named, with its
            old and new value), or ``steps`` below the checkpoint's step.
    """
    now = new.to_dict()
    defaults = FinetuneConfig().to_dict()
    changed = {k: (saved.get(k, defaults[k]), v) for k, v in now.items() if saved.get(k, defaults[k]) != v}
    refused = [f"{k}: {old!r} -> {v!r}" for k, (old, v) in changed.items() if k not in RESUMABLE_CHANGES]
    if refused:
        raise ValueError("cannot resume with a changed " + "; ".join(refused) + " (the checkpoint was trained with the "
                         f"old value; resume may change only {', '.join(RESUMABLE_CHANGES)}; start a new run with "
                         "another --out, or --overwrite this one)")
    if new.steps < step:
        raise ValueError(f"config field 'steps' is {new.steps} but the checkpoint is already at step {step}")
    return changed


def _coerce(name: str, typ: type, value: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise ValueError(f"config field {name!r} must be a boolean, got {value!r}")
    try:
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r} must be {typ.__name__}, got {value!r}") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> FinetuneConfig:
    """Read a JSON config (any subset of fields), apply ``overrides``, validate.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: invalid JSON, an unknown field, or a value of the wrong type/range.
    """
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            values = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {p} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"config file {p} must hold a JSON object")
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = get_type_hints(FinetuneConfig)
    known = {f.name for f in fields(FinetuneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(known)}")
    return FinetuneConfig(**{k: _coerce(k, hints[k], v) for k, v in values.items()})


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one ``--<field>`` flag per config field (default: not given)."""
    parser.add_argument("--config", help="JSON file with any subset of the config fields")
    hints = get_type_hints(FinetuneConfig)
    for f in fields(FinetuneConfig):
        kind = hints[f.name]
        parser.add_argument(
            f"--{f.name}", dest=f.name, default=None, type=str if kind is bool else kind,
            help=f"(default: {f.default!r})",
        )


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """Build the config from ``--config`` plus the flags that were given."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(FinetuneConfig)}
    return load_config(getattr(args, "config", None), **overrides)
