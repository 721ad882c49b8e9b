"""Small building blocks shared by the toy denoiser and text encoder."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of positions [N] → [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=pos.device) / half)
    ang = pos.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)


def sincos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos positional embedding [h·w, dim]: half the channels encode the row,
    half the column (row-major token order)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2, 100.0), sincos_1d(xs.flatten(), dim // 2, 100.0)], -1)


def rope_angles(ys: Tensor, xs: Tensor, head_dim: int, max_period: float = 100.0) -> tuple[Tensor, Tensor]:
    """Axial 2-D rotary angles for tokens at rows ys [N] and columns xs [N] → (cos, sin), each [N, head_dim/2].

    Channel pair (i, i + head_dim/2) of a head is rotated by angle θ_i(y, x): the first half
    of the pairs by ``y·ω_j``, the second half by ``x·ω_j``, ``ω_j = max_period^(−j/(head_dim/4))``.
    A query at position p and a key at position r then score ``q̃ᵀ R(r − p) k̃``: only the
    relative position enters (RoFormer, Su et al. 2021).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, dtype=torch.float32) / quarter)
    ang = torch.cat([ys.float()[:, None] * freqs, xs.float()[:, None] * freqs], -1)  # [N, head_dim/2]
    return torch.cos(ang), torch.sin(ang)


def rope_2d(h: int, w: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """:func:`rope_angles` of a row-major h×w token grid (the order of :func:`sincos_2d`)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return rope_angles(ys.flatten(), xs.flatten(), head_dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x [B, heads, N, d] by the angles of (cos, sin) [N, d/2]."""
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class SigmaEmbed(nn.Module):
    """σ ∈ [0, 1] → sinusoidal(1000·σ) → MLP → [B, dim]."""

    def __init__(self, dim: int, freq_dim: int = 128) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(sincos_1d(sigma * 1000.0, self.freq_dim))


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``kv`` is None.

    ``key_mask`` [B, Lk] bool, True = may be attended to. ``rope`` = (cos, sin) [N, d/2] rotates
    queries and keys (self-attention only, :func:`rope_2d`).
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: Tensor, kv: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
        rope: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        B, N, D = x.shape
        src = x if kv is None else kv
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)  # [B,h,N,d]
        k, v = self.kv(src).view(B, src.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)  # 2×[B,h,Lk,d]
        if rope is not None:
            if kv is not None:
                raise ValueError("rope applies to self-attention only")
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (self-attention + GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.n1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim)
        hid = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hid), nn.GELU(), nn.Linear(hid, dim))

    def forward(self, x: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.n1(x), key_mask=key_mask)
        return x + self.mlp(self.n2(x))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x·(1 + scale) + shift`` with per-sample [B, D] shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]
