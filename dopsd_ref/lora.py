"""Student and teacher LoRA adapters on one model, with an EMA on every LoRA tensor.

The released recipe fine-tunes with two peft adapters on the same base weights W:
"student" (trainable) and "teacher" (frozen). Both start identical (B = 0, same A), so
both equal the base model. After each optimizer step, each LoRA tensor follows the EMA::

    A_teacher ← d·A_teacher + (1 − d)·A_student,   B_teacher ← d·B_teacher + (1 − d)·B_student

(on A and B separately, not on the product BA). A forward pass uses one adapter at a time:
``with use_adapter(model, "teacher"): ...``. Works on any ``nn.Module`` peft can target.
peft is imported lazily: the rest of dopsd_ref needs torch only.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .teachers import ema_update_

__all__ = [
    "STUDENT",
    "TEACHER",
    "add_student_teacher_lora",
    "lora_parameters",
    "lora_ema_update_",
    "use_adapter",
    "check_lora_targets",
]

STUDENT = "student"
TEACHER = "teacher"


def _tuner_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def add_student_teacher_lora(model: nn.Module, lora_config: Any, adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Inject the "student" and "teacher" LoRA adapters into ``model`` in place.

    The base weights are frozen, the student adapter is trainable, the teacher adapter is a
    frozen copy of the student's initial tensors, and the student is the active adapter.

    Args:
        model: any module with layers matching ``lora_config.target_modules``.
        lora_config: a ``peft.LoraConfig``.
        adapter_dtype: cast both adapters to this dtype (e.g. ``torch.float32`` over bf16
            base weights: with d = 0.9999 the EMA step (1 − d)·Δ is below bf16 resolution).

    Returns:
        The same ``model``.
    """
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(lora_config, model, adapter_name=STUDENT)
    with warnings.catch_warnings():  # a second adapter is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(lora_config, model, adapter_name=TEACHER)
    student, teacher = lora_parameters(model, STUDENT), lora_parameters(model, TEACHER)
    if adapter_dtype is not None:
        for p in (*student.values(), *teacher.values()):
            p.data = p.data.to(adapter_dtype)
    if not student:
        raise ValueError(
            f"no LoRA layer was created: target_modules={lora_config.target_modules!r} matched no module"
        )
    with torch.no_grad():
        for name, p in student.items():
            teacher[_swap(name, STUDENT, TEACHER)].copy_(p)
    for p in student.values():
        p.requires_grad_(True)
    for p in teacher.values():
        p.requires_grad_(False)
    for layer in _tuner_layers(model):
        layer._active_adapter = [STUDENT]
    return model


def _swap(name: str, old: str, new: str) -> str:
    parts = name.split(".")
    return ".".join(new if p == old else p for p in parts)


def lora_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """All LoRA tensors of one adapter, by parameter name (``...lora_A.<adapter>.weight``)."""
    return {
        n: p
        for n, p in model.named_parameters()
        if adapter in n.split(".") and ("lora_" in n)
    }


@torch.no_grad()
def lora_ema_update_(model: nn.Module, decay: float) -> None:
    """EMA on each LoRA tensor: ``teacher ← d·teacher + (1 − d)·student`` (A and B separately)."""
    student = lora_parameters(model, STUDENT)
    teacher = lora_parameters(model, TEACHER)
    names = sorted(student)
    missing = [n for n in names if _swap(n, STUDENT, TEACHER) not in teacher]
    if missing or len(teacher) != len(student):
        raise ValueError(f"student and teacher adapters differ: e.g. {missing[:3]}")
    ema_update_([teacher[_swap(n, STUDENT, TEACHER)] for n in names], [student[n] for n in names], decay)


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: str) -> Iterator[nn.Module]:
    """Run the model with one adapter active, restoring the previous one afterwards.

    Unlike peft's ``set_adapter``, this never changes ``requires_grad``: the teacher adapter
    stays frozen and the student adapter stays trainable.
    """
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call add_student_teacher_lora first")
    previous = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = [adapter]
        yield model
    finally:
        for layer, prev in zip(layers, previous):
            layer._active_adapter = prev


def check_lora_targets(model: nn.Module, intended: list[str], adapter: str = STUDENT) -> list[str]:
    """Names of modules matching an ``intended`` target that have no LoRA of ``adapter``.

    A target matches a module whose dotted name equals it or ends with ``"." + target``
    (so ``"w1"`` and ``"to_out.0"`` both work, as in peft's ``target_modules``).

    Guards against silent slips in a target list (e.g. a missing comma, ``"w1" "w2"`` →
    ``"w1w2"``, leaves Z-Image's ``w1`` and ``w2`` without LoRA). An empty list means every
    intended module is adapted.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    def matches(name: str) -> bool:
        return any(name == t or name.endswith("." + t) for t in intended)

    return [
        name
        for name, module in model.named_modules()
        if matches(name) and not (isinstance(module, BaseTunerLayer) and adapter in getattr(module, "lora_A", {}))
    ]
