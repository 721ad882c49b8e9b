"""Cached contexts and latents (``paper_repro.cache``).

Invariants:

* Training from the cache is bit-identical to training with live encoders: same losses, per-step
  losses, gradient norms, student and teacher LoRA tensors (CPU; float32, and bf16 weights with
  bf16 autocast; batches of 2 so the per-pair encoding and the batch assembly are both
  exercised), for Z-Image (hybrid VLM teacher) and FLUX.2 (editing branch with a teacher
  instruction; VLM route).
* A cached run never builds the text encoder, the VLM or the VAE; its sample latents decode to
  the same image the live run writes.
* A stale or damaged cache stops the run before the first step with an error that names the
  entry (or shard) and what changed: image bytes, caption, a setting, an encoder id, a missing
  or corrupt shard, an image without an entry.
* A cached run resumes bit-exactly from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dopsd_ref.lora import STUDENT, TEACHER, lora_parameters
from .helpers import make_folder, tiny_config


def _cached(cfg, cache_dir):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=str(cache_dir)))


def _lora(tr):
    return {a: {k: v.detach().clone() for k, v in lora_parameters(tr.unwrapped, a).items()} for a in (STUDENT, TEACHER)}


def _assert_same_lora(a, b):
    for adapter in (STUDENT, TEACHER):
        assert a[adapter].keys() == b[adapter].keys() and a[adapter]
        for k in a[adapter]:
            assert torch.equal(a[adapter][k], b[adapter][k]), (adapter, k)


CASES = {
    "zimage": dict(backbone="zimage"),
    "zimage-bf16-autocast": dict(backbone="zimage", weight_dtype="bfloat16", train=dict(mixed_precision="bf16")),
    "flux2-editing-instruction": dict(backbone="flux2", model=dict(teacher_instruction="keep the same subject")),
    "flux2-vlm": dict(backbone="flux2", flux2_teacher="vlm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_training_from_cache_equals_live_encoders_bit_for_bit(tmp_path, case):
    from paper_repro.cache import build_cache
    from paper_repro.train import DOPSDTrainer

    spec = CASES[case]
    data = make_folder(tmp_path / "data", sizes=((32, 32), (32, 32), (32, 32), (24, 40)))
    cfg = tiny_config(spec["backbone"], data, tmp_path / "live", flux2_teacher=spec.get("flux2_teacher", "editing"),
                      weight_dtype=spec.get("weight_dtype", "float32"), batch_size=2, steps=2, **spec.get("train", {}))
    if "model" in spec:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **spec["model"]))
    cache = build_cache(cfg, tmp_path / "cache")
    live = DOPSDTrainer(cfg)
    cached = DOPSDTrainer(dataclasses.replace(_cached(cfg, cache), output_dir=str(tmp_path / "cached")))
    assert cached.comps.text_encoder is None and cached.comps.vae is None
    for _ in range(2):
        ml, mc = live.train_step(), cached.train_step()
        assert ml["loss"] > 0
        assert (ml["loss"], ml["per_step"], ml["grad_norm"]) == (mc["loss"], mc["per_step"], mc["grad_norm"])
    _assert_same_lora(_lora(live), _lora(cached))
    assert any(v.abs().max() > 0 for k, v in _lora(live)[TEACHER].items() if "lora_B" in k)


def test_cached_run_builds_no_encoder_and_its_samples_decode_to_the_live_grid(tmp_path, monkeypatch):
    """Every tiny encoder/VAE builder raises; the cached trainer still trains and samples."""
    from PIL import Image

    import paper_repro.tiny as tiny
    from paper_repro.cache import build_cache, decode_samples
    from paper_repro.train import DOPSDTrainer

    data = make_folder(tmp_path / "data")
    cfg = tiny_config("zimage", data, tmp_path / "live", sample_prompts=("a photo of sks dog", "a red car"))
    cache = build_cache(cfg, tmp_path / "cache")
    live = DOPSDTrainer(cfg)
    live.train_step()
    live_png = live.sample_grid()

    def forbidden(*a, **k):
        raise AssertionError("a cached run built an encoder or the VAE")

    for name in ("tiny_qwen3_text_encoder", "tiny_qwen3_vl", "tiny_zimage_vae", "tiny_flux2_vae",
                 "tiny_zimage_pipeline", "tiny_flux2_klein_pipeline", "tiny_qwen3_vl_image_processor"):
        monkeypatch.setattr(tiny, name, forbidden)
    cached = DOPSDTrainer(dataclasses.replace(_cached(cfg, cache), output_dir=str(tmp_path / "cached")))
    cached.train_step()
    lat_path = cached.sample_grid()
    assert lat_path.suffix == ".safetensors"
    monkeypatch.undo()
    png = decode_samples(cfg, lat_path)
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(live_png)))


def _stale_setup(tmp_path):
    from paper_repro.cache import build_cache

    data = make_folder(tmp_path / "data")
    cfg = tiny_config("zimage", data, tmp_path / "run")
    cache = build_cache(cfg, tmp_path / "cache")
    return data, _cached(cfg, cache), cache


def _expect_cache_error(cfg, *needles):
    from paper_repro.cache import CacheError
    from paper_repro.train import DOPSDTrainer

    with pytest.raises(CacheError) as e:
        DOPSDTrainer(cfg)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert "python -m paper_repro.cache" in str(e.value)


def test_changed_image_bytes_name_the_entry(tmp_path):
    data, cfg, _ = _stale_setup(tmp_path)
    img = _read_rgb(data / "img1.png")
    img[0, 0] = 255 - img[0, 0]
    _write_rgb(img, data / "img1.png")
    _expect_cache_error(cfg, "img1.png", "image bytes changed")


def test_changed_caption_names_the_entry(tmp_path):
    data, cfg, _ = _stale_setup(tmp_path)
    (data / "img2.txt").write_text("a photo of sks cat")
    _expect_cache_error(cfg, "img2.png", "caption changed", "a photo of sks cat")


def test_changed_setting_names_the_field(tmp_path):
    _, cfg, _ = _stale_setup(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_sequence_length=40))
    _expect_cache_error(cfg, "model.max_sequence_length", "img0.png")


def test_cache_of_another_encoder_names_the_id(tmp_path):
    """A cache built from another checkpoint (manifest's encoder id) is refused."""
    _, cfg, cache = _stale_setup(tmp_path)
    man = json.loads((cache / "manifest.json").read_text())
    man["settings"]["model.vlm"] = "Qwen/Qwen3-VL-4B-Instruct"
    (cache / "manifest.json").write_text(json.dumps(man))
    _expect_cache_error(cfg, "model.vlm", "Qwen/Qwen3-VL-4B-Instruct")


def test_encoder_ids_and_settings_enter_the_key():
    from paper_repro.cache import cache_settings, entry_key
    from paper_repro.config import DataConfig, ModelConfig, RunConfig

    def key(**model):
        fields = {"backbone": "zimage", "pretrained": "Tongyi-MAI/Z-Image-Turbo", **model}
        cfg = RunConfig(model=ModelConfig(**fields), data=DataConfig(root="x"))
        return entry_key("00", "a photo", (16, 16), cache_settings(cfg))

    base = key()
    assert base == key()
    assert len({base, key(vlm="other/vlm"), key(pretrained="other/pipe"), key(vlm_max_pixels=1024),
                key(weight_dtype="float32")}) == 5


def test_missing_and_corrupt_shard_and_new_image(tmp_path):
    data, cfg, cache = _stale_setup(tmp_path)
    shard = cache / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    _expect_cache_error(cfg, "shard-00000.safetensors", "corrupt", "img0.png")
    shard.unlink()
    _expect_cache_error(cfg, "shard-00000.safetensors", "missing")
    make_folder(tmp_path / "more", sizes=((32, 32),), seed=5)
    (tmp_path / "more" / "img0.png").rename(data / "img9.png")
    (tmp_path / "more" / "img0.txt").rename(data / "img9.txt")
    _expect_cache_error(cfg, "img9.png", "missing")


def test_no_manifest(tmp_path):
    data = make_folder(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    _expect_cache_error(_cached(tiny_config("zimage", data, tmp_path / "run"), tmp_path / "empty"), "manifest.json")


def test_cached_run_resumes_exactly_and_cli_builds_the_cache(tmp_path):
    """CLI-built cache; 2 steps straight == 1 step, checkpoint, fresh trainer, resume, 1 step."""
    from paper_repro.cache import main as cache_main
    from paper_repro.train import DOPSDTrainer

    root = Path(__file__).resolve().parents[2]
    data = make_folder(tmp_path / "data")
    cache = cache_main(["--config", str(root / "paper_repro/configs/tiny_flux2.yaml"), "--set", f"data.root={data}",
                        "--set", f"data.cache={tmp_path / 'cache'}", "--device", "cpu", "--shard-size", "3"])
    assert sorted(p.name for p in cache.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    cfg = _cached(tiny_config("flux2", data, tmp_path / "a"), cache)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_sequence_length=32))
    a = DOPSDTrainer(cfg)
    a.train_step()
    a.train_step()
    cb = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))
    b = DOPSDTrainer(cb)
    b.train_step()
    b.save_checkpoint()
    torch.manual_seed(99)
    c = DOPSDTrainer(cb)
    assert c.load_checkpoint() and c.step == 1
    c.train_step()
    _assert_same_lora(_lora(a), _lora(c))


def _read_rgb(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).copy()


def _write_rgb(arr, path):
    from PIL import Image

    Image.fromarray(arr).save(path)


def test_preflight_with_a_cache_is_refused(tmp_path):
    """The pre-flight needs the live encoders and the VAE, which a cached run never builds."""
    from paper_repro.train import main

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ValueError, match="--preflight .* data.cache"):
        main(["--config", str(root / "paper_repro/configs/tiny_zimage.yaml"), "--set", f"data.root={tmp_path}",
              "--set", f"data.cache={tmp_path / 'cache'}", "--preflight"])
