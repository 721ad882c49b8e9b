"""The tiny random toy DiT that the fine-tuning tests train (no shipped weights needed), and a
probe of an adapter-wrapped model against its base."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from toy_models.finetune.adapters import LocalAdapterModel
from toy_models.models.context import ToyContext
from toy_models.models.dit import ToyDiT, toy_dit_xs
from toy_models.world import vocab as V

# One prompt without a rare token, then one with the rare shape token.
KNOWN_THEN_RARE = ("small red circle on black", f"large blue {V.SHAPE_TOKEN} on white")


def tiny_model() -> ToyDiT:
    """A tiny DiT (seed 0) whose zero-initialised gates are perturbed so that every input matters.

    Every all-zero adaLN or output-convolution parameter is drawn from N(0, 0.05²) instead, so
    the output depends on every input and training moves the model.
    """
    torch.manual_seed(0)
    m = toy_dit_xs()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ("ada" in name or "conv_out" in name) and p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m


class AdapterProbe(NamedTuple):
    """Velocities of one batch over :data:`KNOWN_THEN_RARE`, each [2, 3, 16, 16]."""

    student: Tensor  # the wrapped model (student adapter)
    teacher: Tensor  # the wrapped model's teacher adapter
    base: Tensor  # the unwrapped base model

    def student_gap(self) -> Tensor:
        """max over pixels |student − base| per prompt, [2]."""
        return (self.student - self.base).abs().flatten(1).amax(1)


def probe_random_student(wrapped: LocalAdapterModel, base: ToyDiT) -> AdapterProbe:
    """Draw every student adapter weight from N(0, 1), then run student, teacher and base on the
    same noise x ~ N(0, I), σ ~ U(0, 1) and the prompts of :data:`KNOWN_THEN_RARE` (no grad)."""
    with torch.no_grad():
        for p in wrapped.student_parameters():
            p.normal_()
    x, s = torch.randn(2, 3, 16, 16), torch.rand(2)  # [B, C, H, W], [B]
    ctx = ToyContext(V.tokenize(list(KNOWN_THEN_RARE)))
    with torch.no_grad():
        return AdapterProbe(wrapped(x, s, ctx), wrapped.teacher_forward(x, s, ctx), base(x, s, ctx))
