"""σ-velocity adapters for diffusers' Z-Image and FLUX.2 transformers.

``dopsd_ref`` speaks one protocol: ``fn(x [B, ...], σ [B]) -> v [B, ...]`` with
``x_σ = (1 − σ)·x0 + σ·ε`` and ``v = ε − x0``. The real models differ:

* **Z-Image** (``ZImageTransformer2DModel``): takes a *list* of per-sample latents
  ``(C, 1, H, W)``, model time ``t = 1 − σ`` and a list of ragged caption features
  ``(L_i, D)``; the pipeline uses ``−output`` as the scheduler velocity. So
  ``v(x, σ) = −stack(transformer([x_i[:, None]], 1 − σ, caps))[:, :, 0]``.
  The state is the pipeline's latent ``(B, C, H, W)`` (no scaling; the VAE scale/shift
  only enters at decode time).
* **FLUX.2** (``Flux2Transformer2DModel``): takes packed tokens ``(B, N, C')`` of the
  2x2-patchified, BN-normalised latents with 4-d position ids ``(t, h, w, l)``, text ids,
  and ``timestep = σ``; its output is ``v`` directly. The state is the pipeline's packed
  latent ``(B, N = h·w, C' = 4·C)``. For the editing-branch teacher, reference-image
  tokens are appended after the latent tokens (with their own ids, time offset 10) and only
  the first N output tokens are the velocity.

Contexts are bound at construction, so the same transformer serves student (text context)
and teacher (multimodal context, teacher LoRA) through two adapter objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dopsd_ref.conventions import (
    flux2_timestep_from_sigma,
    velocity_from_flux2_output,
    velocity_from_zimage_output,
    zimage_time_from_sigma,
)

__all__ = [
    "ZImageVelocity",
    "Flux2Velocity",
    "flux2_latent_ids",
    "flux2_text_ids",
    "flux2_reference_ids",
    "flux2_pack",
    "flux2_unpack",
    "flux2_patchify",
    "flux2_unpatchify",
    "flux2_bn_stats",
    "flux2_encode_reference",
    "flux2_packed_to_pipeline_latents",
]


def _model_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32


def _check_sigma(sigma: Tensor, x: Tensor) -> None:
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must have shape [B]=[{x.shape[0]}], got {tuple(sigma.shape)}")


class ZImageVelocity(nn.Module):
    """σ-velocity view of a ``ZImageTransformer2DModel`` with bound caption features.

    Args:
        transformer: the (possibly LoRA-wrapped) Z-Image transformer.
        cap_feats: one caption-feature tensor ``(L_i, D)`` per sample (ragged, padding
            already stripped, as ``ZImagePipeline.encode_prompt`` returns them).
        patch_size / f_patch_size: patchification used by the transformer (2 / 1).

    Call:
        ``x``: ``(B, C, H, W)`` float latents; ``sigma``: ``(B,)``. Returns ``v`` with
        ``x``'s shape and dtype: ``v = −out`` with ``out = transformer(x, t = 1 − σ)``.
    """

    def __init__(self, transformer: nn.Module, cap_feats: list[Tensor], patch_size: int = 2, f_patch_size: int = 1):
        super().__init__()
        if not isinstance(cap_feats, (list, tuple)) or not all(isinstance(c, Tensor) and c.ndim == 2 for c in cap_feats):
            raise TypeError("cap_feats must be a list of (L_i, D) tensors, one per sample")
        self.transformer = transformer
        self.cap_feats = list(cap_feats)
        self.patch_size = patch_size
        self.f_patch_size = f_patch_size

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"Z-Image state must be (B, C, H, W), got {tuple(x.shape)}")
        _check_sigma(sigma, x)
        if len(self.cap_feats) != x.shape[0]:
            raise ValueError(f"{len(self.cap_feats)} caption features bound, but the batch has {x.shape[0]} samples")
        dtype = _model_dtype(self.transformer)
        t = zimage_time_from_sigma(sigma.to(torch.float32))  # [B], 0 = noise, 1 = clean
        xs = list(x.to(dtype).unsqueeze(2).unbind(0))  # B x (C, 1, H, W)
        out = self.transformer(
            xs, t.to(x.device), [c.to(x.device, dtype) for c in self.cap_feats],
            patch_size=self.patch_size, f_patch_size=self.f_patch_size, return_dict=False,
        )[0]
        out = torch.stack([o for o in out], dim=0).squeeze(2)  # (B, C, H, W)
        return velocity_from_zimage_output(out).to(x.dtype)


# -----------------------------------------------------------------------------
# FLUX.2 packing helpers (same layout as diffusers' Flux2 pipelines)
# -----------------------------------------------------------------------------


def flux2_patchify(latents: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``: 2x2 patches into channels (pipeline layout)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 latents need even H, W, got {(h, w)}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def flux2_unpatchify(latents: Tensor) -> Tensor:
    """Inverse of :func:`flux2_patchify`: ``(B, 4C, h, w) -> (B, C, 2h, 2w)``."""
    b, c4, h, w = latents.shape
    x = latents.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def flux2_pack(latents: Tensor) -> Tensor:
    """``(B, C', h, w) -> (B, h·w, C')`` row-major tokens."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def flux2_unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`flux2_pack` for row-major ids: ``(B, h·w, C') -> (B, C', h, w)``."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens cannot be unpacked to {height}x{width}")
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def flux2_latent_ids(height: int, width: int, device=None) -> Tensor:
    """Position ids ``(h·w, 4)`` = (t=0, row, col, l=0) of the generated image's tokens."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width), torch.arange(1)).to(device)


def flux2_text_ids(seq_len: int, device=None) -> Tensor:
    """Position ids ``(L, 4)`` = (0, 0, 0, l) of the text tokens."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(seq_len)).to(device)


def flux2_reference_ids(sizes: list[tuple[int, int]], scale: int = 10, device=None) -> Tensor:
    """Ids of reference-image tokens: image i gets time coordinate ``scale·(i + 1)``."""
    ids = [
        torch.cartesian_prod(torch.tensor([scale + scale * i]), torch.arange(h), torch.arange(w), torch.arange(1))
        for i, (h, w) in enumerate(sizes)
    ]
    return torch.cat(ids, 0).to(device)


def flux2_bn_stats(vae: nn.Module) -> tuple[Tensor, Tensor]:
    """``(mean, std)`` of the FLUX.2 VAE's latent batch-norm, shaped ``(1, 4C, 1, 1)``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def flux2_encode_reference(vae: nn.Module, images: Tensor) -> tuple[Tensor, int, int]:
    """VAE-encode images in [-1, 1] ``(B, 3, H, W)`` to normalised packed tokens.

    Same steps as ``Flux2KleinPipeline._encode_vae_image``: latent mode (argmax), 2x2
    patchify, batch-norm normalisation, then packing.

    Returns:
        ``(tokens (B, h·w, 4C), h, w)``.
    """
    vae_dtype = _model_dtype(vae)
    posterior = vae.encode(images.to(vae_dtype)).latent_dist
    lat = flux2_patchify(posterior.mode())
    mean, std = flux2_bn_stats(vae)
    lat = (lat - mean.to(lat)) / std.to(lat)
    return flux2_pack(lat), lat.shape[2], lat.shape[3]


def flux2_packed_to_pipeline_latents(tokens: Tensor, height: int, width: int, vae: nn.Module) -> Tensor:
    """Packed state -> what ``Flux2KleinPipeline(..., output_type="latent")`` returns.

    Unpack, undo the batch-norm normalisation, 2x2 unpatchify: ``(B, C, 2h, 2w)``.
    """
    lat = flux2_unpack(tokens, height, width)
    mean, std = flux2_bn_stats(vae)
    return flux2_unpatchify(lat * std.to(lat) + mean.to(lat))


@dataclass(frozen=True)
class Flux2Reference:
    """Reference-image tokens for the editing-branch teacher: ``tokens (B, M, C')``, ``ids (M, 4)``."""

    tokens: Tensor
    ids: Tensor


class Flux2Velocity(nn.Module):
    """σ-velocity view of a ``Flux2Transformer2DModel`` on packed latent tokens.

    Args:
        transformer: the (possibly LoRA-wrapped) FLUX.2 transformer.
        prompt_embeds: ``(B, L, D)`` stacked text-encoder hidden states.
        height / width: latent token grid (``h·w = N``).
        reference: optional reference-image tokens appended after the latent tokens
            (editing-branch teacher); only the first N output tokens are returned.

    Call:
        ``x``: ``(B, N, C')``; ``sigma``: ``(B,)``. Returns ``v = out[:, :N]`` with
        ``out = transformer([x, ref], timestep = σ)``, in ``x``'s dtype.
    """

    def __init__(
        self,
        transformer: nn.Module,
        prompt_embeds: Tensor,
        height: int,
        width: int,
        reference: Flux2Reference | None = None,
    ):
        super().__init__()
        if prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (B, L, D), got {tuple(prompt_embeds.shape)}")
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.height, self.width = int(height), int(width)
        self.reference = reference

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        n = self.height * self.width
        if x.ndim != 3 or x.shape[1] != n:
            raise ValueError(f"FLUX.2 state must be (B, {n}, C') for a {self.height}x{self.width} grid, got {tuple(x.shape)}")
        _check_sigma(sigma, x)
        if self.prompt_embeds.shape[0] != x.shape[0]:
            raise ValueError(f"prompt_embeds has batch {self.prompt_embeds.shape[0]}, state has {x.shape[0]}")
        dtype = _model_dtype(self.transformer)
        dev = x.device
        hidden = x.to(dtype)
        img_ids = flux2_latent_ids(self.height, self.width, dev)
        if self.reference is not None:
            ref = self.reference.tokens.to(dev, dtype)
            if ref.shape[0] != x.shape[0]:
                ref = ref.expand(x.shape[0], -1, -1)
            hidden = torch.cat([hidden, ref], dim=1)
            img_ids = torch.cat([img_ids, self.reference.ids.to(dev)], dim=0)
        emb = self.prompt_embeds.to(dev, dtype)
        out = self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=emb,
            timestep=flux2_timestep_from_sigma(sigma).to(dtype),
            img_ids=img_ids.unsqueeze(0),
            txt_ids=flux2_text_ids(emb.shape[1], dev).unsqueeze(0),
            guidance=None,
            return_dict=False,
        )[0]
        return velocity_from_flux2_output(out[:, :n]).to(x.dtype)
