"""A model-agnostic D-OPSD training step (and the SFT step it is compared with).

Models are anything with the signature ``model(x [B, ...], σ [B], context) -> v [B, ...]``;
contexts are opaque objects built by the caller — text-only for the student (as at
inference), text + target image for the teacher. One optimizer step:

    for each micro-batch m = 1..M:      (gradient accumulation)
        roll out the student, grade with the teacher, backward (1/M)·L_m
    clip ||∇θ|| to max_grad_norm; optimizer step; zero grads
    teacher update (EMA θ̄ ← d·θ̄ + (1 − d)·θ), via the caller's ``after_step``

A launcher plugs in through two hooks: ``backward(loss)`` (e.g. ``accelerator.backward``)
and ``clip_grad_norm(params, max_norm) -> norm`` (e.g. ``accelerator.clip_grad_norm_``).
Whatever goes wrong inside a step — a NaN/inf loss or gradient, a bad model output, an
interrupt — no gradient is left behind on the parameters and no parameter is changed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import Tensor

from .checks import NonFiniteLossError
from .curriculum import KSchedule
from .dopsd import dopsd_rollout_loss
from .losses import Space, flow_matching_loss

__all__ = ["Backward", "ClipGradNorm", "apply_gradients", "StepConfig", "MicroBatch", "SFTMicroBatch", "StepResult", "dopsd_train_step", "sft_train_step"]

# model(x, sigma, context) -> velocity
ContextModel = Callable[[Tensor, Tensor, Any], Tensor]
# loss -> None, accumulating gradients (default: loss.backward())
Backward = Callable[[Tensor], None]
# (params, max_norm) -> total norm before clipping (default: torch.nn.utils.clip_grad_norm_);
# None means the launcher does not report it (DeepSpeed clips inside its own step).
ClipGradNorm = Callable[[list[Tensor], float], "Tensor | float | None"]


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
    """One D-OPSD micro-batch: the start noise, the two roles' contexts and optionally its own grid.

    ``sigmas`` overrides the step's grid for this micro-batch (same length K): FLUX.2's σ
    shift depends on the image's token count, so micro-batches of different buckets differ.
    """

    noise: Tensor  # [B, ...] the state at σ = 1
    student_context: Any  # text only, exactly what inference sees
    teacher_context: Any  # text + target image
    sigmas: Tensor | None = None  # [K] this micro-batch's roll-out grid (None: the step's)


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
        reconstruction_loss: mean auxiliary flow-matching loss (unweighted) over micro-batches,
            when a D-OPSD step used one (None otherwise); ``loss`` already includes λ times it.
    """

    loss: float
    per_step: Tensor
    grad_norm: float
    final_states: Tensor | None = None
    reconstruction_loss: float | None = None


def _clear_grads(params: Sequence[Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Drop every accumulated gradient (the optimizer's parameters and ``params``)."""
    optimizer.zero_grad(set_to_none=True)
    for p in params:
        p.grad = None


class _GradTrace:
    """Finds the first roll-out step whose backward made the accumulated gradient non-finite.

    With per-step backward the gradient of roll-out step k is accumulated before step k + 1
    calls the student, so checking ``isfinite(||∇||)`` at each student call (and after the
    roll-out) brackets every step. The checks stay on the device; only a failing step reads
    them back.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = params
        self.flags: list[Tensor] = []
        self.labels: list[str] = []
        self.current: str | None = None

    def _finite(self) -> Tensor | None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        return torch.isfinite(torch.stack([n.float().to(grads[0].device) for n in norms]).sum())

    def mark(self, label: str | None) -> None:
        """Record the gradient state after ``self.current`` ran; ``label`` runs next."""
        if self.current is not None:
            flag = self._finite()
            if flag is not None:
                self.flags.append(flag)
                self.labels.append(self.current)
        self.current = label

    def first_bad(self) -> str | None:
        for flag, label in zip(self.flags, self.labels):
            if not bool(flag):
                return label
        return None


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
    clip_grad_norm: ClipGradNorm | None = None,
    where: Callable[[], str] | None = None,
) -> float:
    """Clip, step the optimizer, zero the grads, then ``after_step()``; returns the grad norm.

    Args:
        clip_grad_norm: ``(params, max_norm) -> norm`` (default ``torch.nn.utils.clip_grad_norm_``);
            a hook returning None reports no norm (the step is applied, NaN is returned).
        where: called only on failure; text locating the non-finite gradient (roll-out step, σ).

    Raises:
        NonFiniteLossError: the gradient norm is NaN/inf (grads are cleared, nothing applied).
    """
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else float("inf")
    clip = clip_grad_norm if clip_grad_norm is not None else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(params, max_norm)
    norm = float("nan") if grad_norm is None else float(grad_norm)
    if grad_norm is not None and not math.isfinite(norm):
        _clear_grads(params, optimizer)
        located = where() if where is not None else ""
        raise NonFiniteLossError(f"gradient norm is {norm} at optimizer step {step}{located}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if after_step is not None:
        after_step()
    return norm


def _check_micro_batches(micro_batches: Sequence[Any], field: str) -> None:
    if not micro_batches:
        raise ValueError("micro_batches is empty: an optimizer step needs at least one micro-batch")
    for m, mb in enumerate(micro_batches):
        x = getattr(mb, field)
        if isinstance(x, Tensor) and (x.ndim == 0 or x.shape[0] == 0):
            raise ValueError(f"micro-batch {m} is empty ({field} has shape {tuple(x.shape)}): nothing to train on")


def dopsd_train_step(
    student: ContextModel,
    teacher: ContextModel,
    micro_batches: Sequence[MicroBatch],
    sigmas: Tensor | KSchedule,
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    config: StepConfig = StepConfig(),
    after_step: Callable[[], None] | None = None,
    step: int | None = None,
    backward: Backward | None = None,
    clip_grad_norm: ClipGradNorm | None = None,
    *,
    reconstruction: Sequence[SFTMicroBatch] | None = None,
    reconstruction_weight: float = 0.0,
) -> StepResult:
    """One D-OPSD optimizer step over ``len(micro_batches)`` accumulated micro-batches.

    With an auxiliary reconstruction loss of weight λ (default 0, as the released code) the
    loss of micro-batch m is::

        L_m = L_D-OPSD,m + λ·L_FM,m,   L_FM = mean((v_θ(x_σ, σ, c_s) − (ε − x0))²),
        x_σ = (1 − σ)·x0 + σ·ε        (x0: the target; see :func:`dopsd_ref.flow_matching_loss`)

    so the gradient is ∇L_D-OPSD + λ·∇L_FM; with λ = 0 the reconstruction micro-batches are
    not evaluated at all (bit-identical to a step without them).

    Args:
        student: ``(x, σ, context) -> v``; its trainable tensors are ``params``.
        teacher: ``(x, σ, context) -> v``; called without grad on the student's states.
        micro_batches: the accumulated micro-batches of this step (none may be empty).
        sigmas: the roll-out grid (see :func:`dopsd_ref.dopsd_rollout_loss`), or a
            :class:`dopsd_ref.KSchedule` read at ``step`` (a curriculum of roll-out lengths K).
        optimizer: any torch optimizer over ``params``.
        params: the trainable tensors (for clipping and the norm).
        config: loss space, gradient strategy, clipping, autocast.
        after_step: called after the optimizer step — the teacher's EMA update.
        step: the global step index, used in error messages.
        backward: ``loss -> None`` for the single-backward strategy (e.g.
            ``accelerator.backward``). The per-step strategy calls ``Tensor.backward`` inside
            the roll-out, which is what ``accelerator.backward`` does without a gradient
            scaler, DeepSpeed or accelerate-side accumulation; a hook with
            ``grad_strategy="per_step"`` is refused rather than silently bypassed.
        clip_grad_norm: ``(params, max_norm) -> norm`` (e.g. ``accelerator.clip_grad_norm_``).
        reconstruction: one flow-matching micro-batch per D-OPSD micro-batch (targets, noise,
            σ, the student's text context), used when ``reconstruction_weight > 0``.
        reconstruction_weight: λ >= 0, finite.

    Raises:
        ValueError: no micro-batch, an empty one, a backward hook with per-step backward, a
            K schedule without ``step``, λ < 0 or not finite, or λ > 0 without one
            reconstruction micro-batch per micro-batch.
        NonFiniteLossError: a NaN/inf loss or gradient; no parameter is changed. For a
            gradient, with per-step backward, the message names the first roll-out step
            (and σ) whose backward made it non-finite.
    """
    _check_micro_batches(micro_batches, "noise")
    if isinstance(sigmas, KSchedule):
        if step is None:
            raise ValueError("sigmas is a K schedule: pass step= (the optimizer step it is read at)")
        sigmas = sigmas.sigmas(step)
    recon_w = _reconstruction_weight(reconstruction, reconstruction_weight, len(micro_batches))
    recon_losses: list[Tensor] = []
    per_step = config.grad_strategy == "per_step"
    if backward is not None and per_step:
        raise ValueError("a backward hook needs grad_strategy='single' (per-step backward calls Tensor.backward "
                         "inside the roll-out)")
    do_backward = backward if backward is not None else Tensor.backward
    params = [p for p in params if p.requires_grad]
    scale = 1.0 / len(micro_batches)
    losses, per_steps, final = [], [], None
    trace = _GradTrace(params) if per_step else None
    grids = [sigmas if mb.sigmas is None else mb.sigmas for mb in micro_batches]
    if len({int(g.numel()) for g in grids}) != 1:
        raise ValueError(f"micro-batch grids differ in length {[int(g.numel()) for g in grids]}: one K per step")
    try:
        for m, mb in enumerate(micro_batches):
            sig_values = grids[m].tolist() if trace is not None else []
            calls = iter(range(len(sig_values)))

            def student_fn(x: Tensor, s: Tensor, mb: MicroBatch = mb, m: int = m, calls=calls,
                           sig_values=sig_values) -> Tensor:
                if trace is not None:
                    k = next(calls, None)
                    trace.mark(None if k is None else f"micro-batch {m}, roll-out step {k} (sigma={sig_values[k]:.6g})")
                return student(x, s, mb.student_context)

            with _autocast(config, mb.noise.device):
                out = dopsd_rollout_loss(
                    student_fn,
                    lambda x, s, mb=mb: teacher(x, s, mb.teacher_context),
                    mb.noise,
                    grids[m],
                    space=config.space,
                    per_step_backward=per_step,
                    grad_scale=scale,
                    step_weights=config.step_weights,
                )
            if trace is not None:
                trace.mark(None)
            recon = None
            if recon_w > 0:  # λ·L_FM on the target, with the student's text context
                rb = reconstruction[m]  # type: ignore[index]
                if trace is not None:
                    trace.mark(f"micro-batch {m}, reconstruction loss")
                with _autocast(config, rb.x0.device):
                    recon = flow_matching_loss(lambda x, s, rb=rb: student(x, s, rb.context), rb.x0, rb.noise, rb.sigma)
                if not torch.isfinite(recon.detach()):
                    raise NonFiniteLossError(f"micro-batch {m}: reconstruction (flow-matching) loss is {recon.item()}")
                if per_step:
                    (recon * (recon_w * scale)).backward()
                    if trace is not None:
                        trace.mark(None)
                recon_losses.append(recon.detach())
            if not per_step:
                do_backward(out.loss * scale if recon is None else (out.loss + recon_w * recon) * scale)
            losses.append(out.loss.detach() if recon is None else out.loss.detach() + recon_w * recon.detach())
            per_steps.append(out.per_step)
            final = out.states[-1]
    except NonFiniteLossError as exc:
        _clear_grads(params, optimizer)
        raise NonFiniteLossError(f"optimizer step {step}: {exc}") from exc
    except BaseException:
        _clear_grads(params, optimizer)
        raise

    def where() -> str:
        if trace is None:
            return " (grad_strategy='single': the roll-out step is not traceable)"
        bad = trace.first_bad()
        return f"; first non-finite after the backward of {bad}" if bad else ""

    try:
        grad_norm = apply_gradients(params, optimizer, config, after_step, step, clip_grad_norm, where)
    except NonFiniteLossError:
        raise
    except BaseException:
        _clear_grads(params, optimizer)
        raise
    return StepResult(
        loss=float(torch.stack(losses).mean()),
        per_step=torch.stack(per_steps).mean(dim=0),
        grad_norm=grad_norm,
        final_states=final,
        reconstruction_loss=float(torch.stack(recon_losses).mean()) if recon_losses else None,
    )


def _reconstruction_weight(reconstruction: Sequence[SFTMicroBatch] | None, weight: float, num_micro: int) -> float:
    """Validate λ and the reconstruction micro-batches; returns λ as a float."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"reconstruction_weight must be a finite number >= 0, got {weight!r}")
    weight = float(weight)
    if weight > 0:
        if reconstruction is None:
            raise ValueError(f"reconstruction_weight = {weight} needs reconstruction micro-batches (targets, noise, sigma)")
        if len(reconstruction) != num_micro:
            raise ValueError(f"{len(reconstruction)} reconstruction micro-batches for {num_micro} D-OPSD micro-batches: "
                             "one per micro-batch is needed")
        _check_micro_batches(reconstruction, "x0")
    return weight


def sft_train_step(
    model: ContextModel,
    micro_batches: Sequence[SFTMicroBatch],
    optimizer: torch.optim.Optimizer,
    params: Iterable[Tensor],
    config: StepConfig = StepConfig(),
    after_step: Callable[[], None] | None = None,
    step: int | None = None,
    backward: Backward | None = None,
    clip_grad_norm: ClipGradNorm | None = None,
) -> StepResult:
    """One flow-matching (SFT) optimizer step — the off-policy baseline, same plumbing and hooks."""
    _check_micro_batches(micro_batches, "x0")
    do_backward = backward if backward is not None else Tensor.backward
    params = [p for p in params if p.requires_grad]
    scale = 1.0 / len(micro_batches)
    losses = []
    try:
        for mb in micro_batches:
            with _autocast(config, mb.x0.device):
                loss = flow_matching_loss(lambda x, s: model(x, s, mb.context), mb.x0, mb.noise, mb.sigma)
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"SFT loss is {loss.item()} at optimizer step {step}")
            do_backward(loss * scale)
            losses.append(loss.detach())
        grad_norm = apply_gradients(params, optimizer, config, after_step, step, clip_grad_norm)
    except BaseException:
        _clear_grads(params, optimizer)
        raise
    return StepResult(loss=float(torch.stack(losses).mean()), per_step=torch.zeros(0), grad_norm=grad_norm)
