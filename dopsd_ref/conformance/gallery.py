"""Deliberately broken D-OPSD implementations, one known slip each (kit adapter signature).

``rollout(..., bug=...)`` is a hand-written roll-out loss with switchable slips, written in
the convention it is tested in; each public function below is one broken implementation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Model = Callable[..., Tensor]


def rollout(student: Model, teacher: Model, noise: Tensor, sigmas: Tensor, space: str, *,
            convention: str = "sigma", bug: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """D-OPSD roll-out loss with at most one slip (bug=None is a correct implementation)."""
    sig = [float(s) for s in sigmas] + [0.0]
    K = len(sigmas)
    x = noise.detach()
    x_teacher = noise.detach()  # used only by bug="teacher_rolled_out"
    states, losses = [x], []

    def velocity(model: Model, xx: Tensor, s: float) -> Tensor:
        b = torch.full((xx.shape[0],), s, dtype=xx.dtype)
        if convention == "zimage":
            t = b if bug == "t_as_sigma" else 1.0 - b  # Z-Image time is t = 1 − σ
            out = model(xx, t)
            return out if bug == "zimage_wrong_sign" else -out  # v = −out
        return model(xx, b)

    for k in range(K):
        u_s = velocity(student, x, sig[k])
        if bug == "teacher_receives_grad":
            u_t = velocity(teacher, x, sig[k])  # no no_grad, no detach
        elif bug == "teacher_rolled_out":
            with torch.no_grad():
                u_t = velocity(teacher, x_teacher, sig[k])
                x_teacher = x_teacher + (sig[k + 1] - sig[k]) * u_t
        else:
            with torch.no_grad():
                u_t = velocity(teacher, x, sig[k])
        if space == "x0" and bug != "x0_without_sigma_weight":
            diff = (x - sig[k] * u_s) - (x - sig[k] * u_t)
        else:
            diff = u_s - u_t
        per_sample = diff.pow(2).flatten(1).mean(1)
        losses.append(per_sample.sum() if bug == "batch_sum" else per_sample.mean())
        step_v = u_t if bug == "euler_teacher_velocity" else u_s
        x = x + (sig[k + 1] - sig[k]) * step_v
        if bug != "missing_detach":
            x = x.detach()
        states.append(x)
    per_step = torch.stack(losses)
    loss = per_step.sum() if bug == "sum_over_steps" else per_step.mean()
    return loss, per_step.detach(), torch.stack([s.detach() for s in states])


def correct(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The gallery loop without a slip (σ-convention)."""
    return rollout(student, teacher, noise, sigmas, space)


def correct_zimage(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The gallery loop without a slip (Z-Image convention)."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage")


def teacher_rolled_out(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The teacher follows its own trajectory and is queried there, not on the student's states."""
    return rollout(student, teacher, noise, sigmas, space, bug="teacher_rolled_out")


def missing_detach(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """States are not detached between steps: backpropagation through the whole roll-out."""
    return rollout(student, teacher, noise, sigmas, space, bug="missing_detach")


def euler_teacher_velocity(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The Euler step uses the teacher's velocity instead of the student's."""
    return rollout(student, teacher, noise, sigmas, space, bug="euler_teacher_velocity")


def zimage_wrong_sign(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Z-Image output used as the velocity without the minus sign."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage", bug="zimage_wrong_sign")


def t_as_sigma(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Z-Image model called with σ where it expects t = 1 − σ."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage", bug="t_as_sigma")


def x0_without_sigma_weight(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """'x0' loss computed as the plain velocity loss (missing the σ² weight)."""
    return rollout(student, teacher, noise, sigmas, space, bug="x0_without_sigma_weight")


def teacher_receives_grad(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Teacher called with autograd on and its output not detached."""
    return rollout(student, teacher, noise, sigmas, space, bug="teacher_receives_grad")


def sum_over_steps(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Loss summed over the K steps instead of averaged."""
    return rollout(student, teacher, noise, sigmas, space, bug="sum_over_steps")


def batch_sum(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Per-step loss summed over the batch instead of averaged."""
    return rollout(student, teacher, noise, sigmas, space, bug="batch_sum")


_calls = {"n": 0}


def nondeterministic(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Adds fresh noise to the start state on every call (hidden state across calls)."""
    _calls["n"] += 1
    g = torch.Generator().manual_seed(_calls["n"])
    return rollout(student, teacher, noise + 1e-3 * torch.randn(noise.shape, generator=g, dtype=noise.dtype),
                   sigmas, space)


def raises(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Crashes: the kit must report it, not crash itself."""
    raise RuntimeError("boom")


# ---- EMA ------------------------------------------------------------------------------------
@torch.no_grad()
def ema_wrong_direction(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """θ̄ ← (1 − d)·θ̄ + d·θ: decay and 1 − decay swapped."""
    for t, s in zip(teacher, student):
        t.lerp_(s, decay)


@torch.no_grad()
def ema_moves_student(teacher: list[Tensor], student: list[Tensor], decay: float) -> None:
    """The student is pulled toward the teacher instead of the reverse."""
    for t, s in zip(teacher, student):
        s.lerp_(t, 1.0 - decay)


def ema_with_graph(teacher: list[Tensor], student: list[Tensor], decay: float) -> list[Tensor]:
    """Out-of-place update outside no_grad: the new teacher is part of the student's graph."""
    return [decay * t + (1.0 - decay) * s for t, s in zip(teacher, student)]
