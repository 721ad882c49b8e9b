"""The teacher's weights θ̄: an EMA of the student (default), the frozen original, or the student.

After every optimizer step the EMA teacher moves toward the student::

    θ̄ ← d·θ̄ + (1 − d)·θ

d = 1 keeps the original weights ("frozen"); d = 0 copies the student ("live"), which the
paper reports collapses: the student regresses onto a moving copy of itself.
For LoRA fine-tuning the same update is applied to each LoRA tensor (see :mod:`dopsd_ref.lora`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import Tensor, nn

__all__ = ["ema_update_", "TeacherConfig", "Teacher", "make_teacher", "LiveTeacherWarning"]


class LiveTeacherWarning(UserWarning):
    """The teacher is the live student; allowed for ablations, known to collapse."""


@torch.no_grad()
def ema_update_(
    teacher_params: Iterable[Tensor], student_params: Iterable[Tensor], decay: float
) -> None:
    """In place: ``teacher ← decay·teacher + (1 − decay)·student`` for each tensor pair, no grad.

    Args:
        teacher_params: the teacher's tensors (modified in place).
        student_params: the student's tensors, same order, shapes and count.
        decay: d in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student.

    Raises:
        ValueError: decay outside [0, 1], a count or shape mismatch.
    """
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay!r}")
    t_list, s_list = list(teacher_params), list(student_params)
    if len(t_list) != len(s_list):
        raise ValueError(f"teacher has {len(t_list)} tensors but student has {len(s_list)}")
    for i, (t, s) in enumerate(zip(t_list, s_list)):
        if t.shape != s.shape:
            raise ValueError(f"tensor {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t is s:
            continue  # a live teacher shares its tensors with the student
        if decay == 1.0:
            continue
        if decay == 0.0:
            t.copy_(s)
        else:
            t.lerp_(s.to(dtype=t.dtype, device=t.device), 1.0 - decay)


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher's weights follow the student.

    Attributes:
        mode: "ema" (θ̄ ← d·θ̄ + (1−d)·θ, default), "frozen" (the initial weights) or "live"
            (θ̄ = θ; for ablations only — it collapses).
        decay: the EMA decay d, used by mode "ema" only.
    """

    mode: Literal["ema", "frozen", "live"] = "ema"
    decay: float = 0.9999

    def __post_init__(self) -> None:
        if self.mode not in ("ema", "frozen", "live"):
            raise ValueError(f"teacher mode must be 'ema', 'frozen' or 'live', got {self.mode!r}")
        if not 0.0 <= float(self.decay) <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {self.decay!r}")

    @property
    def effective_decay(self) -> float:
        """The EMA decay this mode amounts to: ema → d, frozen → 1, live → 0."""
        return {"ema": float(self.decay), "frozen": 1.0, "live": 0.0}[self.mode]


class Teacher:
    """Full-parameter teacher: a frozen copy of the student (or the student itself, "live").

    ``teacher.module`` is what to call for teacher velocities; ``teacher.update(student)``
    is called after each optimizer step.
    """

    def __init__(self, student: nn.Module, config: TeacherConfig = TeacherConfig()) -> None:
        self.config = config
        if config.mode == "live":
            warnings.warn(
                "teacher mode 'live' uses the student as its own teacher: allowed for ablations, "
                "but D-OPSD collapses without a slowly moving teacher",
                LiveTeacherWarning,
                stacklevel=2,
            )
            self.module = student
        else:
            self.module = copy.deepcopy(student)
            self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Apply ``θ̄ ← d·θ̄ + (1 − d)·θ`` (no-op for "frozen" and "live")."""
        if self.config.mode != "ema":
            return
        t_params = list(self.module.parameters())
        s_params = list(student.parameters())
        ema_update_(t_params, s_params, self.config.decay)
        for tb, sb in zip(self.module.buffers(), student.buffers()):
            tb.copy_(sb)  # buffers (e.g. running stats) follow the student exactly

    def state_dict(self) -> dict[str, Tensor]:
        """The teacher's tensors, for checkpoints (empty for "live": it is the student)."""
        return {} if self.config.mode == "live" else self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.config.mode != "live":
            self.module.load_state_dict(state)


def make_teacher(student: nn.Module, mode: str = "ema", decay: float = 0.9999) -> Teacher:
    """Build a :class:`Teacher` for ``student``: ``make_teacher(model, "ema", 0.9999)``."""
    return Teacher(student, TeacherConfig(mode=mode, decay=decay))  # type: ignore[arg-type]
