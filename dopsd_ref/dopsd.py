"""The D-OPSD roll-out loss — the whole method in one function.

One network, two roles. The **student** v_θ(·, ·, c_s) sees the text only and rolls out its
own K-step Euler trajectory from noise; the **teacher** v_θ̄(·, ·, c_t) — EMA weights, text
plus target image — grades every state the student visits::

    x_1 = ε ~ N(0, I)
    for k = 1..K:                        σ_1 = 1 > σ_2 > ... > σ_K > 0, σ_{K+1} = 0
        x    = stopgrad(x)               no backpropagation through time
        u_s  = v_θ (x, σ_k, c_s)         with grad
        u_t  = v_θ̄(x, σ_k, c_t)          no grad; queried on the STUDENT's state
        L_k  = mean((u_s − u_t)²)                        (space="velocity", the paper)
            or mean((x0(x, σ_k, u_s) − x0(x, σ_k, u_t))²)  (space="x0", the released code)
        x    = x + (σ_{k+1} − σ_k)·u_s   Euler step with the STUDENT's velocity
    L = (1/K)·Σ_k L_k

The target image enters only through c_t, so the training states are exactly the states of
the few-step sampler (:func:`dopsd_ref.sampling.euler_sample`). Contexts are bound by the
caller: ``student = lambda x, s: model(x, s, c_s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .checks import check_finite_loss, check_state, check_velocity
from .conventions import VelocityFn, euler_step
from .losses import Space, check_space, dopsd_step_loss
from .sampling import sigma_batch
from .schedules import validate_sigmas

__all__ = ["DOPSDOutput", "dopsd_rollout_loss"]


@dataclass(frozen=True)
class DOPSDOutput:
    """Result of one D-OPSD roll-out.

    Attributes:
        loss: scalar, mean over the K steps of the per-step loss. Differentiable w.r.t. the
            student's parameters, unless ``per_step_backward=True`` (then the gradients are
            already accumulated and ``loss`` is detached).
        per_step: [K] per-step losses, detached.
        states: [K + 1, B, ...] the student's states, detached; ``states[0]`` is the noise
            and ``states[K]`` the final sample.
        student_velocity: [K, B, ...] detached student velocities, if requested.
        teacher_velocity: [K, B, ...] teacher velocities, if requested.
    """

    loss: Tensor
    per_step: Tensor
    states: Tensor
    student_velocity: Tensor | None = None
    teacher_velocity: Tensor | None = None


def _step_weights(step_weights: Sequence[float] | Tensor | None, num_steps: int) -> list[float]:
    if step_weights is None:
        return [1.0] * num_steps
    w = [float(v) for v in (step_weights.tolist() if isinstance(step_weights, Tensor) else step_weights)]
    if len(w) != num_steps:
        raise ValueError(f"step_weights has {len(w)} entries for a {num_steps}-step roll-out")
    if not all(math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
        raise ValueError(f"step_weights must be finite, >= 0 and not all 0, got {w}")
    return w


def dopsd_rollout_loss(
    student: VelocityFn,
    teacher: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    space: Space = "x0",
    *,
    per_step_backward: bool = False,
    grad_scale: float = 1.0,
    return_velocities: bool = False,
    step_weights: Sequence[float] | Tensor | None = None,
) -> DOPSDOutput:
    """Roll the student out on ``sigmas`` from ``noise`` and grade each state with the teacher.

    Args:
        student: ``(x [B, ...], σ [B]) -> v`` in the σ-convention (context already bound).
        teacher: same signature; called under ``torch.no_grad()`` on the student's states.
        noise: the state at σ = 1, [B, ...].
        sigmas: 1-D grid, strictly decreasing, ``sigmas[0] == 1``, all > 0; the last Euler
            step goes from ``sigmas[-1]`` to 0.
        space: "x0" (released code, default) or "velocity" (paper).
        per_step_backward: call ``(grad_scale·L_k/K).backward()`` right after each step, so
            activation memory does not grow with K. Gradients equal those of
            ``(grad_scale·loss).backward()`` with the default single graph, because the
            states are detached between steps.
        grad_scale: factor on the per-step backward (e.g. 1/accumulation steps).
        return_velocities: also return the detached student and teacher velocities.
        step_weights: w_k ≥ 0 per roll-out step (default all 1): ``loss = Σ_k w_k·L_k / K``
            (a teacher-timestep subset when some w_k = 0; the student still takes every
            step, without a graph where w_k = 0). ``per_step`` stays unweighted.

    Returns:
        A :class:`DOPSDOutput`.

    Raises:
        ValueError / TypeError: invalid grid or space, or a model output whose shape, device
            or dtype differs from its input.
        NonFiniteLossError: a per-step loss is NaN or inf (the message names step and σ).
    """
    check_state(noise)
    check_space(space)
    sig = validate_sigmas(sigmas).to(device=noise.device, dtype=noise.dtype)
    sig_next = torch.cat([sig[1:], sig.new_zeros(1)])
    num_steps = sig.shape[0]
    weights = _step_weights(step_weights, num_steps)

    x = noise.detach()
    states, per_step, losses, us, ut = [x], [], [], [], []
    for k in range(num_steps):
        s = sigma_batch(sig[k], x)  # [B]
        w = weights[k]
        with torch.set_grad_enabled(torch.is_grad_enabled() and w != 0.0):
            u_s = check_velocity(student(x, s), x, role="student", step=k, sigma=sig[k])
        with torch.no_grad():
            u_t = check_velocity(teacher(x, s), x, role="teacher", step=k, sigma=sig[k])
        loss_k = dopsd_step_loss(u_s, u_t.detach(), x, s, space)

        if per_step_backward:
            if loss_k.requires_grad:
                (loss_k * (w * grad_scale / num_steps)).backward()
        else:
            losses.append(loss_k * w)
        per_step.append(loss_k.detach())
        if return_velocities:
            us.append(u_s.detach())
            ut.append(u_t.detach())

        # The next state follows the student's own velocity; detach = no BPTT.
        x = euler_step(x, u_s.detach(), sig[k], sig_next[k])
        states.append(x)

    per_step_t = torch.stack(per_step)
    # One host sync per roll-out, not per step; the error still names the first bad step.
    if not torch.isfinite(per_step_t).all():
        k = int((~torch.isfinite(per_step_t)).nonzero()[0])
        check_finite_loss(per_step_t[k], step=k, sigma=sig[k])
    if per_step_backward:
        loss = (per_step_t * per_step_t.new_tensor(weights)).mean()
    else:
        loss = torch.stack(losses).mean()
    return DOPSDOutput(
        loss=loss,
        per_step=per_step_t,
        states=torch.stack(states),
        student_velocity=torch.stack(us) if return_velocities else None,
        teacher_velocity=torch.stack(ut) if return_velocities else None,
    )
