"""Where a fine-tune may change the toy model: rare-token-local LoRA (default) or all of it.

Full-parameter fine-tuning of a tiny model spreads a new concept to every prompt, whatever
the objective, and even a LoRA on all cross-attention layers was not local enough in the
feasibility runs. The default here is **rare-token-local**: LoRA on the cross-attention
key/value projections of every DiT block, applied *only at the positions of the rare
token* (``sks``/``zwx``), plus a learned offset of the rare token's embedding::

    kv(h)_j = W·h_j + b + m_j·(α/r)·B·A·h_j,      m_j = 1 iff token j is a rare token
    e_sks   = E[sks] + δ

A prompt without the rare token is therefore computed exactly as by the base model, for
every method alike, so the comparison between objectives is fair and prior prompts are
untouched by construction. ``scope="prompt_gated"`` adapts self-attention, cross-attention
and the MLP of every block, switched on per prompt (m = 1 for the whole sample iff its prompt
has a rare token). ``scope="lora"`` is the paper's setting: the same attention + MLP targets
with **no gate**, active for every prompt, so prior prompts can change and retention has to be
measured. ``scope="cross_attn"`` drops the mask on the cross-attention k/v (every text
position, the non-local variant), ``scope="full"`` trains every parameter (domain experiment).

Student and teacher live side by side in each adapted layer ("student" trainable,
"teacher" frozen, same initial A, B = 0 and δ = 0, so both start equal to the base); the
teacher follows the student by EMA on each tensor via :func:`dopsd_ref.lora.lora_ema_update_`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Sequence

import torch
from torch import Tensor, nn

from dopsd_ref.lora import STUDENT, TEACHER, lora_ema_update_, lora_parameters
from toy_models.models.context import ToyContext

Scope = Literal["token_kv", "prompt_gated", "cross_attn", "lora"]
SCOPES: tuple[str, ...] = ("token_kv", "prompt_gated", "cross_attn", "lora")
# Linear layers of a DiT block that the prompt-gated and the ungated "lora" scopes adapt
# (self-attn, cross-attn, MLP).
GATED_TARGETS: tuple[str, ...] = ("attn.q", "attn.kv", "attn.proj", "cross.q", "cross.kv", "cross.proj", "fc1", "fc2")

__all__ = ["MaskedLoRALinear", "RareTokenEmbedding", "LocalAdapterModel", "add_local_adapters"]


class MaskedLoRALinear(nn.Module):
    """``y = base(h) + m·(α/r)·(h·Aᵀ)·Bᵀ`` with one (A, B) pair per adapter and a position mask m."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, adapters: Sequence[str] = (STUDENT, TEACHER)) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a0 = torch.empty(rank, base.in_features)
        nn.init.kaiming_uniform_(a0, a=math.sqrt(5))
        self.lora_A = nn.ParameterDict({n: nn.Parameter(a0.clone()) for n in adapters})
        self.lora_B = nn.ParameterDict({n: nn.Parameter(torch.zeros(base.out_features, rank)) for n in adapters})
        self.active = STUDENT
        # [B, L] bool per token position, or [B] bool per sample; set by LocalAdapterModel.
        self.mask: Tensor | None = None

    def forward(self, h: Tensor) -> Tensor:  # h [B, L, in]
        out = self.base(h)
        a, b = self.lora_A[self.active], self.lora_B[self.active]
        delta = (h @ a.T) @ b.T * self.scale  # [B, L, out]
        if self.mask is not None:
            m = self.mask
            if m.ndim == 1:  # per-sample gate
                if m.shape[0] != h.shape[0]:
                    raise ValueError(f"LoRA gate has {m.shape[0]} samples, input has {h.shape[0]}")
                m = m.view(-1, *([1] * (h.ndim - 1)))
            elif m.shape != h.shape[:2]:
                raise ValueError(f"LoRA mask shape {tuple(m.shape)} != token positions {tuple(h.shape[:2])}")
            else:
                m = m[..., None]
            delta = delta * m.to(delta.dtype)
        return out + delta


class RareTokenEmbedding(nn.Module):
    """Token embedding with a learned offset per adapter on the rare tokens: ``E[t] + δ·[t ∈ rare]``."""

    def __init__(self, base: nn.Embedding, rare_ids: Sequence[int], adapters: Sequence[str] = (STUDENT, TEACHER)) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("rare_ids", torch.tensor(list(rare_ids), dtype=torch.long), persistent=False)
        dim = base.embedding_dim
        self.lora_delta = nn.ParameterDict({n: nn.Parameter(torch.zeros(len(rare_ids), dim)) for n in adapters})
        self.active = STUDENT

    def forward(self, tokens: Tensor) -> Tensor:  # [B, L] -> [B, L, D]
        out = self.base(tokens)
        match = tokens[..., None] == self.rare_ids  # [B, L, R]
        return out + match.to(out.dtype) @ self.lora_delta[self.active]


class LocalAdapterModel(nn.Module):
    """A toy DiT with student/teacher local adapters; same ``(x, σ, context) -> v`` protocol."""

    def __init__(self, base: nn.Module, rare_ids: Sequence[int], scope: Scope) -> None:
        super().__init__()
        self.base = base
        self.scope = scope
        self.register_buffer("rare_ids", torch.tensor(list(rare_ids), dtype=torch.long), persistent=False)

    def _lora_layers(self) -> list[MaskedLoRALinear]:
        return [m for m in self.modules() if isinstance(m, MaskedLoRALinear)]

    def _switchable(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (MaskedLoRALinear, RareTokenEmbedding))]

    def text_mask(self, context: ToyContext) -> Tensor:
        """[B, L'] True where the denoiser's text keys come from a rare token."""
        mask = (context.tokens[..., None] == self.rare_ids).any(-1)  # [B, L]
        if context.ref is not None and context.route == "encoder":
            n_img = self.base.text.img_pos.shape[0]
            mask = torch.cat([mask.new_zeros(mask.shape[0], n_img), mask], 1)
        return mask

    def forward(self, x: Tensor, sigma: Tensor, context: ToyContext) -> Tensor:
        if self.scope == "token_kv":
            mask = self.text_mask(context)  # [B, L'] rare-token positions
        elif self.scope == "prompt_gated":
            mask = self.text_mask(context).any(-1)  # [B] prompts that contain a rare token
        else:
            mask = None
        for layer in self._lora_layers():
            layer.mask = mask
        try:
            return self.base(x, sigma, context)
        finally:
            for layer in self._lora_layers():
                layer.mask = None

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator["LocalAdapterModel"]:
        """Run with one adapter ("student" or "teacher") active; requires_grad is untouched."""
        layers = self._switchable()
        previous = [m.active for m in layers]
        try:
            for m in layers:
                m.active = name
            yield self
        finally:
            for m, p in zip(layers, previous):
                m.active = p

    def teacher_forward(self, x: Tensor, sigma: Tensor, context: ToyContext) -> Tensor:
        """The teacher role: teacher adapter, no grad."""
        with self.adapter(TEACHER), torch.no_grad():
            return self(x, sigma, context)

    def student_parameters(self) -> list[nn.Parameter]:
        return list(lora_parameters(self, STUDENT).values())

    def ema_update(self, decay: float) -> None:
        """Teacher adapter ← d·teacher + (1 − d)·student, tensor by tensor."""
        lora_ema_update_(self, decay)

    def adapter_state(self, name: str) -> dict[str, Tensor]:
        """The adapter's tensors under adapter-neutral names (for saving)."""
        return {n.replace(f".{name}", ""): p.detach() for n, p in lora_parameters(self, name).items()}

    def load_adapter_state(self, name: str, state: dict[str, Tensor]) -> None:
        params = {n.replace(f".{name}", ""): p for n, p in lora_parameters(self, name).items()}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for n, p in params.items():
                if p.shape != state[n].shape:
                    raise ValueError(f"adapter tensor {n}: shape {tuple(state[n].shape)} != model's {tuple(p.shape)}")
                p.copy_(state[n])


def add_local_adapters(
    model: nn.Module, rare_ids: Sequence[int], rank: int = 4, alpha: float = 4.0,
    scope: Scope = "token_kv", train_embedding: bool = True,
) -> LocalAdapterModel:
    """Freeze ``model`` and add student/teacher adapters on every DiT block's cross-attention
    key/value projection (and on the rare tokens' embedding).

    Args:
        model: a :class:`toy_models.models.dit.ToyDiT`.
        rare_ids: token ids whose positions the adapters act on (``scope="token_kv"``).
        rank, alpha: LoRA rank r and scale α (the update is (α/r)·B·A).
        scope: "token_kv" (rare-token positions only), "cross_attn" (every text position),
            "prompt_gated" (attention + MLP, only for prompts with a rare token) or "lora"
            (attention + MLP, ungated: active for every prompt).
        train_embedding: also learn an embedding offset δ for the rare tokens.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    model.requires_grad_(False)
    targets = GATED_TARGETS if scope in ("prompt_gated", "lora") else ("cross.kv",)
    for block in model.blocks:
        for name in targets:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, MaskedLoRALinear(getattr(parent, attr), rank, alpha))
    if train_embedding:
        model.text.tok = RareTokenEmbedding(model.text.tok, rare_ids)
    device = next(model.parameters()).device
    wrapped = LocalAdapterModel(model, rare_ids, scope).to(device)  # new adapters/buffers join the model's device
    wrapped.requires_grad_(False)
    for p in lora_parameters(wrapped, STUDENT).values():
        p.requires_grad_(True)
    return wrapped
