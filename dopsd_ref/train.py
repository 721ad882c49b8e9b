"""A model-agnostic D-OPSD training step (and the SFT step it is compared with).

Models are anything with the signature ``model(x [B, ...], σ [B], context) -> v [B, ...]``;
contexts are opaque objects built by the caller — text-only for the student (as at
inference), text + target image for the teacher. One optimizer step:

    for each micro-batch m = 1..M:      (gradient accumulation)
        roll out the student, grade with the teacher, backward (1/M)·L_m
    clip ||∇θ|| to max_grad_norm; optimizer step; zero grads
    teacher update (EMA θ̄ ← d·θ̄ + (1 − d)·θ), via the caller's ``after_step``
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor

from .checks import NonFiniteLossError
from .dopsd import dopsd_rollout_loss
from .losses import Space, flow_matching_loss

__all__ = ["apply_gradients", "StepConfig", "MicroBatch", "SFTMicroBatch", "StepResult", "dopsd_train_step", "sft_train_step"]

# model(x, sigma, context) -> velocity
ContextModel = Callable[[Tensor, Tensor, Any], Tensor]


@dataclass(frozen=True)
class StepConfig:
    """Settings of one optimizer step.

    Attributes:
        space: D-OPSD loss space, "x0" (released code) or "velocity" (paper).
        grad_strategy: "per_step" (backward after each roll-out step: activation memory
            flat in K) or "single" (one backward over all K graphs, as the released code).
        max_grad_norm: clip the global gradient norm to this value (None: no clipping, the
            norm is still measured).
        autocast_dtype: e.g. ``torch.bfloat16`` to run forwards under autocast; None: off.
        step_weights: D-OPSD per-step loss weights w_k (None: all 1); see
            :func:`dopsd_ref.dopsd_rollout_loss`.
    """

    space: Space = "x0"
    grad_strategy: Literal["per_step", "single"] = "per_step"
    max_grad_norm: float | None = 1.0
    autocast_dtype: torch.dtype | None = None
    step_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.grad_strategy not in ("per_step", "single"):
            raise ValueError(f"grad_strategy must be 'per_step' or 'single', got {self.grad_strategy!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass
class MicroBatch:
    """One D-OPSD micro-batch: the start noise and the two roles' contexts."""

    noise: Tensor  # [B, ...] the state at σ = 1
    student_context: Any  # text only, exactly what inference sees
    teacher_context: Any  # text + target image


@dataclass
class SFTMicroBatch:
    """One flow-matching micro-batch: targets, noise, noise levels and the text context."""

    x0: Tensor  # [B, ...]
    noise: Tensor  # [B, ...]
    sigma: Tensor  # [B]
    context: Any


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step measured.

    Attributes:
        loss: mean loss over micro-batches (float).
        per_step: [K] mean D-OPSD loss per roll-out step over micro-batches (empty for SFT).
        grad_norm: global gradient norm before clipping.
        final_states: [B, ...] final roll-out samples of the last micro-batch (None for SFT).
    """

    loss: float
    per_step: Tensor
    grad_norm: float
    final_states: Tensor | None = None


def _autocast(config: StepConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=config.autocast_dtype)


def apply_gradients(
    params: list[Tensor],
    optimizer: torch.optim.Optimizer,
    config: StepConfig,
    after_step: Callable[[], None] | None,
    step: int | None = None,
) -> float:
    """Clip, step the optimizer, zero the grads, then ``after_step()``; returns the grad norm.

    Raises:
        NonFiniteLossError: the gradient norm is NaN/inf (grads are zeroed, nothing applied).
    """
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"gradient norm is {grad_norm.item()} at optimizer step {step}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    return float(grad_norm)


def dopsd_train_step(
    student: ContextModel,
    teacher: ContextModel,
    micro_batches: Sequence[MicroBatch],
    sigmas: Tensor,
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    config: StepConfig = StepConfig(),
    after_step: Callable[[], None] | None = None,
    step: int | None = None,
) -> StepResult:
    """One D-OPSD optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    Args:
        student: ``(x, σ, context) -> v``; its trainable tensors are ``params``.
        teacher: ``(x, σ, context) -> v``; called without grad on the student's states.
        micro_batches: the accumulated micro-batches of this step.
        sigmas: the roll-out grid (see :func:`dopsd_ref.dopsd_rollout_loss`).
        optimizer: any torch optimizer over ``params``.
        params: the trainable tensors (for clipping and the norm).
        config: loss space, gradient strategy, clipping, autocast.
        after_step: called after the optimizer step — the teacher's EMA update.
        step: the global step index, used in error messages.

    Raises:
        NonFiniteLossError: a NaN/inf loss or gradient; no parameter is changed.
    """
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    params = [p for p in params if p.requires_grad]
    scale = 1.0 / len(micro_batches)
    losses, per_steps, final = [], [], None
    try:
        for mb in micro_batches:
            with _autocast(config, mb.noise.device):
                out = dopsd_rollout_loss(
                    lambda x, s: student(x, s, mb.student_context),
                    lambda x, s: teacher(x, s, mb.teacher_context),
                    mb.noise,
                    sigmas,
                    space=config.space,
                    per_step_backward=config.grad_strategy == "per_step",
                    grad_scale=scale,
                    step_weights=config.step_weights,
                )
            if config.grad_strategy == "single":
                (out.loss * scale).backward()
            losses.append(out.loss.detach())
            per_steps.append(out.per_step)
            final = out.states[-1]
    except NonFiniteLossError as exc:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"optimizer step {step}: {exc}") from exc
    grad_norm = apply_gradients(params, optimizer, config, after_step, step)
    return StepResult(
        loss=float(torch.stack(losses).mean()),
        per_step=torch.stack(per_steps).mean(dim=0),
        grad_norm=grad_norm,
        final_states=final,
    )


def sft_train_step(
    model: ContextModel,
    micro_batches: Sequence[SFTMicroBatch],
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    config: StepConfig = StepConfig(),
    after_step: Callable[[], None] | None = None,
    step: int | None = None,
) -> StepResult:
    """One flow-matching (SFT) optimizer step — the off-policy baseline, same plumbing."""
    if not micro_batches:
        raise ValueError("micro_batches is empty")
    params = [p for p in params if p.requires_grad]
    scale = 1.0 / len(micro_batches)
    losses = []
    for mb in micro_batches:
        with _autocast(config, mb.x0.device):
            loss = flow_matching_loss(lambda x, s: model(x, s, mb.context), mb.x0, mb.noise, mb.sigma)
        if not torch.isfinite(loss.detach()):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"SFT loss is {loss.item()} at optimizer step {step}")
        (loss * scale).backward()
        losses.append(loss.detach())
    grad_norm = apply_gradients(params, optimizer, config, after_step, step)
    return StepResult(loss=float(torch.stack(losses).mean()), per_step=torch.zeros(0), grad_norm=grad_norm)
