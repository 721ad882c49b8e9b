"""Intended LoRA targets per backbone, coverage checks and pipeline-format export.

The released recipe: rank 64 / alpha 128 on attention q/k/v/out and the feed-forward. For
Z-Image the feed-forward is ``w1, w2, w3`` — the released list was written
``[..., "w1" "w2", "w3"]``: Python joins the adjacent literals into ``"w1w2"``, which matches
no module, so only ``w3`` got LoRA. :data:`ZIMAGE_RELEASED_TARGETS_AS_WRITTEN` keeps that
literal for the regression test; :data:`ZIMAGE_TARGETS` is the intended list, and
:func:`missing_lora` checks that every intended module really has an adapter.

Exported LoRA weights use diffusers' format (``transformer.<module>.lora_A.weight`` etc.,
plus alpha/rank metadata) so that ``pipe.load_lora_weights(path)`` reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "LoraSpec",
    "ZIMAGE_TARGETS",
    "ZIMAGE_RELEASED_TARGETS_AS_WRITTEN",
    "FLUX2_TARGETS",
    "targets_for",
    "make_lora_config",
    "intended_modules",
    "missing_lora",
    "student_lora_state_dict",
    "save_lora_for_pipeline",
]

# Intended: attention q/k/v/out and all three SwiGLU projections.
ZIMAGE_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
# What the released code's list evaluates to (missing comma): "w1" "w2" -> "w1w2".
ZIMAGE_RELEASED_TARGETS_AS_WRITTEN: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1" "w2", "w3")  # noqa: ISC001
# FLUX.2: double-stream image/text attention, fused single-stream qkv+mlp, both FFNs.
FLUX2_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out",
)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (released recipe: rank 64, alpha 128, no dropout)."""

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the backbone's intended list

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")


def targets_for(backbone: str) -> tuple[str, ...]:
    """Intended target suffixes for ``backbone`` ("zimage" | "flux2")."""
    if backbone == "zimage":
        return ZIMAGE_TARGETS
    if backbone == "flux2":
        return FLUX2_TARGETS
    raise ValueError(f"unknown backbone {backbone!r}; expected 'zimage' or 'flux2'")


def _pattern(targets: tuple[str, ...]) -> str:
    """A full-match regex over module names: each target is a dotted suffix ('*' = one name)."""
    parts = [re.escape(t).replace(r"\*", r"[^.]+") for t in targets]
    return r"^(?:.*\.)?(?:" + "|".join(parts) + r")$"


def make_lora_config(backbone: str, spec: LoraSpec = LoraSpec()):
    """``peft.LoraConfig`` whose ``target_modules`` regex matches exactly the intended modules.

    A regex (not a list) is used so that dotted suffixes such as ``to_out.0`` and
    ``ff.linear_in`` match precisely and never hit a container module.
    """
    from peft import LoraConfig

    targets = spec.targets or targets_for(backbone)
    return LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, init_lora_weights=True,
        target_modules=_pattern(tuple(targets)),
    )


def intended_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the ``nn.Linear`` modules (before LoRA injection) that ``targets`` intend."""
    rx = re.compile(_pattern(targets))
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and rx.match(n)]


def missing_lora(model: nn.Module, names: list[str], adapter: str = "student") -> list[str]:
    """Those of ``names`` that are not a peft LoRA layer carrying ``adapter``. Empty = full coverage."""
    from peft.tuners.lora import LoraLayer

    mods = dict(model.named_modules())
    return [n for n in names if not (isinstance(mods.get(n), LoraLayer) and adapter in mods[n].lora_A)]


def student_lora_state_dict(model: nn.Module | dict[str, torch.Tensor], adapter: str = "student") -> dict[str, torch.Tensor]:
    """LoRA tensors of one adapter with diffusers/peft key names (``...lora_A.weight``).

    Works for models with injected adapters (``peft.inject_adapter_in_model``) that have no
    ``peft_config`` attribute: keys ``<module>.lora_A.<adapter>.weight`` become
    ``<module>.lora_A.weight``. Accepts a module or a (gathered) state dict, e.g.
    ``accelerator.get_state_dict(model)`` under FSDP.
    """
    items = model.items() if isinstance(model, dict) else model.named_parameters()
    out: dict[str, torch.Tensor] = {}
    for name, p in items:
        parts = name.split(".")
        if adapter in parts and any(x.startswith("lora_") for x in parts):
            parts.remove(adapter)
            key = ".".join(parts).replace("_fsdp_wrapped_module.", "").replace("_orig_mod.", "")
            out[key] = p.detach().to("cpu", torch.float32).clone()
    if not out:
        raise ValueError(f"model has no LoRA tensors for adapter {adapter!r}")
    return out


def save_lora_for_pipeline(model: nn.Module | dict[str, torch.Tensor], pipeline_cls, directory: str | Path, spec: LoraSpec, backbone: str,
                           adapter: str = "student", is_main_process: bool = True) -> Path:
    """Write the adapter as ``pytorch_lora_weights.safetensors`` readable by ``pipe.load_lora_weights``.

    The rank/alpha/targets are stored as adapter metadata, so diffusers rebuilds the same
    scaling ``alpha / rank`` on load.
    """
    directory = Path(directory)
    sd = student_lora_state_dict(model, adapter)
    targets = sorted({k.split(".lora_")[0] for k in sd})
    meta = {"r": spec.rank, "lora_alpha": spec.alpha, "target_modules": targets, "lora_dropout": 0.0}
    pipeline_cls.save_lora_weights(
        directory, transformer_lora_layers=sd, is_main_process=is_main_process,
        transformer_lora_adapter_metadata=meta,
    )
    return directory
