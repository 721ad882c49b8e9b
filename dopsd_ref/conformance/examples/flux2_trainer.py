"""A hand-written FLUX.2-convention D-OPSD step, as a third-party trainer would write it.

The trainer's own world: the scheduler holds ``timesteps = 1000·σ``, the transformer takes
``timestep / 1000 = σ`` and returns ``v = ε − x0``; latents are *packed* into tokens
``[B, H·W, C]`` before the transformer. One backward over all K graphs (released-code style).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def pack(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H·W, C] tokens."""
    return x.flatten(2).transpose(1, 2)


def unpack(tok: Tensor, h: int, w: int) -> Tensor:
    """[B, H·W, C] tokens -> [B, C, H, W]."""
    return tok.transpose(1, 2).reshape(tok.shape[0], -1, h, w)


def dopsd_step(transformer: Callable[[Tensor, Tensor], Tensor], teacher: Callable[[Tensor, Tensor], Tensor],
               tokens: Tensor, timesteps: Tensor, space: str = "x0") -> tuple[Tensor, Tensor, Tensor]:
    """The trainer's step on packed tokens with scheduler timesteps in [0, 1000]."""
    ts = torch.cat([timesteps.to(torch.float64), timesteps.new_zeros(1, dtype=torch.float64)])
    x, states, losses = tokens.detach(), [tokens.detach()], []
    for k in range(len(timesteps)):
        sigma = float(ts[k]) / 1000.0
        tt = torch.full((x.shape[0],), sigma, dtype=x.dtype)
        v_s = transformer(x, tt)
        with torch.no_grad():
            v_t = teacher(x, tt)
        w = sigma ** 2 if space == "x0" else 1.0  # x0 = x − σ·v  ⇒  x0 loss = σ²·velocity loss
        losses.append(w * (v_s - v_t).pow(2).mean(dim=(1, 2)).mean())
        x = (x + (float(ts[k + 1]) - float(ts[k])) / 1000.0 * v_s).detach()
        states.append(x)
    per_step = torch.stack(losses)
    return per_step.mean(), per_step.detach(), torch.stack(states)


# ---- the kit adapter ----------------------------------------------------------------------
def rollout(student, teacher, noise, sigmas, space):  # type: ignore[no-untyped-def]
    """Kit adapter: unpack tokens around the kit's models, hand the trainer scheduler timesteps."""
    h, w = noise.shape[-2:]

    def as_transformer(model):  # the kit's model: (x [B,C,H,W], timestep=σ) -> v
        return lambda tokens, timestep: pack(model(unpack(tokens, h, w), timestep=timestep))

    loss, per_step, token_states = dopsd_step(
        as_transformer(student), as_transformer(teacher), pack(noise), sigmas * 1000.0, space)
    states = torch.stack([unpack(x, h, w) for x in token_states])
    return loss, per_step, states
