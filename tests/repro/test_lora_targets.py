"""LoRA target lists of the released trainers vs ours, counted with peft on the tiny real models.

* Z-Image: the released trainer's explicit list equals our intended list and adapts every
  intended module (attention q/k/v/out, w1, w2, w3).
* FLUX.2-klein: the released list names ``ff.net.0.proj`` / ``ff.net.2``, which do not exist in
  diffusers' ``Flux2Transformer2DModel``, and no single-stream module: peft adapts 8 modules of
  the tiny model (the double-stream attention projections), ours 14.
* ``lora.targets: released`` in a run config selects that list; an unknown preset is an error.
* An EMA teacher adapter in bf16 barely moves at d = 0.9999, one in float32 follows the exact value.
"""

from __future__ import annotations

import pytest
import torch


def _peft_hits(model, targets) -> set[str]:
    """Modules peft adapts for a plain ``target_modules`` list (the released trainers' way)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=list(targets)), model)
    return {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_released_klein_list_hits_8_modules_of_the_tiny_model_ours_14():
    """peft on the released klein list adapts only the 8 double-stream attention projections:
    the FLUX.1 feed-forward names match nothing and no single-stream module is listed."""
    from paper_repro.lora import FLUX2_RELEASED_TARGETS, FLUX2_TARGETS, intended_modules
    from paper_repro.tiny import tiny_flux2_transformer

    names = [n for n, _ in tiny_flux2_transformer().named_modules()]
    for missing in ("ff.net.0.proj", "ff.net.2"):
        assert not any(n == missing or n.endswith("." + missing) for n in names), missing
    assert any(n.endswith(".ff.linear_in") for n in names) and any(n.endswith(".ff.linear_out") for n in names)

    released = _peft_hits(tiny_flux2_transformer(), FLUX2_RELEASED_TARGETS)
    assert len(released) == 8
    assert all(n.startswith("transformer_blocks.0.attn.") for n in released)
    assert not any("single_transformer_blocks" in n or ".ff" in n for n in released)
    ours = intended_modules(tiny_flux2_transformer(), FLUX2_TARGETS)
    assert len(ours) == 14 and released < set(ours)
    # Our regex matching and peft's list matching agree on the released list.
    assert set(intended_modules(tiny_flux2_transformer(), FLUX2_RELEASED_TARGETS)) == released


def test_released_zimage_list_is_the_intended_one_and_covers_w1_w2_w3():
    """The released Z-Image list equals ZIMAGE_TARGETS; peft adapts all 7 projections per block."""
    from paper_repro.lora import ZIMAGE_RELEASED_TARGETS, ZIMAGE_TARGETS, intended_modules, targets_for
    from paper_repro.tiny import tiny_zimage_transformer

    assert ZIMAGE_RELEASED_TARGETS == ZIMAGE_TARGETS == targets_for("zimage", "released")
    hits = _peft_hits(tiny_zimage_transformer(), ZIMAGE_RELEASED_TARGETS)
    assert hits == set(intended_modules(tiny_zimage_transformer(), ZIMAGE_TARGETS))
    assert len(hits) == 7 * 4 and sum(n.endswith(".w1") for n in hits) == 4


def test_released_preset_through_the_config(tmp_path):
    """``lora.targets: released`` gives the trainer the released klein list (8 adapted modules, both
    adapters); an unknown preset names lora.targets."""
    from peft.tuners.lora import LoraLayer

    from paper_repro.config import LoraConfigSpec
    from paper_repro.lora import resolve_targets
    from paper_repro.train import DOPSDTrainer

    from .helpers import make_folder, tiny_config

    cfg = tiny_config("flux2", make_folder(tmp_path / "data", sizes=((32, 32), (32, 32))), tmp_path / "run")
    cfg = type(cfg)(model=cfg.model, data=cfg.data, lora=LoraConfigSpec(rank=4, alpha=8, targets="released"),
                    train=cfg.train, output_dir=cfg.output_dir)
    tr = DOPSDTrainer(cfg)
    adapted = [m for m in tr.unwrapped.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 8 and all({"student", "teacher"} <= set(m.lora_A) for m in adapted)
    with pytest.raises(ValueError, match="lora.targets: unknown preset 'releasd'"):
        resolve_targets("flux2", "releasd")


def test_bf16_ema_teacher_barely_moves_float32_follows():
    """3000 EMA steps at d = 0.9999 on a steadily drifting student (``python -m paper_repro.lora``):
    float32 holds the float64 fraction (0.136) to 1e-4; bf16 holds ~0 of A (updates below its
    resolution) and B stalls well below the exact value."""
    from paper_repro.lora import ema_in_low_precision

    exact = ema_in_low_precision(torch.float64)
    f32 = ema_in_low_precision(torch.float32)
    bf16 = ema_in_low_precision(torch.bfloat16)
    assert abs(exact["A"] - exact["exact"]) < 1e-3 and abs(exact["B"] - exact["exact"]) < 1e-3
    assert abs(f32["A"] - exact["A"]) < 1e-4 and abs(f32["B"] - exact["B"]) < 1e-4
    assert bf16["A"] < 0.01 and bf16["B"] < 0.5 * exact["B"]
