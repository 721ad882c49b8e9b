"""LoRA targets per backbone, coverage checks and pipeline-format export.

The released recipe: rank 64 / alpha 128 on attention q/k/v/out and the feed-forward.

* **Z-Image**: the released trainer passes an explicit list, ``to_q, to_k, to_v, to_out.0, w1,
  w2, w3`` — the same as :data:`ZIMAGE_TARGETS`, so every SwiGLU projection gets LoRA. An
  unused default list in the released EMA utilities once read ``[..., "w1" "w2", "w3"]``:
  Python joins the adjacent literals into ``"w1w2"``, which matches no module, so that list
  would have adapted ``w3`` only (fixed upstream on 2026-05-13; the training runs never used
  it). :data:`ZIMAGE_TARGETS_MISSING_COMMA` keeps that literal as the regression fixture for
  :func:`missing_lora`, which checks that every intended module really has an adapter.
* **FLUX.2-klein**: the released list names FLUX.1's feed-forward modules ``ff.net.0.proj`` /
  ``ff.net.2``, which do not exist in diffusers' ``Flux2Transformer2DModel`` (its feed-forward
  is ``ff.linear_in`` / ``ff.linear_out``), and no single-stream module, so only the
  double-stream attention projections are adapted: 8 modules of the tiny model against 14 of
  :data:`FLUX2_TARGETS` (``tests/repro/test_lora_targets.py`` counts them with peft itself).
  :data:`FLUX2_RELEASED_TARGETS` offers that list to reproduce the released runs
  (``lora.targets: released`` in a run config); the default adapts the feed-forwards and the
  single-stream blocks as the recipe intends.

Exported LoRA weights use diffusers' format (``transformer.<module>.lora_A.weight`` etc.,
plus alpha/rank metadata) so that ``pipe.load_lora_weights(path)`` reads them.

bf16 note: :func:`ema_in_low_precision` measures why the EMA teacher adapter is kept in
float32 (``python -m paper_repro.lora``).
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
    "ZIMAGE_RELEASED_TARGETS",
    "ZIMAGE_TARGETS_MISSING_COMMA",
    "FLUX2_TARGETS",
    "FLUX2_RELEASED_TARGETS",
    "TARGET_PRESETS",
    "targets_for",
    "resolve_targets",
    "ema_in_low_precision",
    "make_lora_config",
    "intended_modules",
    "missing_lora",
    "student_lora_state_dict",
    "save_lora_for_pipeline",
]

# Intended: attention q/k/v/out and all three SwiGLU projections (the released trainer's explicit list too).
ZIMAGE_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
ZIMAGE_RELEASED_TARGETS: tuple[str, ...] = ZIMAGE_TARGETS
# Regression fixture: a list with the missing comma, "w1" "w2" -> "w1w2" (matches nothing).
ZIMAGE_TARGETS_MISSING_COMMA: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "w1" "w2", "w3")  # noqa: ISC001
# FLUX.2: double-stream image/text attention, fused single-stream qkv+mlp, both FFNs.
FLUX2_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "attn.to_qkv_mlp_proj", "single_transformer_blocks.*.attn.to_out",
)
# The released klein list: double-stream attention plus FLUX.1-style feed-forward names that
# Flux2Transformer2DModel does not have (they match nothing), no single-stream modules.
FLUX2_RELEASED_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2",
)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (released recipe: rank 64, alpha 128, no dropout)."""

    rank: int = 64
    alpha: float = 128.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None  # None: the backbone's intended list (see resolve_targets)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")


TARGET_PRESETS: tuple[str, ...] = ("intended", "released")


def targets_for(backbone: str, preset: str = "intended") -> tuple[str, ...]:
    """Target suffixes for ``backbone`` ("zimage" | "flux2"): the ``"intended"`` list (default)
    or the released trainer's (``"released"``; for Z-Image the two are equal)."""
    if preset not in TARGET_PRESETS:
        raise ValueError(f"lora.targets: unknown preset {preset!r}; presets: {TARGET_PRESETS} (or a list of names)")
    if backbone == "zimage":
        return ZIMAGE_TARGETS if preset == "intended" else ZIMAGE_RELEASED_TARGETS
    if backbone == "flux2":
        return FLUX2_TARGETS if preset == "intended" else FLUX2_RELEASED_TARGETS
    raise ValueError(f"unknown backbone {backbone!r}; expected 'zimage' or 'flux2'")


def resolve_targets(backbone: str, targets: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``lora.targets`` of a run config → target suffixes: None (intended), a preset name, or a list."""
    if targets is None:
        return targets_for(backbone)
    if isinstance(targets, str):
        return targets_for(backbone, targets)
    return tuple(targets)


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

    targets = resolve_targets(backbone, spec.targets or None)
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


def ema_in_low_precision(dtype: torch.dtype, steps: int = 3000, decay: float = 0.9999, drift: float = 1e-2,
                         seed: int = 0) -> dict[str, float]:
    """How much of a steadily drifting student an EMA teacher kept in ``dtype`` holds.

    Runs ``steps`` updates ``θ̄ ← d·θ̄ + (1 − d)·θ`` (:func:`dopsd_ref.ema_update_`, in place in
    ``dtype``) while the student moves linearly by ``drift`` per entry over the run, on two
    LoRA-like tensors: ``A`` (teacher = student at the start, entries of kaiming-uniform size
    ~0.1) and ``B`` (both start at 0). In exact arithmetic the teacher then holds about
    ``1 − (1 − d^N)/(N·(1 − d))`` of the drift (the continuous-time value, 0.136 for N = 3000,
    d = 0.9999).

    Returns:
        ``{"A": f_A, "B": f_B, "exact": ...}``: the fraction ``mean(θ̄_N − θ̄_0) / drift`` held in
        ``dtype`` for each tensor, and the continuous-time value above.
    """
    from dopsd_ref import ema_update_

    g = torch.Generator().manual_seed(seed)
    a0 = (torch.rand(4096, generator=g, dtype=torch.float64) * 2 - 1) / 8  # [4096], |a| <= 0.125
    out: dict[str, float] = {}
    for name, start in (("A", a0), ("B", torch.zeros_like(a0))):
        teacher = start.to(dtype).clone()
        first = teacher.double().clone()
        for i in range(1, steps + 1):
            student = (start + drift * i / steps).to(dtype)
            ema_update_([teacher], [student], decay)
        out[name] = float((teacher.double() - first).mean() / drift)
    out["exact"] = 1.0 - (1.0 - decay**steps) / (steps * (1.0 - decay))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m paper_repro.lora``: the EMA-precision measurement of the module doc."""
    import argparse

    ap = argparse.ArgumentParser(description="fraction of the student's drift an EMA teacher holds, by dtype")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--decay", type=float, default=0.9999)
    args = ap.parse_args(argv)
    print(f"EMA d = {args.decay}, {args.steps} steps, student drifting linearly by 1e-2 per entry; "
          "fraction of that drift the teacher holds:")
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        r = ema_in_low_precision(dt, args.steps, args.decay)
        print(f"  teacher in {str(dt).replace('torch.', ''):>8}: A {r['A']:.4f}, B {r['B']:.4f}")
    print(f"  continuous-time value: {r['exact']:.4f}")


if __name__ == "__main__":
    main()
