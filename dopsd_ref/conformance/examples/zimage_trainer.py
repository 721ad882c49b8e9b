"""A hand-written Z-Image-convention D-OPSD step, as a third-party trainer would write it.

The trainer's own world: the transformer takes ``t = 1 − σ`` and its *negated* output is
the scheduler velocity, so ``x0 = x + (1 − t)·out`` and the Euler step on σ is
``x ← x − (σ_next − σ)·out``. It calls backward once per step (memory flat in K).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def dopsd_step(transformer: Callable[[Tensor, Tensor], Tensor], teacher: Callable[[Tensor, Tensor], Tensor],
               latents: Tensor, sigmas: Tensor, space: str = "x0") -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The trainer's step (this is the code under test, not kit code)."""
    K = len(sigmas)
    sig = [float(s) for s in sigmas] + [0.0]
    x, states, per_step = latents.detach(), [latents.detach()], []
    for k in range(K):
        t = torch.full((x.shape[0],), 1.0 - sig[k], dtype=x.dtype, device=x.device)
        out_s = transformer(x, t)
        with torch.no_grad():
            out_t = teacher(x, t)
        if space == "x0":
            diff = (x + (1 - t.view(-1, 1, 1, 1)) * out_s) - (x + (1 - t.view(-1, 1, 1, 1)) * out_t)
        else:
            diff = out_s - out_t  # v = −out; the sign cancels in the difference
        loss_k = diff.pow(2).flatten(1).mean(1).mean()
        (loss_k / K).backward()
        per_step.append(loss_k.detach())
        x = (x - (sig[k + 1] - sig[k]) * out_s).detach()
        states.append(x)
    return torch.stack(per_step).mean(), per_step, states


# ---- the ~5-line kit adapter -------------------------------------------------------------
def rollout(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Kit adapter: the kit's zimage-convention models are ``(x, t) -> out`` already."""
    return dopsd_step(student, teacher, noise, sigmas, space)
