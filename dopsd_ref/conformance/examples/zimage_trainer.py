"""A hand-written Z-Image-convention D-OPSD step, as a third-party trainer would write it.

The trainer's own world (diffusers' ``ZImageTransformer2DModel`` calling convention): the
transformer takes a *list* of per-sample latents ``(C, 1, H, W)``, the model time
``t = 1 − σ`` and a list of caption features, and returns ``(list of outputs,)``; the
pipeline uses the *negated* output as the velocity, so ``x0 = x + (1 − t)·out`` and the
Euler step on σ is ``x ← x − (σ_next − σ)·out``. Backward once per step (memory flat in K).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def dopsd_step(transformer: Callable[..., Any], teacher: Callable[..., Any], latents: Tensor, sigmas: Tensor,
               student_caps: list[Tensor], teacher_caps: list[Tensor],
               space: str = "x0") -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The trainer's step (this is the code under test, not kit code)."""
    K = len(sigmas)
    sig = [float(s) for s in sigmas] + [0.0]
    x, states, per_step = latents.detach(), [latents.detach()], []
    for k in range(K):
        t = torch.full((x.shape[0],), 1.0 - sig[k], dtype=x.dtype, device=x.device)
        x_list = list(x.unsqueeze(2).unbind(0))  # B × (C, 1, H, W)
        out_s = torch.stack(transformer(x_list, t, student_caps, return_dict=False)[0]).squeeze(2)
        with torch.no_grad():
            out_t = torch.stack(teacher(x_list, t, teacher_caps, return_dict=False)[0]).squeeze(2)
        if space == "x0":
            one_minus_t = (1 - t).view(-1, 1, 1, 1)
            diff = (x + one_minus_t * out_s) - (x + one_minus_t * out_t)
        else:
            diff = out_s - out_t  # v = −out; the sign cancels in the difference
        loss_k = diff.pow(2).flatten(1).mean(1).mean()
        (loss_k / K).backward()
        per_step.append(loss_k.detach())
        x = (x - (sig[k + 1] - sig[k]) * out_s).detach()
        states.append(x)
    return torch.stack(per_step).mean(), per_step, states


# ---- the kit adapter ----------------------------------------------------------------------
class KitTransformer:
    """Stands in for ZImageTransformer2DModel: list-of-latents API around a kit model (x, t) -> out."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.model = model

    def __call__(self, x_list: list[Tensor], t: Tensor, cap_feats: list[Tensor], return_dict: bool = False):
        x = torch.stack([xi.squeeze(1) for xi in x_list])  # B × (C, 1, H, W) -> [B, C, H, W]
        out = self.model(x, t)  # the kit's contexts are baked in: cap_feats are not needed
        return (list(out.unsqueeze(2).unbind(0)),)


def rollout(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Kit adapter: shim the transformer API, pass dummy caption features."""
    caps = [torch.zeros(1, 8)] * noise.shape[0]
    return dopsd_step(KitTransformer(student), KitTransformer(teacher), noise, sigmas, caps, caps, space)
