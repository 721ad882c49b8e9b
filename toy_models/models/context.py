"""The toy denoiser's conditioning object.

A :class:`ToyContext` is what ``model(x, sigma, context)`` receives. It holds caption
token ids and, for the in-context teacher, a reference image and the route it takes:

- ``route="tokens"`` (default teacher, FLUX.2-klein editing branch): the reference's patch
  tokens join the denoiser's own self-attention sequence;
- ``route="encoder"`` (Z-Image VLM analogue): the reference's patch tokens are read by the
  text encoder in front of the caption tokens, and the denoiser attends to its output.

The student context is text-only (``ref=None``): exactly what few-step inference uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
from torch import Tensor

from toy_models.world.vocab import tokenize

ROUTES = ("tokens", "encoder")


@dataclass(frozen=True)
class ToyContext:
    """Caption tokens [B, L] (long) and an optional reference image [B, 3, H, W]."""

    tokens: Tensor
    ref: Optional[Tensor] = None
    route: str = "tokens"

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2 or self.tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a LongTensor [B, L], got {self.tokens.dtype} {tuple(self.tokens.shape)}")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {self.route!r}")
        if self.ref is not None:
            if self.ref.ndim != 4 or self.ref.shape[0] != self.tokens.shape[0] or self.ref.shape[1] != 3:
                raise ValueError(
                    f"ref must be [B, 3, H, W] with B = {self.tokens.shape[0]}, got {tuple(self.ref.shape)}"
                )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def has_ref(self) -> bool:
        return self.ref is not None

    def to(self, device: torch.device | str) -> "ToyContext":
        return replace(self, tokens=self.tokens.to(device), ref=None if self.ref is None else self.ref.to(device))

    def __getitem__(self, idx) -> "ToyContext":
        """Select samples (index, slice, or index tensor) along the batch."""
        t = self.tokens[idx]
        r = None if self.ref is None else self.ref[idx]
        if t.ndim == 1:
            t = t[None]
            r = None if r is None else r[None]
        return replace(self, tokens=t, ref=r)

    def repeat(self, n: int) -> "ToyContext":
        """Each sample repeated ``n`` times consecutively (for several seeds per prompt)."""
        return replace(
            self,
            tokens=self.tokens.repeat_interleave(n, 0),
            ref=None if self.ref is None else self.ref.repeat_interleave(n, 0),
        )

    def text_only(self) -> "ToyContext":
        """The student context: same caption, no reference."""
        return replace(self, ref=None, route="tokens")

    @staticmethod
    def cat(contexts: Sequence["ToyContext"]) -> "ToyContext":
        """Concatenate along the batch; all parts must agree on route and on having a ref."""
        if not contexts:
            raise ValueError("nothing to concatenate")
        has = {c.has_ref for c in contexts}
        routes = {c.route for c in contexts}
        if len(has) != 1 or (True in has and len(routes) != 1):
            raise ValueError("cannot concatenate contexts with and without a reference, or of different routes")
        L = max(c.tokens.shape[1] for c in contexts)
        toks = torch.cat([torch.nn.functional.pad(c.tokens, (0, L - c.tokens.shape[1])) for c in contexts])
        ref = torch.cat([c.ref for c in contexts]) if True in has else None
        return ToyContext(toks, ref, contexts[0].route)


def text_context(captions: Sequence[str]) -> ToyContext:
    """Student (text-only) context from captions."""
    return ToyContext(tokenize(captions))


def teacher_context(captions: Sequence[str], refs: Tensor, route: str = "tokens") -> ToyContext:
    """Teacher context: captions + reference images [B, 3, H, W] in [−1, 1]."""
    return ToyContext(tokenize(captions), refs, route)
