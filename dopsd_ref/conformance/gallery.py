"""A gallery of D-OPSD implementations with one known slip each (kit adapter signature).

The conformance kit's own evidence that every invariant can fail: each broken implementation
below must fail the invariant named for it in :data:`SLIPS` (and :data:`EMA_SLIPS`), and each
implementation in :data:`CONFORMING` — a correct loop written in a different style — must
pass every invariant. tests/conformance runs them on the golden problems, tests/core on
randomly generated fields.

:func:`rollout` is a hand-written roll-out loss with switchable slips, written in the
convention it is tested in; each public function is one implementation. It is deliberately
independent of dopsd_ref (its own Euler step and loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .harness import EmaFn, RolloutFn

__all__ = ["Slip", "SLIPS", "CONFORMING", "EmaSlip", "EMA_SLIPS", "rollout"]

Model = Callable[..., Tensor]


def rollout(student: Model, teacher: Model, noise: Tensor, sigmas: Tensor, space: str, *,
            convention: str = "sigma", bug: str | None = None,
            leaf_unbind: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """D-OPSD roll-out loss with at most one slip (bug=None is a correct implementation).

    ``leaf_unbind`` feeds the models as the released Z-Image trainer does: the (detached)
    state is marked ``requires_grad_(True)``, split per sample with ``unbind`` and restacked,
    so every model input carries autograd history that ends at the current step's leaf.
    """
    sig = [float(s) for s in sigmas] + [0.0]
    K = len(sigmas)
    x = noise.detach()
    x_teacher = noise.detach()  # used only by bug="teacher_rolled_out"
    states, losses = [x], []

    def velocity(model: Model, xx: Tensor, s: float) -> Tensor:
        b = torch.full((xx.shape[0],), s, dtype=xx.dtype)
        if bug == "negated_velocity":
            return -model(xx, b)  # σ-convention output negated as if it were Z-Image's
        if convention == "zimage":
            t = b if bug == "t_as_sigma" else 1.0 - b  # Z-Image time is t = 1 − σ
            out = model(xx, t)
            return out if bug == "zimage_wrong_sign" else -out  # v = −out
        return model(xx, b)

    for k in range(K):
        if leaf_unbind:  # per-sample latents, as a list-of-latents transformer receives them
            leaf = x if bug == "missing_detach" else x.detach().requires_grad_(True)
            x = torch.stack(leaf.unbind(0))
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
        states.append(x.detach())
    per_step = torch.stack(losses)
    loss = per_step.sum() if bug == "sum_over_steps" else per_step.mean()
    return loss, per_step.detach(), torch.stack(states)


def correct(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The gallery loop without a slip (σ-convention)."""
    return rollout(student, teacher, noise, sigmas, space)


def correct_zimage(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The gallery loop without a slip (Z-Image convention)."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage")


def zimage_detached_leaf_unbind(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Correct (Z-Image convention): each state detached, marked ``requires_grad_(True)`` and
    split with ``unbind`` before the model, as the released Z-Image trainer does."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage", leaf_unbind=True)


def teacher_rolled_out(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The teacher follows its own trajectory and is queried there, not on the student's states."""
    return rollout(student, teacher, noise, sigmas, space, bug="teacher_rolled_out")


def missing_detach(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """States are not detached between steps: backpropagation through the whole roll-out."""
    return rollout(student, teacher, noise, sigmas, space, bug="missing_detach")


def zimage_unbind_missing_detach(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The Z-Image-style loop that splits each state with ``unbind`` but never detaches it:
    backpropagation through the whole roll-out."""
    return rollout(student, teacher, noise, sigmas, space, convention="zimage", bug="missing_detach",
                   leaf_unbind=True)


def negated_velocity(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """σ-convention outputs negated (v := −out) for both roles, as if they were Z-Image outputs."""
    return rollout(student, teacher, noise, sigmas, space, bug="negated_velocity")


def euler_teacher_velocity(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """The Euler step uses the teacher's velocity instead of the student's, so the student is
    graded on the teacher's trajectory."""
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


# ---- the tables ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slip:
    """One gallery implementation, the convention it is written in and the invariant that
    must name it (None: a correct implementation that must pass every invariant)."""

    fn: RolloutFn
    convention: str
    invariant: str | None

    @property
    def name(self) -> str:
        return self.fn.__name__


CONFORMING: tuple[Slip, ...] = (
    Slip(correct, "sigma", None),
    Slip(correct_zimage, "zimage", None),
    Slip(zimage_detached_leaf_unbind, "zimage", None),
)

SLIPS: tuple[Slip, ...] = (
    Slip(teacher_rolled_out, "sigma", "teacher_queried_on_student_states"),
    Slip(missing_detach, "sigma", "no_backprop_across_steps"),
    Slip(zimage_unbind_missing_detach, "zimage", "no_backprop_across_steps"),
    Slip(euler_teacher_velocity, "sigma", "student_velocity_drives_euler_step"),
    Slip(zimage_wrong_sign, "zimage", "output_sign_convention"),
    Slip(negated_velocity, "sigma", "output_sign_convention"),
    Slip(t_as_sigma, "zimage", "model_time_convention"),
    Slip(x0_without_sigma_weight, "sigma", "x0_loss_is_sigma2_weighted_velocity_loss"),
    Slip(teacher_receives_grad, "sigma", "teacher_gets_no_gradient"),
    Slip(sum_over_steps, "sigma", "loss_is_mean_of_steps"),
    Slip(batch_sum, "sigma", "per_sample_batch_mean"),
    Slip(nondeterministic, "sigma", "deterministic"),
    Slip(raises, "sigma", "returns_well_formed"),
)


@dataclass(frozen=True)
class EmaSlip:
    """One broken EMA update and the EMA invariant that must name it."""

    fn: EmaFn
    invariant: str

    @property
    def name(self) -> str:
        return self.fn.__name__


EMA_SLIPS: tuple[EmaSlip, ...] = (
    EmaSlip(ema_wrong_direction, "ema_direction"),
    EmaSlip(ema_moves_student, "ema_direction"),
    EmaSlip(ema_with_graph, "ema_no_grad"),
)
