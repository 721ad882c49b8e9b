"""dopsd_ref's teacher EMA in the kit's EMA adapter signature."""

from __future__ import annotations

from torch import Tensor

from dopsd_ref import ema_update_


def ema(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """In place: ``teacher ← decay·teacher + (1 − decay)·student``."""
    ema_update_(teacher, student, decay)
