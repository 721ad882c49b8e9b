"""Student and teacher contexts for the two backbones.

* Student (both backbones): exactly the inference text path of the pipeline.
  Z-Image: Qwen3 chat template, hidden layer −2, padding stripped (a ragged list).
  FLUX.2-klein: Qwen3 chat template (thinking off), hidden layers (9, 18, 27) stacked.
* Teacher, Z-Image-Turbo: the **hybrid VLM** of the released code — a Qwen3-VL model whose
  language model is overwritten, by matching key and shape, with Z-Image's Qwen3 text
  encoder. User turn = [image, text], no system prompt, generation prompt appended, hidden
  layer −2, padding stripped, ≤ 1024 tokens. So the teacher's features live in the same
  space as the student's, plus what the vision tower injects.
* Teacher, FLUX.2-klein: the **editing branch** — the same text path, and the VAE-encoded
  target appended as reference-image tokens (see :class:`paper_repro.adapters.Flux2Velocity`).

Student and teacher get the same prompt string (an optional teacher instruction can be
appended for the FLUX.2 editing branch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "zimage_text_context",
    "flux2_text_context",
    "MatchReport",
    "PartialMatchError",
    "load_lm_from_text_encoder",
    "HybridVLMContext",
]


@torch.no_grad()
def zimage_text_context(text_encoder: nn.Module, tokenizer, prompts: Sequence[str], max_sequence_length: int = 512,
                        device: torch.device | None = None) -> list[Tensor]:
    """Z-Image student context: ``hidden_states[-2]`` of the Qwen3 encoder, padding stripped.

    Same steps as ``ZImagePipeline._encode_prompt`` (chat template with ``enable_thinking``,
    ``max_length`` padding, boolean attention mask).

    Returns:
        One ``(L_i, D)`` tensor per prompt (L_i = number of real tokens).
    """
    device = device or next(text_encoder.parameters()).device
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                      enable_thinking=True)
        for p in prompts
    ]
    enc = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt")
    ids = enc.input_ids.to(device)
    mask = enc.attention_mask.to(device).bool()
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [hidden[i][mask[i]] for i in range(hidden.shape[0])]


@torch.no_grad()
def flux2_text_context(text_encoder: nn.Module, tokenizer, prompts: Sequence[str],
                       layers: tuple[int, ...] = (9, 18, 27), max_sequence_length: int = 512,
                       device: torch.device | None = None) -> Tensor:
    """FLUX.2-klein student context ``(B, L, len(layers)·D)``: the pipeline's own text path."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=text_encoder, tokenizer=tokenizer, prompt=list(prompts), device=device,
        max_sequence_length=max_sequence_length, hidden_states_layers=tuple(layers),
    )


# -----------------------------------------------------------------------------
# Hybrid VLM (Z-Image-Turbo teacher)
# -----------------------------------------------------------------------------


class PartialMatchError(RuntimeError):
    """The Qwen3 text encoder does not cover the VLM's language model well enough."""


@dataclass(frozen=True)
class MatchReport:
    """Outcome of loading a Qwen3 text encoder into a Qwen3-VL language model.

    Attributes:
        matched: VLM keys overwritten (same key after renaming and same shape).
        shape_mismatched: keys present on both sides with different shapes (not loaded).
        missing_in_source: VLM language-model keys the text encoder lacks.
        unused_source: text-encoder keys with no VLM counterpart.
        total_target: number of VLM language-model keys.
    """

    matched: tuple[str, ...]
    shape_mismatched: tuple[str, ...]
    missing_in_source: tuple[str, ...]
    unused_source: tuple[str, ...]
    total_target: int

    @property
    def fraction(self) -> float:
        """Matched fraction of the VLM language-model keys."""
        return len(self.matched) / max(self.total_target, 1)

    def summary(self) -> str:
        return (
            f"hybrid VLM: {len(self.matched)}/{self.total_target} language-model keys loaded from the text encoder "
            f"({self.fraction:.1%}); shape mismatches: {len(self.shape_mismatched)}, "
            f"missing in text encoder: {len(self.missing_in_source)}, unused text-encoder keys: {len(self.unused_source)}"
        )


# Language-model keys of the VLM that a Qwen3 text encoder is not expected to provide.
_OPTIONAL_TARGETS = ("lm_head.weight",)


def _vlm_key(src_key: str) -> str:
    """Qwen3Model / Qwen3ForCausalLM key -> Qwen3VLForConditionalGeneration key."""
    if src_key.startswith("lm_head."):
        return src_key
    if src_key.startswith("model."):
        src_key = src_key[len("model."):]
    return "model.language_model." + src_key


def load_lm_from_text_encoder(vlm: nn.Module, text_encoder: nn.Module, min_match: float = 1.0) -> MatchReport:
    """Overwrite the VLM's language model with the text encoder's weights (key + shape match).

    Non-strict in the released code's sense (only matching tensors are copied), but **not
    silent**: the returned report counts every key, and a match below ``min_match`` (the
    fraction of language-model keys, ``lm_head`` excluded when the encoder has none) raises.

    Raises:
        PartialMatchError: matched fraction < ``min_match`` (the message lists examples).
    """
    target = vlm.state_dict()
    lm_keys = [k for k in target if k.startswith("model.language_model.") or k == "lm_head.weight"]
    src = text_encoder.state_dict()
    has_head = any(k.startswith("lm_head.") for k in src)
    counted = [k for k in lm_keys if has_head or k not in _OPTIONAL_TARGETS]
    matched, shape_bad, unused, to_load = [], [], [], {}
    for k, v in src.items():
        tk = _vlm_key(k)
        if tk not in target:
            unused.append(k)
        elif target[tk].shape != v.shape:
            shape_bad.append(f"{tk}: vlm {tuple(target[tk].shape)} vs text encoder {tuple(v.shape)}")
        else:
            matched.append(tk)
            to_load[tk] = v
    missing = [k for k in counted if k not in to_load]
    report = MatchReport(tuple(matched), tuple(shape_bad), tuple(missing), tuple(unused), len(counted))
    if report.fraction < min_match:
        raise PartialMatchError(
            report.summary() + f" < required {min_match:.1%}. Examples: shape {list(shape_bad[:3])}, "
            f"missing {missing[:3]}, unused {unused[:3]}. Is this the Qwen3-VL size that matches the text encoder?"
        )
    with torch.no_grad():
        for k, v in to_load.items():
            target[k].copy_(v.to(target[k].dtype))
    return report


@dataclass
class HybridVLMContext:
    """Teacher context of Z-Image-Turbo: Qwen3-VL(image, text) hidden layer −2, padding stripped.

    Attributes:
        vlm: ``Qwen3VLForConditionalGeneration`` with the text encoder's LM loaded.
        tokenizer: the Qwen tokenizer (with chat template).
        image_processor: the Qwen2/3-VL image processor (patch, merge and pixel budget).
        max_length: token budget (1024 in the released code); exceeding it is an error since
            truncation would cut image tokens.
        hidden_layer: which hidden state (−2, as the Z-Image text path).
        hidden_layers: if set, stack these hidden states along features instead (the FLUX.2
            text path: layers (9, 18, 27) -> ``(B, L, 3·D)``).
        pad_to: if set, pad every sequence with the tokenizer's pad token to this length and
            return a ``(B, pad_to, ·)`` tensor *including* the padding positions (FLUX.2's text
            path keeps them); otherwise padding is stripped and a ragged list is returned.
    """

    vlm: nn.Module
    tokenizer: object
    image_processor: object
    max_length: int = 1024
    hidden_layer: int = -2
    hidden_layers: tuple[int, ...] | None = None
    pad_to: int | None = None
    image_token: str = field(default="<|image_pad|>")
    processor: object | None = None  # real Qwen3-VL processor: its chat template renders image parts

    def _text(self, prompt: str, num_image_tokens: int) -> str:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        templater = self.processor if self.processor is not None else self.tokenizer
        text = templater.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if text.count(self.image_token) != 1:
            raise ValueError(f"chat template must render exactly one {self.image_token}, got: {text!r}")
        return text.replace(self.image_token, self.image_token * num_image_tokens)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], images: Sequence) -> list[Tensor]:
        """Encode (image_i, prompt_i) pairs to ragged ``(L_i, D)`` features.

        Args:
            prompts: the same prompt strings the student gets.
            images: PIL images (already at the bucket resolution).
        """
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        device = next(self.vlm.parameters()).device
        proc = self.image_processor(images=list(images), return_tensors="pt")
        merge = int(getattr(self.image_processor, "merge_size", 2))
        n_tokens = (proc["image_grid_thw"].prod(-1) // merge**2).tolist()
        texts = [self._text(p, int(n)) for p, n in zip(prompts, n_tokens)]
        longest = max(len(self.tokenizer(t).input_ids) for t in texts)
        limit = min(self.max_length, self.pad_to) if self.pad_to else self.max_length
        if longest > limit:
            raise ValueError(f"teacher context needs {longest} tokens > limit {limit}; "
                             "lower the processor's max_pixels or shorten the prompt")
        if self.pad_to:
            enc = self.tokenizer(texts, padding="max_length", max_length=self.pad_to, return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding="longest", return_tensors="pt")
        mask = enc.attention_mask.to(device).bool()
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        mm_types = (enc.input_ids == image_id).long()  # 1 = image token, 0 = text (as the processor returns)
        out = self.vlm(
            mm_token_type_ids=mm_types.to(device),
            input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
            pixel_values=proc["pixel_values"].to(device, next(self.vlm.parameters()).dtype),
            image_grid_thw=proc["image_grid_thw"].to(device), output_hidden_states=True, use_cache=False,
        )
        if self.hidden_layers:
            hidden = torch.cat([out.hidden_states[k] for k in self.hidden_layers], dim=-1)
        else:
            hidden = out.hidden_states[self.hidden_layer]
        if self.pad_to:
            return hidden
        return [hidden[i][mask[i]] for i in range(hidden.shape[0])]
