"""Tiny DiT denoiser with the inductive bias a 2-core CPU needs.

Velocity protocol (σ = 1 noise, σ = 0 data): ``v = model(x [B,3,H,W], sigma [B], ctx)``
predicts ``v = ε − x0`` for ``x_σ = (1 − σ)·x0 + σ·ε``.

Architecture (hourglass DiT):
    c      = SigmaEmbed(σ) + W·pooled_text                       # [B, D]
    h0     = ResBlock_c(Conv3x3(x))                              # [B, C, 16, 16] (skip)
    z      = Patchify2x2(h0) + pos2d                             # [B, 64, D]
    r      = Patchify2x2(ResBlock_0(Conv3x3(ref))) + pos2d + e_ref   # [B, 64, D], tokens route
                                                                 # (no pos2d when ref_pos=False)
    [z; r] = DiTBlock_c([z; r], text) × depth                    # adaLN-Zero self-attn over
                                                                 # latent+ref tokens (2-D RoPE
                                                                 # when rope=True), cross-attn
                                                                 # to text, depthwise-conv MLP
    v      = ConvHead([Unpatchify(FinalLayer_c(z)); h0])          # zero-init last conv

Only the latent tokens' output becomes the velocity (FLUX.2-klein editing branch). With the
encoder route the reference is read by the text encoder instead (Z-Image VLM analogue).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from toy_models.models.context import ToyContext
from toy_models.models.layers import Attention, SigmaEmbed, modulate, rope_2d, sincos_2d
from toy_models.models.text_encoder import ToyTextEncoder
from toy_models.world.vocab import MAX_TOKENS, VOCAB_SIZE


@dataclass(frozen=True)
class ToyDiTConfig:
    img_size: int = 16
    in_channels: int = 3
    stem_channels: int = 32
    patch: int = 2
    hidden: int = 128
    depth: int = 3
    heads: int = 4
    mlp_ratio: float = 2.0
    text_layers: int = 2
    vocab_size: int = VOCAB_SIZE
    max_tokens: int = MAX_TOKENS
    enc_patch: int = 4
    hi_blocks: int = 2  # FiLM ResBlocks at full resolution in the stem
    head_blocks: int = 2  # FiLM ResBlocks at full resolution in the head
    lo_blocks: int = 1  # FiLM ResBlocks at token resolution, before and after the transformer
    ref_pos: bool = True  # reference tokens get the latents' 2-D positions (False: a position-free set)
    rope: bool = False  # 2-D rotary positions in the joint self-attention (latent and ref tokens on one grid)


class ResBlock(nn.Module):
    """Conv residual block with FiLM from c: ``h + Conv(SiLU(GN(Conv(SiLU(GN(h))))·(1+s)+b))``."""

    def __init__(self, ch: int, cond: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(8, ch)
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.n2 = nn.GroupNorm(8, ch)
        self.film = nn.Linear(cond, 2 * ch)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        s, b = self.film(F.silu(c))[:, :, None, None].chunk(2, 1)
        y = self.c1(F.silu(self.n1(h)))
        y = self.c2(F.silu(self.n2(y) * (1 + s) + b))
        return h + y


class DiTBlock(nn.Module):
    """adaLN-Zero block: self-attn over all tokens, cross-attn to text, conv-MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.n1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.n2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.cross = Attention(dim, heads)
        self.n3 = nn.LayerNorm(dim, elementwise_affine=False)
        hid = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hid)
        self.dw = nn.Conv2d(hid, hid, 3, padding=1, groups=hid)
        self.fc2 = nn.Linear(hid, dim)
        self.ada = nn.Linear(dim, 9 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def _mlp(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        g = self.grid
        h = F.gelu(self.fc1(x))  # [B,N,F], N = G·g²
        Fh = h.shape[-1]
        G = N // (g * g)
        h = h.view(B * G, g, g, Fh).permute(0, 3, 1, 2)  # [B·G,F,g,g]
        h = h + self.dw(h)
        h = h.permute(0, 2, 3, 1).reshape(B, N, Fh)
        return self.fc2(F.gelu(h))

    def forward(
        self, x: Tensor, c: Tensor, text: Tensor, text_mask: Tensor, rope: Optional[tuple[Tensor, Tensor]] = None
    ) -> Tensor:
        sa, ca, ga, sx, cx, gx, sm, cm, gm = self.ada(F.silu(c)).chunk(9, -1)
        x = x + ga[:, None] * self.attn(modulate(self.n1(x), sa, ca), rope=rope)
        x = x + gx[:, None] * self.cross(modulate(self.n2(x), sx, cx), kv=text, key_mask=text_mask)
        return x + gm[:, None] * self._mlp(modulate(self.n3(x), sm, cm))


class ToyDiT(nn.Module, PyTorchModelHubMixin, library_name="dopsd-ref", tags=["dopsd-ref", "toy", "diffusion"]):
    """Tiny text-to-image flow-matching DiT with an in-context reference (see module doc)."""

    def __init__(self, config: ToyDiTConfig | dict | None = None) -> None:
        super().__init__()
        if config is None:
            config = ToyDiTConfig()
        elif isinstance(config, dict):
            config = ToyDiTConfig(**config)
        self.config = config
        cfg = config
        D, C, p = cfg.hidden, cfg.stem_channels, cfg.patch
        self.grid = cfg.img_size // p
        self.text = ToyTextEncoder(cfg.vocab_size, cfg.max_tokens, D, cfg.text_layers, cfg.heads, cfg.img_size, cfg.enc_patch)
        self.sigma_embed = SigmaEmbed(D)
        self.pool_proj = nn.Linear(D, D)
        self.conv_in = nn.Conv2d(cfg.in_channels, C, 3, padding=1)
        self.stem = ResBlock(C, D)
        self.stem_more = nn.ModuleList([ResBlock(C, D) for _ in range(cfg.hi_blocks - 1)])
        self.patchify = nn.Conv2d(C, D, p, stride=p)
        self.down = nn.ModuleList([ResBlock(D, D) for _ in range(cfg.lo_blocks)])
        self.up = nn.ModuleList([ResBlock(D, D) for _ in range(cfg.lo_blocks)])
        self.head_res = nn.ModuleList([ResBlock(C, D) for _ in range(cfg.head_blocks)])
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, D), persistent=False)
        cos, sin = rope_2d(self.grid, self.grid, D // cfg.heads)
        self.register_buffer("rope_cos", cos, persistent=False)  # [g², d/2]
        self.register_buffer("rope_sin", sin, persistent=False)
        self.ref_type = nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.heads, cfg.mlp_ratio, self.grid) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False)
        self.final_ada = nn.Linear(D, 2 * D)
        nn.init.zeros_(self.final_ada.weight)
        nn.init.zeros_(self.final_ada.bias)
        self.final = nn.Linear(D, C * p * p)
        self.head = nn.Sequential(nn.Conv2d(2 * C, C, 3, padding=1), nn.GroupNorm(8, C), nn.SiLU())
        self.conv_out = nn.Conv2d(C, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    # -- helpers ------------------------------------------------------------
    def _encode(self, x: Tensor, c: Tensor, pos: bool = True) -> tuple[Tensor, Tensor]:
        """Image → (full-resolution skip features [B,C,H,W], tokens [B,g²,D] (+ 2-D positions if ``pos``))."""
        h0 = self.stem(self.conv_in(x), c)
        for blk in self.stem_more:
            h0 = blk(h0, c)
        h = self.patchify(h0)  # [B,D,g,g]
        for blk in self.down:
            h = blk(h, c)
        tokens = h.flatten(2).transpose(1, 2)  # [B,g²,D]
        return h0, tokens + self.pos if pos else tokens

    def _unpatchify(self, z: Tensor) -> Tensor:
        B, N, _ = z.shape
        p, g, C = self.config.patch, self.grid, self.config.stem_channels
        z = z.view(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5)  # [B,C,g,p,g,p]
        return z.reshape(B, C, g * p, g * p)

    # -- protocol -----------------------------------------------------------
    def forward(self, x: Tensor, sigma: Tensor, context: ToyContext) -> Tensor:
        """Velocity ``v(x_σ, σ, c)`` [B, 3, H, W] for states x [B, 3, H, W] and σ [B] (or scalar)."""
        B = x.shape[0]
        if x.ndim != 4 or x.shape[1:] != (self.config.in_channels, self.config.img_size, self.config.img_size):
            raise ValueError(f"x must be [B, {self.config.in_channels}, {self.config.img_size}, {self.config.img_size}], got {tuple(x.shape)}")
        if context.batch_size != B:
            raise ValueError(f"context batch {context.batch_size} != x batch {B}")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
        use_enc = context.ref is not None and context.route == "encoder"
        text, tmask, pooled = self.text(context.tokens, context.ref if use_enc else None)
        c = self.sigma_embed(sigma) + self.pool_proj(pooled)  # [B,D]
        h0, z = self._encode(x, c)  # [B,C,16,16], [B,64,D]
        n_lat = z.shape[1]
        if context.ref is not None and context.route == "tokens":
            c0 = self.sigma_embed(torch.zeros_like(sigma))
            r = self._encode(context.ref.to(x.dtype), c0, pos=self.config.ref_pos)[1] + self.ref_type
            z = torch.cat([z, r], 1)  # [B,128,D]
        rope = None
        if self.config.rope:  # every block of 64 tokens (latent, then ref) sits on the same grid
            reps = z.shape[1] // n_lat
            rope = (self.rope_cos.repeat(reps, 1).to(z.dtype), self.rope_sin.repeat(reps, 1).to(z.dtype))
        for blk in self.blocks:
            z = blk(z, c, text, tmask, rope)
        z = z[:, :n_lat]
        if len(self.up):
            g = self.grid
            zi = z.transpose(1, 2).reshape(B, -1, g, g)  # [B,D,g,g]
            for blk in self.up:
                zi = blk(zi, c)
            z = zi.flatten(2).transpose(1, 2)
        sh, sc = self.final_ada(F.silu(c)).chunk(2, -1)
        z = self.final(modulate(self.final_norm(z), sh, sc))  # [B,64,C·p²]
        h = self.head(torch.cat([self._unpatchify(z), h0], 1))
        for blk in self.head_res:
            h = blk(h, c)
        return self.conv_out(h)


def load_deepened(model: ToyDiT, source: ToyDiT) -> None:
    """Load a shallower ``source`` into ``model`` (same parameters but ``depth``): the extra
    transformer blocks keep their adaLN-Zero init (gates 0), so each is the identity and
    ``model`` computes exactly ``source``'s function until training moves them (when the
    parameter-free position options ``ref_pos`` / ``rope`` are also equal)."""
    m = model.config
    src_cfg = dataclasses.replace(source.config, depth=m.depth, ref_pos=m.ref_pos, rope=m.rope)
    if src_cfg != model.config or source.config.depth > model.config.depth:
        raise ValueError(f"cannot deepen {source.config} into {model.config}: only depth may grow")
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    new = tuple(f"blocks.{i}." for i in range(source.config.depth, model.config.depth))
    bad = [k for k in missing if not k.startswith(new)] + list(unexpected)
    if bad:
        raise ValueError(f"unexpected parameter mismatch while deepening: {bad[:5]}")
    for i in range(source.config.depth, model.config.depth):
        blk = model.blocks[i]
        if torch.count_nonzero(blk.ada.weight) or torch.count_nonzero(blk.ada.bias):
            raise ValueError(f"block {i} is not adaLN-Zero initialised")


#: The named sizes' configurations (what ``toy_dit_s`` / ``toy_dit_xs`` build before overrides).
TOY_DIT_CONFIGS = {
    "S": ToyDiTConfig(),
    "XS": ToyDiTConfig(hidden=64, depth=2, heads=4, stem_channels=16, text_layers=1),
}


def toy_dit_s(**overrides) -> ToyDiT:
    """Default toy size (~2.2M parameters): hidden 128, 3 transformer blocks, 4 heads, 32 stem channels,
    2 FiLM ResBlocks at 16×16 in stem and head, 1 at 8×8 on each side of the transformer."""
    return ToyDiT(dataclasses.replace(TOY_DIT_CONFIGS["S"], **overrides))


def toy_dit_xs(**overrides) -> ToyDiT:
    """Test size (~0.3M parameters): hidden 64, depth 2."""
    return ToyDiT(dataclasses.replace(TOY_DIT_CONFIGS["XS"], **overrides))


TOY_DIT_SIZES = {"S": toy_dit_s, "XS": toy_dit_xs}
