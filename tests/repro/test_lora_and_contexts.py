"""LoRA targets, the hybrid VLM loader and the student/teacher contexts.

* Every intended module (attention q/k/v/out and Z-Image's w1, w2, w3; FLUX.2's double- and
  single-stream projections) carries both adapters; a target list with a missing comma
  (``"w1" "w2"`` -> ``"w1w2"``, as an unused default of the released EMA utilities read until
  2026-05-13) silently leaves w1 and w2 without LoRA, and the coverage check catches it.
* The Qwen3 text encoder fills the tiny Qwen3-VL language model completely (report = all keys);
  a shape mismatch beyond the threshold fails with a clear error.
* The teacher context is a deterministic function of (prompt, image): it changes when the image
  changes and not otherwise; the student context equals the pipelines' own prompt encoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_every_intended_zimage_module_has_lora_and_missing_comma_drops_w1_w2():
    from dopsd_ref.lora import add_student_teacher_lora
    from paper_repro.lora import (ZIMAGE_TARGETS, ZIMAGE_TARGETS_MISSING_COMMA, LoraSpec, intended_modules,
                                  make_lora_config, missing_lora)
    from paper_repro.tiny import tiny_zimage_transformer

    model = tiny_zimage_transformer()
    names = intended_modules(model, ZIMAGE_TARGETS)
    n_blocks = 2 + 1 + 1  # layers + noise_refiner + context_refiner
    assert len(names) == 7 * n_blocks
    for proj in ("w1", "w2", "w3", "to_q", "to_k", "to_v", "to_out.0"):
        assert sum(n.endswith("." + proj) for n in names) == n_blocks, proj
    add_student_teacher_lora(model, make_lora_config("zimage", LoraSpec(rank=4, alpha=8)))
    assert missing_lora(model, names, "student") == []
    assert missing_lora(model, names, "teacher") == []
    # Nothing outside the intended list got LoRA (adaLN, embedders, final layer stay plain).
    from peft.tuners.lora import LoraLayer

    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert adapted == set(names)

    # A list with the missing comma, as Python evaluates it: "w1" "w2" -> "w1w2" matches nothing.
    assert "w1w2" in ZIMAGE_TARGETS_MISSING_COMMA
    buggy = tiny_zimage_transformer()
    add_student_teacher_lora(buggy, make_lora_config("zimage", LoraSpec(rank=4, alpha=8,
                                                                        targets=ZIMAGE_TARGETS_MISSING_COMMA)))
    missed = missing_lora(buggy, names, "student")
    assert sorted({m.rsplit(".", 1)[-1] for m in missed}) == ["w1", "w2"]
    assert len(missed) == 2 * n_blocks


def test_every_intended_flux2_module_has_lora():
    from dopsd_ref.lora import add_student_teacher_lora
    from paper_repro.lora import FLUX2_TARGETS, LoraSpec, intended_modules, make_lora_config, missing_lora
    from paper_repro.tiny import tiny_flux2_transformer

    model = tiny_flux2_transformer()
    names = intended_modules(model, FLUX2_TARGETS)
    assert len(names) == 12 + 2  # one double block (12 projections) + one single block (2)
    assert "single_transformer_blocks.0.attn.to_out" in names
    add_student_teacher_lora(model, make_lora_config("flux2", LoraSpec(rank=4, alpha=8)))
    assert missing_lora(model, names, "student") == [] and missing_lora(model, names, "teacher") == []


def test_hybrid_vlm_loader_reports_full_match_and_fails_on_partial(tokenizer):
    from paper_repro.contexts import PartialMatchError, load_lm_from_text_encoder
    from paper_repro.tiny import TinyQwen3Spec, tiny_qwen3_text_encoder, tiny_qwen3_vl

    te = tiny_qwen3_text_encoder(seed=0)
    vlm = tiny_qwen3_vl(tokenizer, seed=1)
    rep = load_lm_from_text_encoder(vlm, te)
    n_lm = sum(1 for k in vlm.state_dict() if k.startswith("model.language_model."))
    assert len(rep.matched) == rep.total_target == n_lm == len(te.state_dict())
    assert rep.fraction == 1.0 and not rep.shape_mismatched and not rep.missing_in_source and not rep.unused_source
    for k, v in te.state_dict().items():
        assert torch.equal(vlm.state_dict()["model.language_model." + k], v)
    assert "35/35" in rep.summary() or f"{n_lm}/{n_lm}" in rep.summary()
    # Qwen3ForCausalLM (FLUX.2's class) also maps, lm_head included.
    rep2 = load_lm_from_text_encoder(tiny_qwen3_vl(tokenizer), tiny_qwen3_text_encoder(causal_lm=True))
    assert rep2.fraction == 1.0 and "lm_head.weight" in rep2.matched
    # A text encoder of another width: nothing (or too little) matches -> clear error, weights untouched.
    other = tiny_qwen3_text_encoder(spec=TinyQwen3Spec(intermediate_size=48))
    fresh = tiny_qwen3_vl(tokenizer, seed=2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(PartialMatchError, match="shape"):
        load_lm_from_text_encoder(fresh, other, min_match=0.95)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    rep3 = load_lm_from_text_encoder(fresh, other, min_match=0.5)  # above threshold: loads what matches
    assert 0.5 <= rep3.fraction < 1.0 and len(rep3.shape_mismatched) == 3 * 3  # gate/up/down x 3 layers


def _img(seed: int, size=(32, 32)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def test_teacher_context_changes_with_the_image_only(tokenizer):
    from paper_repro.contexts import HybridVLMContext, load_lm_from_text_encoder, zimage_text_context
    from paper_repro.tiny import tiny_qwen3_text_encoder, tiny_qwen3_vl, tiny_qwen3_vl_image_processor

    te = tiny_qwen3_text_encoder()
    vlm = tiny_qwen3_vl(tokenizer)
    load_lm_from_text_encoder(vlm, te)
    ctx = HybridVLMContext(vlm, tokenizer, tiny_qwen3_vl_image_processor())
    p = "a photo of sks dog"
    a1, a2 = ctx([p], [_img(0)]), ctx([p], [_img(0)])
    b = ctx([p], [_img(1)])
    torch.testing.assert_close(a1[0], a2[0], rtol=0, atol=0)  # same (prompt, image): same context
    assert a1[0].shape == b[0].shape and (a1[0] - b[0]).abs().max() > 1e-4  # image changes it
    # Batched with a longer/shorter partner: padding stripped, identical per-sample features.
    batch = ctx([p, "red cat"], [_img(0), _img(2)])
    torch.testing.assert_close(batch[0], a1[0], atol=1e-5, rtol=1e-5)
    # Token count = text tokens + image tokens (grid 8x8 patches, merge 2 -> 16).
    n_text = len(zimage_text_context(te, tokenizer, [p], max_sequence_length=64)[0])
    assert a1[0].shape == (n_text + 2 + 16, 32)  # + vision_start/end + 16 image tokens
    # The VLM's language model *is* the text encoder: tokens before the image ("<|im_start|> user")
    # get exactly the student's features, and a text-only pass reproduces the student context.
    student = zimage_text_context(te, tokenizer, [p], max_sequence_length=64)[0]
    torch.testing.assert_close(a1[0][:2], student[:2], atol=1e-5, rtol=1e-4)
    text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
    enc = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        text_only = vlm(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                        output_hidden_states=True).hidden_states[-2][0]
    torch.testing.assert_close(text_only, student, atol=1e-5, rtol=1e-4)


def test_student_contexts_equal_pipeline_encoding(zimage_pipe, flux2_pipe):
    from paper_repro.contexts import flux2_text_context, zimage_text_context

    prompts = ["a photo of sks dog", "red cat"]
    ours = zimage_text_context(zimage_pipe.text_encoder, zimage_pipe.tokenizer, prompts, max_sequence_length=32)
    ref, _ = zimage_pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, max_sequence_length=32)
    assert [o.shape for o in ours] == [r.shape for r in ref] and ours[0].shape[0] != ours[1].shape[0]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)
    emb = flux2_text_context(flux2_pipe.text_encoder, flux2_pipe.tokenizer, prompts, (1, 2, 3), 32)
    ref2, _ = flux2_pipe.encode_prompt(list(prompts), max_sequence_length=32, text_encoder_out_layers=(1, 2, 3))
    torch.testing.assert_close(emb, ref2)
