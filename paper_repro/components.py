"""Loading the frozen components of a run (real checkpoints by id, tiny ones, or real-size random ones).

Three sources, chosen by the model config:

* ``model.tiny``: tiny random components of the real classes (CPU tests, smoke runs);
* ``model.random_init``: every component at its **real size**, built from the published configs
  in ``paper_repro/configs/published`` with random weights (dry runs that measure step time and
  memory without downloading weights; an offline word-level tokenizer stands in for Qwen's);
* otherwise ``from_pretrained`` of the ids/paths in the config.

``encoders=False`` loads only the transformer: a run that reads its contexts from a cache
(``paper_repro.cache``) never builds the text encoder, the VLM or the VAE.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .contexts import HybridVLMContext, MatchReport, load_lm_from_text_encoder

__all__ = ["Components", "load_components", "load_transformer", "published_config", "RANDOM_INIT_CONFIGS", "DTYPES",
           "vae_scale_factor"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PUBLISHED_DIR = Path(__file__).resolve().parent / "configs" / "published"

# Checkpoint id -> the published configs its random-init stand-in is built from.
RANDOM_INIT_CONFIGS: dict[str, dict[str, str]] = {
    "Tongyi-MAI/Z-Image-Turbo": {"transformer": "zimage_turbo_transformer", "vae": "zimage_turbo_vae",
                                 "text_encoder": "qwen3_4b_text_encoder"},
    "black-forest-labs/FLUX.2-klein-4B": {"transformer": "flux2_klein_4b_transformer", "vae": "flux2_vae",
                                          "text_encoder": "qwen3_4b_text_encoder"},
}
VLM_RANDOM_INIT_CONFIGS: dict[str, str] = {"Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl_4b_instruct"}


@dataclass
class Components:
    """Everything a run needs besides the trainable adapters.

    Attributes:
        transformer: the Z-Image or FLUX.2 transformer (base weights frozen later).
        vae, text_encoder, tokenizer: the pipeline's own (None when only the transformer is loaded).
        pipeline_cls: ``ZImagePipeline`` or ``Flux2KleinPipeline`` (LoRA export, evaluation).
        vlm_context: hybrid-VLM teacher encoder (Z-Image, FLUX.2 VLM route; else None).
        vlm_report: key-match report of the hybrid VLM load.
        vae_scale_factor: pixels per latent pixel (8 for both backbones).
    """

    backbone: str
    transformer: nn.Module
    vae: nn.Module | None
    text_encoder: nn.Module | None
    tokenizer: Any
    pipeline_cls: type
    vlm_context: HybridVLMContext | None = None
    vlm_report: MatchReport | None = None
    vae_scale_factor: int = 8


def vae_scale_factor(vae_config) -> int:
    """``2 ** (len(block_out_channels) − 1)``, as the pipelines compute it."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def published_config(name: str) -> dict:
    """A published config from ``configs/published/<name>.json`` without its bookkeeping keys.

    Keys starting with ``_`` (``_source``, ``_class_name``) are dropped: the classes'
    ``from_config`` / config constructors do not take them.
    """
    path = PUBLISHED_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"published config {path} missing")
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _random_init_names(cfg: ModelConfig) -> dict[str, str]:
    if cfg.pretrained not in RANDOM_INIT_CONFIGS:
        raise ValueError(f"model.random_init needs the published configs of model.pretrained={cfg.pretrained!r}; "
                         f"known: {sorted(RANDOM_INIT_CONFIGS)}")
    return RANDOM_INIT_CONFIGS[cfg.pretrained]


def _build_on(device, dtype: torch.dtype, seed: int, build):
    """Construct a module directly on ``device`` (default init runs there: fast on a GPU), then cast."""
    torch.manual_seed(seed)
    with torch.device(device):
        module = build()
    module = module.to(dtype)
    if torch.device(device).type == "meta":  # shapes only (parameter counts): nothing to check
        return module
    bad = [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(f"random init left non-finite parameters: {bad[:5]}")
    return module


def load_transformer(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, type]:
    """Only the transformer (frozen, ``cfg.weight_dtype``) and the pipeline class."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel, ZImagePipeline, ZImageTransformer2DModel

    dtype = DTYPES[cfg.weight_dtype]
    zimage = cfg.backbone == "zimage"
    pipeline_cls = ZImagePipeline if zimage else Flux2KleinPipeline
    cls = ZImageTransformer2DModel if zimage else Flux2Transformer2DModel
    if cfg.tiny:
        from . import tiny

        tr = (tiny.tiny_zimage_transformer(0) if zimage else tiny.tiny_flux2_transformer(
            0, joint_attention_dim=tiny.TinyQwen3Spec().hidden_size * len(tiny.FLUX2_TINY_LAYERS)))
    elif cfg.random_init:
        conf = published_config(_random_init_names(cfg)["transformer"])
        tr = _build_on(device, dtype, 0, lambda: cls.from_config(conf))
    else:
        tr = cls.from_pretrained(cfg.pretrained, subfolder="transformer", torch_dtype=dtype)
    tr.to(device=device, dtype=dtype).requires_grad_(False).eval()
    return tr, pipeline_cls


def _random_init_pipeline(cfg: ModelConfig, device, dtype: torch.dtype) -> dict:
    """Real-size random transformer, VAE and Qwen3 text encoder + the offline tokenizer."""
    from diffusers import AutoencoderKL, AutoencoderKLFlux2
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    from .tiny import build_tokenizer

    names = _random_init_names(cfg)
    zimage = cfg.backbone == "zimage"
    tr, _ = load_transformer(cfg, device)
    vae_cls = AutoencoderKL if zimage else AutoencoderKLFlux2
    vae = _build_on(device, dtype, 1, lambda: vae_cls.from_config(published_config(names["vae"])))
    te_conf = published_config(names["text_encoder"])
    te_conf.pop("architectures", None)
    te_cls = Qwen3Model if zimage else Qwen3ForCausalLM  # the classes the pipelines load
    text_encoder = _build_on(device, dtype, 2, lambda: te_cls(Qwen3Config(**te_conf)))
    return dict(transformer=tr, vae=vae, text_encoder=text_encoder, tokenizer=build_tokenizer())


def _random_init_vlm(cfg: ModelConfig, tokenizer, device, dtype: torch.dtype):
    """Real-size random Qwen3-VL whose special-token ids are the offline tokenizer's."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if cfg.vlm not in VLM_RANDOM_INIT_CONFIGS:
        raise ValueError(f"model.random_init needs the published config of model.vlm={cfg.vlm!r}; "
                         f"known: {sorted(VLM_RANDOM_INIT_CONFIGS)}")
    conf = published_config(VLM_RANDOM_INIT_CONFIGS[cfg.vlm])
    conf.pop("architectures", None)
    ids = tokenizer.convert_tokens_to_ids
    conf.update(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    vlm = _build_on(device, dtype, 3, lambda: Qwen3VLForConditionalGeneration(Qwen3VLConfig(**conf)))
    vc = conf["vision_config"]
    proc = Qwen2VLImageProcessorPil(
        patch_size=vc["patch_size"], temporal_patch_size=vc["temporal_patch_size"], merge_size=vc["spatial_merge_size"],
        size={"shortest_edge": cfg.vlm_min_pixels, "longest_edge": cfg.vlm_max_pixels},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return vlm, proc


def load_components(cfg: ModelConfig, device: torch.device | str = "cpu", encoders: bool = True) -> Components:
    """Load (or build tiny / random-init) components; frozen parts go to ``device`` in ``cfg.weight_dtype``.

    The transformer stays in ``weight_dtype`` too; LoRA tensors are created in float32 by the
    trainer. Nothing is downloaded when ``cfg.tiny`` or ``cfg.random_init`` is set; otherwise
    ``from_pretrained`` reads the ids/paths given in the config (the hub cache or a local folder).

    Args:
        encoders: False loads only the transformer (cached contexts): ``vae``, ``text_encoder``,
            ``tokenizer`` and ``vlm_context`` are None.
    """
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    dtype = DTYPES[cfg.weight_dtype]
    pipeline_cls = ZImagePipeline if cfg.backbone == "zimage" else Flux2KleinPipeline
    if not encoders:
        tr, pipeline_cls = load_transformer(cfg, device)
        return Components(cfg.backbone, tr, None, None, None, pipeline_cls)
    if cfg.tiny:
        from . import tiny

        pipe = tiny.tiny_zimage_pipeline(0) if cfg.backbone == "zimage" else tiny.tiny_flux2_klein_pipeline(0)
        parts = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    elif cfg.random_init:
        parts = _random_init_pipeline(cfg, device, dtype)
    else:
        pipe = pipeline_cls.from_pretrained(cfg.pretrained, torch_dtype=dtype)
        parts = dict(transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    comps = Components(cfg.backbone, parts["transformer"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                       pipeline_cls, vae_scale_factor=vae_scale_factor(parts["vae"].config))
    for m in (comps.vae, comps.text_encoder, comps.transformer):
        m.to(device=device, dtype=dtype).requires_grad_(False).eval()
    if cfg.backbone == "zimage" or cfg.flux2_teacher == "vlm":
        if cfg.tiny:
            from . import tiny

            vlm = tiny.tiny_qwen3_vl(comps.tokenizer)
            image_processor, vl_tokenizer, proc = tiny.tiny_qwen3_vl_image_processor(), comps.tokenizer, None
        elif cfg.random_init:
            vlm, image_processor = _random_init_vlm(cfg, comps.tokenizer, device, dtype)
            vl_tokenizer, proc = comps.tokenizer, None
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
