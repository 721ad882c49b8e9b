"""Tiny, randomly initialised components of the *real* architectures, built from config.

Nothing here downloads anything: every module is constructed from a config object in
memory (the way diffusers' own fast tests build ``ZImageTransformer2DModel``,
``Flux2Transformer2DModel``, the VAEs and the Qwen3 text encoder). The tokenizer is a
word-level ``tokenizers`` model with the Qwen chat special tokens, so chat templates,
padding masks and image placeholders behave as with the real Qwen tokenizer.

These builders serve the CPU tests and the ``model.tiny: true`` smoke mode of
``paper_repro.train``; real runs load the released checkpoints by id instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Special tokens of the Qwen2/3 family that the pipelines and the VL processor rely on.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# Qwen-style chat template: string content (text encoders) or a list of
# {"type": "image"} / {"type": "text"} parts (Qwen3-VL user turn [image, text]).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "a an the of in on at with and photo picture painting style sks dog cat cactus desert "
    "happy face small big red green blue yellow black white anime portrait city street "
    "mountain river forest sky sun moon night day person man woman child car tree house "
    "flower bird fish boat beach snow rain cup table chair book lamp window door wall "
    "make keep consistent reference image same identity subject object concept scene "
    "user assistant system"
).split()


def build_tokenizer(vocab_words: tuple[str, ...] | None = None):
    """A word-level Qwen-like fast tokenizer with chat template, built offline.

    Unknown words map to ``<unk>``; padding uses ``<|endoftext|>`` (as Qwen does).

    Returns:
        ``transformers.PreTrainedTokenizerFast`` with ``chat_template`` set.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(vocab_words or _WORDS)
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, "<unk>", "\n", *words, ".", ",", ":", "[V]", "V", "[", "]"):
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(pattern="\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit(),
         pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


TINY_VOCAB = 256  # >= len(build_tokenizer()); embedding rows beyond the vocab are unused


@dataclass(frozen=True)
class TinyQwen3Spec:
    """Shape of the tiny Qwen3 language model shared by the text encoder and the VLM."""

    hidden_size: int = 32
    intermediate_size: int = 32
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    head_dim: int = 16
    vocab_size: int = TINY_VOCAB


def tiny_qwen3_config(spec: TinyQwen3Spec = TinyQwen3Spec()):
    """``Qwen3Config`` for the tiny text encoder."""
    from transformers import Qwen3Config

    return Qwen3Config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
        max_position_embeddings=512,
    )


def tiny_qwen3_text_encoder(seed: int = 0, causal_lm: bool = False, spec: TinyQwen3Spec = TinyQwen3Spec()):
    """Tiny ``Qwen3Model`` (Z-Image's text encoder class) or ``Qwen3ForCausalLM`` (FLUX.2-klein's)."""
    from transformers import Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return cls(tiny_qwen3_config(spec)).eval()


def tiny_qwen3_vl(tokenizer, seed: int = 1, spec: TinyQwen3Spec = TinyQwen3Spec(), patch_size: int = 4):
    """Tiny ``Qwen3VLForConditionalGeneration`` whose language model has the tiny Qwen3's shapes.

    The vision tower is 1 block; ``out_hidden_size`` equals the LM width. Special token ids
    are taken from ``tokenizer`` so the processor and the model agree.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    half = spec.head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    text_config = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                         "mrope_interleaved": True},
    )
    vision_config = dict(
        depth=1,
        hidden_size=16,
        intermediate_size=32,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=spec.hidden_size,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    ids = tokenizer.convert_tokens_to_ids
    cfg = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(cfg).eval()


def tiny_qwen3_vl_image_processor(patch_size: int = 4, min_pixels: int = 16 * 16, max_pixels: int = 32 * 32):
    """Qwen2/3-VL image processor (PIL backend, no torchvision needed) with a tiny pixel budget.

    The full ``Qwen3VLProcessor`` is not used: it insists on a video processor. The hybrid VLM
    context expands the image placeholder itself, exactly as the processor does.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def tiny_zimage_transformer(seed: int = 0, cap_feat_dim: int = 32):
    """Tiny ``ZImageTransformer2DModel`` (diffusers' fast-test shapes, caption dim = tiny Qwen3 width)."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    tr = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=cap_feat_dim,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    # The pad tokens are created with torch.empty upstream; fix them so runs are deterministic.
    with torch.no_grad():
        tr.x_pad_token.fill_(1.0)
        tr.cap_pad_token.fill_(1.0)
    return tr.eval()


def tiny_zimage_vae(seed: int = 0):
    """Tiny ``AutoencoderKL`` with 16 latent channels and Z-Image's scaling/shift factors."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        block_out_channels=[32, 64],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()


def tiny_flux2_transformer(seed: int = 0, joint_attention_dim: int = 32):
    """Tiny ``Flux2Transformer2DModel`` (in_channels = 4 x 1 latent channel after 2x2 patchify)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    ).eval()


def tiny_flux2_vae(seed: int = 0):
    """Tiny ``AutoencoderKLFlux2`` (1 latent channel, scale factor 1) with a non-trivial BN."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():  # non-identity latent normalisation, so the parity tests exercise it
        vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    return vae


def tiny_scheduler(shift: float = 1.0, dynamic: bool = False):
    """``FlowMatchEulerDiscreteScheduler``; shift 1 / no dynamic shifting passes sigmas through."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)


def klein_scheduler():
    """The FLUX.2-klein scheduler config: dynamic exponential shift with the pipeline's mu."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")


def tiny_zimage_pipeline(seed: int = 0):
    """A complete ``ZImagePipeline`` of tiny components (tokenizer built offline)."""
    from diffusers import ZImagePipeline

    return ZImagePipeline(
        scheduler=tiny_scheduler(),
        vae=tiny_zimage_vae(seed),
        text_encoder=tiny_qwen3_text_encoder(seed),
        tokenizer=build_tokenizer(),
        transformer=tiny_zimage_transformer(seed),
    )


def tiny_flux2_klein_pipeline(seed: int = 0):
    """A complete ``Flux2KleinPipeline`` of tiny components (3 x 32 = 96 = hidden-states layers x width)."""
    from diffusers import Flux2KleinPipeline

    spec = TinyQwen3Spec()
    return Flux2KleinPipeline(
        scheduler=klein_scheduler(),
        vae=tiny_flux2_vae(seed),
        text_encoder=tiny_qwen3_text_encoder(seed, causal_lm=True),
        tokenizer=build_tokenizer(),
        transformer=tiny_flux2_transformer(seed, joint_attention_dim=spec.hidden_size * len(FLUX2_TINY_LAYERS)),
        is_distilled=True,
    )


FLUX2_TINY_LAYERS: tuple[int, ...] = (1, 2, 3)  # hidden-state layers stacked into FLUX.2 prompt embeds


def word_count(text: str) -> int:
    """Number of whitespace/punctuation words (helper for tests of tokenisation)."""
    return len(re.findall(r"\w+", text))


def make_tiny_dataset(root, sizes=((32, 32), (32, 32), (24, 40), (40, 24)), caption: str = "a photo of sks dog",
                      seed: int = 0):
    """Write random RGB PNGs with same-stem caption files (a smoke-test image-caption folder)."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(caption)
    return root


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "make-data":
        raise SystemExit("usage: python -m paper_repro.tiny make-data DIR")
    print(make_tiny_dataset(sys.argv[2]))
