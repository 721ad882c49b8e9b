"""Loading the frozen components of a run (real checkpoints by id, or tiny ones from config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .contexts import HybridVLMContext, MatchReport, load_lm_from_text_encoder

__all__ = ["Components", "load_components", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Components:
    """Everything a run needs besides the trainable adapters.

    Attributes:
        transformer: the Z-Image or FLUX.2 transformer (base weights frozen later).
        vae, text_encoder, tokenizer: the pipeline's own.
        pipeline_cls: ``ZImagePipeline`` or ``Flux2KleinPipeline`` (LoRA export, evaluation).
        vlm_context: Z-Image hybrid-VLM teacher encoder (None for FLUX.2).
        vlm_report: key-match report of the hybrid VLM load.
    """

    backbone: str
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    pipeline_cls: type
    vlm_context: HybridVLMContext | None = None
    vlm_report: MatchReport | None = None


def load_components(cfg: ModelConfig, device: torch.device | str = "cpu") -> Components:
    """Load (or build tiny) components; frozen parts go to ``device`` in ``cfg.weight_dtype``.

    The transformer stays in ``weight_dtype`` too; LoRA tensors are created in float32 by peft.
    Nothing is downloaded when ``cfg.tiny`` is set; otherwise ``from_pretrained`` reads the
    ids/paths given in the config (the hub cache or a local folder).
    """
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    dtype = DTYPES[cfg.weight_dtype]
    pipeline_cls = ZImagePipeline if cfg.backbone == "zimage" else Flux2KleinPipeline
    if cfg.tiny:
        from . import tiny

        pipe = tiny.tiny_zimage_pipeline(0) if cfg.backbone == "zimage" else tiny.tiny_flux2_klein_pipeline(0)
    else:
        pipe = pipeline_cls.from_pretrained(cfg.pretrained, torch_dtype=dtype)
    comps = Components(cfg.backbone, pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipeline_cls)
    for m in (comps.vae, comps.text_encoder, comps.transformer):
        m.to(device=device, dtype=dtype).requires_grad_(False).eval()
    if cfg.backbone == "zimage" or cfg.flux2_teacher == "vlm":
        if cfg.tiny:
            from . import tiny

            vlm = tiny.tiny_qwen3_vl(comps.tokenizer)
            image_processor, vl_tokenizer, proc = tiny.tiny_qwen3_vl_image_processor(), comps.tokenizer, None
        else:
            from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

            vlm = Qwen3VLForConditionalGeneration.from_pretrained(cfg.vlm, torch_dtype=dtype)
            pixels = dict(min_pixels=cfg.vlm_min_pixels, max_pixels=cfg.vlm_max_pixels)
            try:
                proc = AutoProcessor.from_pretrained(cfg.vlm, **pixels)
                image_processor, vl_tokenizer = proc.image_processor, proc.tokenizer
            except (OSError, ValueError, TypeError, AttributeError, ImportError):
                # No full processor (e.g. torchvision missing for the video processor, or a folder without
                # one): image processor + tokenizer, whose chat template must render image parts.
                proc = None
                image_processor = AutoImageProcessor.from_pretrained(cfg.vlm, **pixels)
                vl_tokenizer = AutoTokenizer.from_pretrained(cfg.vlm)
        comps.vlm_report = load_lm_from_text_encoder(vlm, comps.text_encoder, min_match=cfg.vlm_min_match)
        vlm.to(device=device, dtype=dtype).requires_grad_(False).eval()
        if cfg.backbone == "zimage":
            comps.vlm_context = HybridVLMContext(vlm, vl_tokenizer, image_processor, processor=proc)
        else:  # FLUX.2 VLM route: stacked layers, padded like klein's text path
            comps.vlm_context = HybridVLMContext(vlm, vl_tokenizer, image_processor, max_length=cfg.max_sequence_length,
                                                 hidden_layers=tuple(cfg.flux2_text_layers),
                                                 pad_to=cfg.max_sequence_length, processor=proc)
    return comps
