"""Tiny text encoder: token embedding + small transformer (+ an optional vision embedder).

Text route: ``h = T(E_tok[y] + P)`` over the caption tokens.
Encoder route (Z-Image VLM analogue): the *same* transformer T reads
``[image patch tokens from a small vision embedder] + [caption tokens]``, so the language
transformer doubles as the multimodal encoder, as Z-Image's teacher does with Qwen3-VL.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from toy_models.models.layers import EncoderLayer, sincos_2d


class ToyTextEncoder(nn.Module):
    """Returns ``(h [B, L', D], key_mask [B, L'] True = real token, pooled [B, D])``."""

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, layers: int, heads: int,
                 img_size: int = 16, img_patch: int = 4) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        self.vision = nn.Conv2d(3, dim, img_patch, stride=img_patch)  # [B,D,4,4]
        g = img_size // img_patch
        self.register_buffer("img_pos", sincos_2d(g, g, dim), persistent=False)
        self.img_type = nn.Parameter(torch.zeros(dim))
        self.layers = nn.ModuleList([EncoderLayer(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: Tensor, image: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        B, L = tokens.shape
        h = self.tok(tokens) + self.pos[:L]  # [B,L,D]
        mask = tokens != 0  # [B,L]
        if image is not None:
            im = self.vision(image).flatten(2).transpose(1, 2) + self.img_pos + self.img_type  # [B,16,D]
            h = torch.cat([im, h], 1)
            mask = torch.cat([torch.ones(B, im.shape[1], dtype=torch.bool, device=tokens.device), mask], 1)
        for layer in self.layers:
            h = layer(h, key_mask=mask)
        h = self.norm(h)
        m = mask.float()[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # [B,D]
        return h, mask, pooled
