"""Input checks shared by the roll-out, the sampler and the losses.

Nothing is silently broadcast: a model output must have exactly the shape, device and
(outside autocast) dtype of the state it was given, and a loss must be finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NonFiniteLossError", "check_velocity", "check_finite_loss", "check_state"]


class NonFiniteLossError(FloatingPointError):
    """A loss (or a model output) became NaN or inf; the message names the step and σ."""


def check_state(x: Tensor, name: str = "noise") -> None:
    """A roll-out state must be a floating tensor with a batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape [B, ...] with at least 2 dims, got {tuple(x.shape)}")


def check_velocity(v: Tensor, x: Tensor, role: str, step: int, sigma: Tensor | float) -> Tensor:
    """Check a model output against its input state and return it in the state's dtype.

    Under autocast a lower-precision output is accepted and cast up to ``x.dtype``; outside
    autocast the dtypes must match.

    Raises:
        ValueError: shape mismatch (never broadcast) or a different device.
        TypeError: a non-tensor or a dtype mismatch outside autocast.
    """
    where = f"{role} at step {step} (sigma={float(sigma):.6g})"
    if not isinstance(v, Tensor):
        raise TypeError(f"{where} returned {type(v).__name__}, expected a Tensor like x")
    if v.shape != x.shape:
        raise ValueError(
            f"{where} returned shape {tuple(v.shape)}, expected the input's shape {tuple(x.shape)}"
        )
    if v.device != x.device:
        raise ValueError(f"{where} returned a tensor on device {v.device}, but x is on device {x.device}")
    if v.dtype != x.dtype:
        if torch.is_autocast_enabled(x.device.type) and v.is_floating_point():
            v = v.to(x.dtype)
        else:
            raise TypeError(f"{where} returned dtype {v.dtype}, but x has dtype {x.dtype}")
    return v


def check_finite_loss(loss: Tensor, step: int, sigma: Tensor | float, what: str = "D-OPSD loss") -> None:
    """Raise :class:`NonFiniteLossError` naming the step and σ if ``loss`` is NaN or inf."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"{what} is {loss.detach().float().item()} at step {step} (sigma={float(sigma):.6g})"
        )
