"""Frozen dataclass configuration of a D-OPSD run, loaded from YAML/JSON.

Every field is validated on construction; errors name the field. ``load_config(path,
overrides)`` accepts ``section.field=value`` overrides (YAML-parsed values).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ModelConfig", "LoraConfigSpec", "TrainConfig", "DataConfig", "RunConfig", "load_config"]


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
    """LoRA hyper-parameters; ``targets: null`` uses the backbone's intended list."""

    rank: int = 64
    alpha: float = 128.0
    targets: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and roll-out settings (defaults = the released Z-Image recipe).

    Attributes:
        mode: "lora" (student/teacher adapters) or "full" (all transformer weights, EMA copy).
        lr, betas, weight_decay, max_grad_norm: AdamW and clipping.
        ema_decay: teacher EMA decay d (< 1; a live teacher collapses).
        steps: optimizer steps; batch_size: per-process micro-batch; grad_accum: micro-batches.
        num_rollout_steps: K; sigmas: explicit grid (overrides the backbone's).
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
    sigmas: tuple[float, ...] | None = None
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


def _build(cls, raw: dict[str, Any], where: str):
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
    d[keys[-1]] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML/JSON, apply ``a.b=value`` overrides, validate into a :class:`RunConfig`."""
    text = Path(path).read_text()
    raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    raw = raw or {}
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like section.field=value")
        k, v = ov.split("=", 1)
        _set(raw, k, yaml.safe_load(v))
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
