"""Frozen dataclass configuration of a D-OPSD run, loaded from YAML/JSON.

Every field is validated on construction — its type first, then its range; errors name the
field and the value as ``section.field=value`` (e.g. ``train.steps=abc: must be an integer``).
``load_config(path, overrides)`` accepts ``section.field=value`` overrides (YAML-parsed
values; a float field also takes a numeric string such as ``1e-4``, which YAML reads as text).

A resumed run may change only :data:`RESUMABLE_FIELDS` (see :func:`resume_changes`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["ModelConfig", "LoraConfigSpec", "TrainConfig", "DataConfig", "RunConfig", "load_config",
           "RESUMABLE_FIELDS", "config_dict", "resume_changes"]


def _describe(hint: Any) -> str:
    if hint is bool:
        return "true or false"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    args = get_args(hint)
    if get_origin(hint) is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} values"
    if get_origin(hint) is Union or type(hint).__name__ == "UnionType":
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, value converted to ``hint``): ints for floats, lists for tuples, numeric strings for floats."""
    if hint is Any:
        return True, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    origin, args = get_origin(hint), get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        out = []
        for v, h in zip(value, items):
            ok, v = _coerce(v, h)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out)
    if origin is Union or type(hint).__name__ == "UnionType":
        for a in args:
            if a is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _coerce(value, a)
            if ok:
                return True, v
        return False, value
    return True, value


def _check_types(obj: Any, section: str) -> None:
    """Check (and convert, e.g. 1 -> 1.0) every field of a frozen config dataclass against its annotation.

    Raises:
        ValueError: ``section.field=value: must be <type>``.
    """
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        ok, converted = _coerce(value, hints[f.name])
        if not ok:
            shown = value if isinstance(value, str) and len(value) <= 60 else repr(value)[:60]
            raise ValueError(f"{section}.{f.name}={shown}: must be {_describe(hints[f.name])}")
        if converted is not value:
            object.__setattr__(obj, f.name, converted)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to load.

    Attributes:
        backbone: "zimage" (Z-Image-Turbo) or "flux2" (FLUX.2-klein).
        pretrained: diffusers repo id or local path of the pipeline (ignored when ``tiny``).
        tiny: build tiny random components from config (CPU tests / smoke runs).
        vlm: Qwen3-VL id/path for the Z-Image hybrid-VLM teacher.
        vlm_min_match: required fraction of VLM language-model keys matched by the text encoder.
        vlm_min_pixels / vlm_max_pixels: processor pixel budget of the teacher image.
        weight_dtype: dtype of the frozen weights ("float32" | "bfloat16" | "float16").
        max_sequence_length: text tokens for the student context.
        flux2_text_layers: hidden-state layers stacked into the FLUX.2 prompt embeddings.
        teacher_instruction: appended to the teacher's prompt (FLUX.2 editing branch only).
        flux2_teacher: "editing" (reference-image tokens, the released post-paper variant) or
            "vlm" (hybrid Qwen3-VL context with the text encoder's LM, FLUX.2's stacked layers).
        random_init: build every component at its real size from the published configs in
            ``paper_repro/configs/published`` with random weights (dry runs: step time and
            memory without downloading any weights); ``pretrained`` picks the configs.
    """

    backbone: str = "zimage"
    pretrained: str = ""
    tiny: bool = False
    vlm: str = "Qwen/Qwen3-VL-4B-Instruct"
    vlm_min_match: float = 1.0
    vlm_min_pixels: int = 512 * 512
    vlm_max_pixels: int = 768 * 768
    weight_dtype: str = "bfloat16"
    max_sequence_length: int = 512
    flux2_text_layers: tuple[int, ...] = (9, 18, 27)
    teacher_instruction: str = ""
    flux2_teacher: str = "editing"
    random_init: bool = False

    def __post_init__(self) -> None:
        _check_types(self, "model")
        if self.flux2_teacher not in ("editing", "vlm"):
            raise ValueError(f"model.flux2_teacher must be 'editing' or 'vlm', got {self.flux2_teacher!r}")
        if self.backbone not in ("zimage", "flux2"):
            raise ValueError(f"model.backbone must be 'zimage' or 'flux2', got {self.backbone!r}")
        if not self.tiny and not self.pretrained:
            raise ValueError("model.pretrained must name the pipeline checkpoint (or set model.tiny: true)")
        if self.weight_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.weight_dtype must be float32/bfloat16/float16, got {self.weight_dtype!r}")
        if not 0.0 < self.vlm_min_match <= 1.0:
            raise ValueError(f"model.vlm_min_match must be in (0, 1], got {self.vlm_min_match}")


@dataclass(frozen=True)
class LoraConfigSpec:
    """LoRA hyper-parameters; ``targets``: null (the backbone's intended list), a preset name or module names."""

    rank: int = 64
    alpha: float = 128.0
    targets: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_types(self, "lora")
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and roll-out settings (defaults = the released Z-Image recipe).

    Attributes:
        mode: "lora" (student/teacher adapters) or "full" (all transformer weights, EMA copy).
        lr, betas, weight_decay, max_grad_norm: AdamW and clipping.
        ema_decay: teacher EMA decay d (< 1; a live teacher collapses).
        steps: optimizer steps; batch_size: per-process micro-batch; grad_accum: micro-batches.
        num_rollout_steps: K; sigmas: explicit grid, or a named FLUX.2 grid ("flux2_sampler", "flux2_released"; paper_repro.grids), overriding the backbone's default.
        space: "x0" (released code) or "velocity" (paper).
        grad_strategy: "per_step" (flat memory in K) or "single" (released code; DeepSpeed).
        mixed_precision: "no" or "bf16" (autocast via accelerate).
        gradient_checkpointing: recompute transformer blocks in backward.
        checkpoint_every / keep_checkpoints / sample_every / log_every: I/O cadence.
        sample_prompts / sample_seed: sample grid during training.
    """

    mode: str = "lora"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    steps: int = 3000
    batch_size: int = 1
    grad_accum: int = 1
    num_rollout_steps: int = 4
    sigmas: tuple[float, ...] | str | None = None
    space: str = "x0"
    grad_strategy: str = "per_step"
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    sample_prompts: tuple[str, ...] = ()
    sample_seed: int = 30
    log_every: int = 10

    def __post_init__(self) -> None:
        _check_types(self, "train")
        if self.mode not in ("lora", "full"):
            raise ValueError(f"train.mode must be 'lora' or 'full', got {self.mode!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1) (d = 1 is a frozen teacher: use mode with "
                             f"ema_decay close to 1; a live copy d = 0 collapses), got {self.ema_decay}")
        if self.space not in ("x0", "velocity"):
            raise ValueError(f"train.space must be 'x0' or 'velocity', got {self.space!r}")
        if self.grad_strategy not in ("per_step", "single"):
            raise ValueError(f"train.grad_strategy must be 'per_step' or 'single', got {self.grad_strategy!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"train.mixed_precision must be 'no' or 'bf16' (fp16 needs a grad scaler), "
                             f"got {self.mixed_precision!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_rollout_steps", "checkpoint_every", "sample_every",
                     "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        import math

        for name in ("lr", "weight_decay", "max_grad_norm"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name != "weight_decay" and v == 0):
                raise ValueError(f"train.{name}={v}: must be finite and {'>= 0' if name == 'weight_decay' else '> 0'}")


@dataclass(frozen=True)
class DataConfig:
    """Folder dataset: ``root`` with image + same-stem .txt caption pairs.

    ``cache``: a folder written by ``python -m paper_repro.cache`` (VAE latents, student and
    teacher contexts of every pair); when set, the trainer reads contexts from it and never
    loads the text encoder, the VLM or the VAE.
    """

    root: str = ""
    resolution: int = 1024
    caption_prefix: str = ""
    cache: str = ""

    def __post_init__(self) -> None:
        _check_types(self, "data")
        if not self.root:
            raise ValueError("data.root must name a folder of image/caption pairs")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: model, LoRA, training, data and the output folder."""

    model: ModelConfig
    data: DataConfig
    lora: LoraConfigSpec = field(default_factory=LoraConfigSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/dopsd"

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"output_dir={self.output_dir!r}: must be a non-empty folder path")


# Fields a resumed run may change: how far and how often (I/O), the optimizer's lr, weight decay
# and clipping (written into the optimizer on resume), gradient checkpointing (memory only),
# reading the contexts from a cache instead of the live encoders (equal bit for bit; the cache is
# checked against the folder and settings) and where the run lives. Every other field (model,
# data, LoRA shape, seed, batch, roll-out, loss, teacher) defines the run; changing it on resume
# is refused, naming the field.
RESUMABLE_FIELDS = ("train.steps", "train.lr", "train.weight_decay", "train.max_grad_norm", "train.checkpoint_every",
                    "train.keep_checkpoints", "train.sample_every", "train.sample_prompts", "train.sample_seed",
                    "train.log_every", "train.gradient_checkpointing", "data.cache", "output_dir")


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """``section.field -> value`` of a run config, JSON-normalised (tuples become lists)."""
    flat: dict[str, Any] = {"output_dir": cfg.output_dir}
    for section in ("model", "data", "lora", "train"):
        for k, v in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{k}"] = v
    return json.loads(json.dumps(flat))


def resume_changes(saved: dict[str, Any], cfg: RunConfig, step: int) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between a checkpoint's :func:`config_dict` and ``cfg``: ``{field: (old, new)}``.

    Raises:
        ValueError: a changed field outside :data:`RESUMABLE_FIELDS` (each named with its old
            and new value), or ``train.steps`` below the checkpoint's step.
    """
    now = config_dict(cfg)
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    refused = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items() if k not in RESUMABLE_FIELDS]
    if refused:
        raise ValueError("cannot resume with a changed " + "; ".join(refused) + " (the checkpoint was trained with "
                         f"the old value; a resume may change only {', '.join(RESUMABLE_FIELDS)}; "
                         "start a new output_dir, or pass --overwrite with --no-resume)")
    if cfg.train.steps < step:
        raise ValueError(f"train.steps={cfg.train.steps}: the checkpoint is already at step {step}")
    return changed


def _build(cls, raw: dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping of fields, got {type(raw).__name__} {str(raw)[:40]!r}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ValueError(f"unknown field(s) in {where}: {sorted(unknown)}; allowed: {sorted(names)}")
    kw = {}
    for k, v in raw.items():
        if isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML/JSON, apply ``a.b=value`` overrides, validate into a :class:`RunConfig`.

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: unreadable YAML/JSON (file and position named), a malformed override, an
            unknown section or field, or a field of the wrong type or range (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path} is not UTF-8 (byte {exc.start})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{str(exc).splitlines()[0] if str(exc) else exc}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping (model:, data:, train:, ...)")
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.field=value")
        k, v = ov.split("=", 1)
        try:
            value = yaml.safe_load(v)
        except yaml.YAMLError:
            value = v  # kept as text; the field's type check names it
        _set(raw, k, value)
    unknown = set(raw) - {"model", "data", "lora", "train", "output_dir"}
    if unknown:
        raise ValueError(f"unknown top-level key(s) {sorted(unknown)} in {path}")
    return RunConfig(
        model=_build(ModelConfig, raw.get("model", {}), "model"),
        data=_build(DataConfig, raw.get("data", {}), "data"),
        lora=_build(LoraConfigSpec, raw.get("lora", {}) or {}, "lora"),
        train=_build(TrainConfig, raw.get("train", {}) or {}, "train"),
        output_dir=str(raw.get("output_dir", "runs/dopsd")),
    )
