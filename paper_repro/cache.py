"""Cached contexts and latents: encode every (image, caption) pair once, train without the encoders.

The frozen encoders' outputs never change for a given pair, yet a live run evaluates them every
step (for Z-Image-Turbo: Qwen3-4B for the student, Qwen3-VL-4B for the teacher, the VAE). This
module stores, per pair,

* ``student``: the student text context (Z-Image: ``(L_i, D)`` hidden layer −2, padding
  stripped; FLUX.2: ``(L, 3·D)`` stacked layers, padded as klein's text path);
* ``teacher``: the hybrid-VLM teacher context (Z-Image ``(L_t, D)``; FLUX.2 VLM route ``(L, 3·D)``);
* ``teacher_text``: FLUX.2 editing branch with a teacher instruction: the teacher's text context;
* ``reference``: FLUX.2 editing branch: the target's normalised packed VAE tokens ``(h·w, 4C)``;
* ``latent``: Z-Image: the target's VAE latent ``(z − shift)·scale`` ``(C, H/8, W/8)`` (the
  D-OPSD loss does not read it: the student rolls out from noise; it is kept for SFT baselines),

in safetensors shards plus ``manifest.json``. Each entry is keyed by

    key = sha256(image-file sha256, caption, bucket, settings)

where ``settings`` holds the encoder ids and every config field that changes an encoding
(:func:`cache_settings`). A trainer with ``data.cache`` set checks, before its first step, that
every pair of the data folder has an entry with the same key, that the shards exist and that
their sha256 matches; otherwise it stops with a :class:`CacheError` naming the entry and what
changed. It then builds only the transformer (``load_components(..., encoders=False)``).

A sample's context never depends on which samples share its batch: both the cache and the live
path (:class:`LiveContexts`) encode one pair at a time and concatenate, so training from the
cache gives bit-identical losses and LoRA tensors to training with live encoders
(``tests/repro/test_cache.py``).

Run::

    python -m paper_repro.cache --config paper_repro/configs/zimage_turbo_lora.yaml --set data.cache=cache/concept
    python -m paper_repro.train --config ... --set data.cache=cache/concept
    python -m paper_repro.cache decode --config ... runs/x/samples/step-0000250.safetensors   # cached runs' samples
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import torch
from torch import Tensor

from .adapters import Flux2Reference, flux2_encode_reference, flux2_reference_ids
from .components import Components, load_components
from .config import ModelConfig, RunConfig, load_config
from .contexts import flux2_text_context, zimage_text_context
from .data import FolderDataset, pil_to_tensor

__all__ = [
    "FORMAT",
    "CacheError",
    "BatchContexts",
    "ContextSource",
    "LiveContexts",
    "CachedContexts",
    "cache_settings",
    "entry_key",
    "encode_sample",
    "build_cache",
    "load_run_components",
    "context_source",
    "main",
]

FORMAT = "paper_repro.cache/1"
MANIFEST = "manifest.json"
COMMON = "common.safetensors"  # sample-prompt contexts and the FLUX.2 VAE batch-norm statistics


class CacheError(ValueError):
    """A cache that is missing, stale (data or settings changed) or damaged; the message names the entry."""


# -----------------------------------------------------------------------------
# What an encoding depends on
# -----------------------------------------------------------------------------


def _teacher_uses_vlm(m: ModelConfig) -> bool:
    return m.backbone == "zimage" or m.flux2_teacher == "vlm"


def cache_settings(cfg: RunConfig) -> dict[str, object]:
    """Config fields (dotted names) that change an encoding, with the encoder ids.

    Tiny components are named ``"tiny"`` (they are a pure function of the code), random-init
    ones ``"random-init:<id>"``.
    """
    m = cfg.model
    source = "tiny" if m.tiny else (f"random-init:{m.pretrained}" if m.random_init else m.pretrained)
    s: dict[str, object] = {
        "format": FORMAT,
        "model.backbone": m.backbone,
        "model.pretrained": source,
        "model.weight_dtype": m.weight_dtype,
        "model.max_sequence_length": m.max_sequence_length,
        "data.resolution": cfg.data.resolution,
    }
    if m.backbone == "flux2":
        s["model.flux2_text_layers"] = list(m.flux2_text_layers)
        s["model.flux2_teacher"] = m.flux2_teacher
        if m.flux2_teacher == "editing":
            s["model.teacher_instruction"] = m.teacher_instruction
    if _teacher_uses_vlm(m):
        s["model.vlm"] = "tiny" if m.tiny else (f"random-init:{m.vlm}" if m.random_init else m.vlm)
        if not m.tiny:
            s["model.vlm_min_pixels"] = m.vlm_min_pixels
            s["model.vlm_max_pixels"] = m.vlm_max_pixels
    return s


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def entry_key(image_sha256: str, caption: str, bucket: Sequence[int], settings: dict) -> str:
    """``sha256`` of the canonical JSON of (image bytes' sha256, caption, bucket, settings)."""
    blob = json.dumps({"image": image_sha256, "caption": caption, "bucket": list(bucket), "settings": settings},
                      sort_keys=True, separators=(",", ":"))
    return _sha256_bytes(blob.encode())


def _prompt_key(prompt: str, settings: dict) -> str:
    return _sha256_bytes(json.dumps({"prompt": prompt, "settings": settings}, sort_keys=True).encode())


# -----------------------------------------------------------------------------
# Encoding one pair, assembling a batch
# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchContexts:
    """Everything the velocity adapters of one micro-batch need besides the transformer.

    Attributes:
        student: Z-Image: list of ``(L_i, D)``; FLUX.2: ``(B, L, 3·D)``.
        teacher: the teacher's context in the same layout (Z-Image hybrid VLM, FLUX.2 VLM route
            or the editing branch's text context, which equals ``student`` without an instruction);
            None for prompt-only batches (sample grids).
        reference: FLUX.2 editing branch: the targets' reference-image tokens (else None).
    """

    student: list[Tensor] | Tensor
    teacher: list[Tensor] | Tensor | None = None
    reference: Flux2Reference | None = None


@torch.no_grad()
def encode_student(comps: Components, m: ModelConfig, prompt: str, device) -> Tensor:
    """Student text context of one prompt (the pipeline's own text path, batch of one)."""
    if m.backbone == "zimage":
        return zimage_text_context(comps.text_encoder, comps.tokenizer, [prompt], m.max_sequence_length, device)[0]
    return flux2_text_context(comps.text_encoder, comps.tokenizer, [prompt], m.flux2_text_layers,
                              m.max_sequence_length, device)[0]


@torch.no_grad()
def encode_sample(comps: Components, m: ModelConfig, prompt: str, image, device) -> dict[str, Tensor]:
    """All cached tensors of one (image, caption) pair, computed exactly as a live step does.

    Returns:
        ``{"student", "teacher"?, "teacher_text"?, "reference"?, "latent"?}`` (see the module
        docstring for shapes); tensors stay in the encoders' dtype and on ``device``.
    """
    out = {"student": encode_student(comps, m, prompt, device)}
    if _teacher_uses_vlm(m):
        out["teacher"] = comps.vlm_context([prompt], [image])[0]
    pix = pil_to_tensor(image)[None].to(device)  # [1, 3, H, W] in [-1, 1]
    if m.backbone == "zimage":
        vae = comps.vae
        z = vae.encode(pix.to(next(vae.parameters()).dtype)).latent_dist.mode()
        out["latent"] = ((z - vae.config.shift_factor) * vae.config.scaling_factor)[0]
    elif m.flux2_teacher == "editing":
        t_prompt = (prompt + " " + m.teacher_instruction).strip()
        if t_prompt != prompt:
            out["teacher_text"] = encode_student(comps, m, t_prompt, device)
        tokens, _, _ = flux2_encode_reference(comps.vae, pix)
        out["reference"] = tokens[0]
    return out


def _reference_grid(bucket: Sequence[int], vae_scale: int) -> tuple[int, int]:
    """Token grid of a reference image at the bucket size: 2x2 patches of the latent."""
    return bucket[0] // vae_scale // 2, bucket[1] // vae_scale // 2


def collate(m: ModelConfig, samples: list[dict[str, Tensor]], ref_grid: tuple[int, int] | None,
            device) -> BatchContexts:
    """Per-sample tensors -> :class:`BatchContexts` (lists for Z-Image, concatenation for FLUX.2)."""
    if m.backbone == "zimage":
        student = [s["student"].to(device) for s in samples]
        teacher = [s["teacher"].to(device) for s in samples] if "teacher" in samples[0] else None
        return BatchContexts(student, teacher)
    student = torch.stack([s["student"] for s in samples]).to(device)
    if "teacher" in samples[0]:  # VLM route
        return BatchContexts(student, torch.stack([s["teacher"] for s in samples]).to(device))
    if "reference" not in samples[0]:
        return BatchContexts(student)
    teacher = (torch.stack([s["teacher_text"] for s in samples]).to(device) if "teacher_text" in samples[0]
               else student)
    tokens = torch.stack([s["reference"] for s in samples]).to(device)  # [B, h·w, 4C]
    if ref_grid is None or tokens.shape[1] != ref_grid[0] * ref_grid[1]:
        raise ValueError(f"{tokens.shape[1]} reference tokens do not fill the {ref_grid} grid of the bucket")
    ref = Flux2Reference(tokens, flux2_reference_ids([ref_grid], device=device))
    return BatchContexts(student, teacher, ref)


class ContextSource(Protocol):
    """Where a run's contexts come from: live encoders or a cache."""

    def batch(self, indices: Sequence[int]) -> BatchContexts:
        """Student/teacher contexts (and FLUX.2 reference tokens) of dataset samples ``indices``."""

    def prompts(self, prompts: Sequence[str]) -> BatchContexts:
        """Student contexts of free prompts (sample grids)."""


class LiveContexts:
    """Contexts computed by the encoders at every call, one pair at a time (see :func:`encode_sample`)."""

    def __init__(self, comps: Components, m: ModelConfig, dataset: FolderDataset, device):
        self.comps, self.m, self.dataset, self.device = comps, m, dataset, device

    def batch(self, indices: Sequence[int]) -> BatchContexts:
        samples, bucket = [], self.dataset.samples[indices[0]].bucket
        for i in indices:
            image, caption = self.dataset.load(i)
            samples.append(encode_sample(self.comps, self.m, caption, image, self.device))
        return collate(self.m, samples, _reference_grid(bucket, self.comps.vae_scale_factor), self.device)

    def prompts(self, prompts: Sequence[str]) -> BatchContexts:
        return collate(self.m, [{"student": encode_student(self.comps, self.m, p, self.device)} for p in prompts],
                       None, self.device)


# -----------------------------------------------------------------------------
# Building and reading the cache
# -----------------------------------------------------------------------------


def _rebuild_hint(cache_dir: Path) -> str:
    return f"rebuild it with: python -m paper_repro.cache --config <run config> --set data.cache={cache_dir}"


def _json_config(conf) -> dict:
    return json.loads(json.dumps(dict(conf), default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


@torch.no_grad()
def build_cache(cfg: RunConfig, out: str | Path | None = None, device: torch.device | str = "cpu",
                shard_size: int = 32, comps: Components | None = None) -> Path:
    """Encode every pair of ``cfg.data.root`` (and ``train.sample_prompts``) into ``out``.

    Written to ``<out>.tmp`` and renamed, so an interrupted build never leaves a half cache.

    Returns:
        The cache folder (``out``, default ``cfg.data.cache``).
    """
    from safetensors.torch import save_file

    out = Path(out or cfg.data.cache)
    if not str(out):
        raise ValueError("no cache folder: pass --out or set data.cache")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    m = cfg.model
    comps = comps or load_components(m, device)
    vsf = comps.vae_scale_factor
    dataset = FolderDataset(cfg.data.root, cfg.data.resolution, multiple=2 * vsf, caption_prefix=cfg.data.caption_prefix)
    settings = cache_settings(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries, shards = {}, {}
    for start in range(0, len(dataset), shard_size):
        shard = f"shard-{start // shard_size:05d}.safetensors"
        tensors = {}
        for i in range(start, min(start + shard_size, len(dataset))):
            s = dataset.samples[i]
            image_sha = _sha256_file(s.path)
            key = entry_key(image_sha, s.caption, s.bucket, settings)
            image, caption = dataset.load(i)
            enc = encode_sample(comps, m, caption, image, device)
            for name, t in enc.items():
                tensors[f"{key}/{name}"] = t.detach().cpu().contiguous()
            entries[key] = {"name": s.path.name, "image_sha256": image_sha, "caption": s.caption,
                            "bucket": list(s.bucket), "shard": shard, "tensors": sorted(enc)}
        save_file(tensors, str(tmp / shard))
        shards[shard] = {"sha256": _sha256_file(tmp / shard), "entries": sum(e["shard"] == shard for e in entries.values())}
    common = {}
    prompts = {}
    for p in cfg.train.sample_prompts:
        pk = _prompt_key(p, settings)
        common[f"prompt/{pk}/student"] = encode_student(comps, m, p, device).detach().cpu().contiguous()
        prompts[pk] = p
    if m.backbone == "flux2":
        common["vae/bn_running_mean"] = comps.vae.bn.running_mean.detach().cpu().contiguous()
        common["vae/bn_running_var"] = comps.vae.bn.running_var.detach().cpu().contiguous()
    save_file(common or {"empty": torch.zeros(0)}, str(tmp / COMMON))
    manifest = {
        "format": FORMAT,
        "settings": settings,
        "vae_scale_factor": vsf,
        "vae_config": _json_config(comps.vae.config),
        "vlm_report": comps.vlm_report.summary() if comps.vlm_report is not None else None,
        "built_on": str(torch.device(device)),
        "entries": entries,
        "shards": shards,
        "common": {"file": COMMON, "sha256": _sha256_file(tmp / COMMON), "prompts": prompts},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_manifest(cache_dir: str | Path) -> dict:
    """The manifest of a cache folder (errors name the folder)."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST
    if not path.exists():
        raise CacheError(f"data.cache={cache_dir}: no {MANIFEST} (not a cache, or its build was interrupted); "
                         + _rebuild_hint(cache_dir))
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e}); " + _rebuild_hint(cache_dir)) from e
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, this code reads {FORMAT!r}; "
                         + _rebuild_hint(cache_dir))
    return manifest


def _settings_diff(cached: dict, now: dict) -> list[str]:
    keys = sorted(set(cached) | set(now))
    return [f"{k}: cached {cached.get(k)!r}, this run {now.get(k)!r}" for k in keys if cached.get(k) != now.get(k)]


class CachedContexts:
    """Contexts read from a cache built by :func:`build_cache`, checked against the run first.

    Raises (at construction):
        CacheError: missing manifest; settings that differ (names each field); a pair of the data
            folder without an entry of the same key (names the image and whether its bytes, its
            caption or its bucket changed); a missing or corrupt shard (names it and its entries).
    """

    def __init__(self, cache_dir: str | Path, cfg: RunConfig, dataset: FolderDataset, device, verify: bool = True):
        from safetensors import safe_open

        self.dir = Path(cache_dir)
        self.m, self.dataset, self.device = cfg.model, dataset, device
        manifest = read_manifest(self.dir)
        self.manifest = manifest
        settings = cache_settings(cfg)
        diff = _settings_diff(manifest["settings"], settings)
        entries = manifest["entries"]
        if diff:
            some = ", ".join(sorted(e["name"] for e in entries.values())[:3])
            raise CacheError(f"cache {self.dir} is stale for this run: settings differ ({'; '.join(diff)}); "
                             f"all {len(entries)} entries are affected (e.g. {some}); " + _rebuild_hint(self.dir))
        self.vae_scale_factor = int(manifest["vae_scale_factor"])
        by_name = {e["name"]: e for e in entries.values()}
        self.keys: list[str] = []
        for s in dataset.samples:
            key = entry_key(_sha256_file(s.path), s.caption, s.bucket, settings)
            if key not in entries:
                raise CacheError(self._explain_missing(s, by_name.get(s.path.name)))
            self.keys.append(key)
        needed = sorted({entries[k]["shard"] for k in self.keys})
        for shard in needed:
            names = sorted(e["name"] for e in entries.values() if e["shard"] == shard)
            path = self.dir / shard
            if not path.exists():
                raise CacheError(f"cache {self.dir}: shard {shard} is missing (entries {names[:5]}); "
                                 + _rebuild_hint(self.dir))
            if verify and _sha256_file(path) != manifest["shards"][shard]["sha256"]:
                raise CacheError(f"cache {self.dir}: shard {shard} is corrupt (sha256 differs from the manifest; "
                                 f"entries {names[:5]}); " + _rebuild_hint(self.dir))
        common = self.dir / manifest["common"]["file"]
        if not common.exists() or (verify and _sha256_file(common) != manifest["common"]["sha256"]):
            raise CacheError(f"cache {self.dir}: {common.name} is missing or corrupt; " + _rebuild_hint(self.dir))
        try:
            self._files = {shard: safe_open(str(self.dir / shard), "pt", device="cpu") for shard in needed}
            self._common = safe_open(str(common), "pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise CacheError(f"cache {self.dir}: cannot read a shard ({e}); " + _rebuild_hint(self.dir)) from e
        self._prompt_keys = {p: k for k, p in manifest["common"]["prompts"].items()}

    def _explain_missing(self, sample, cached: dict | None) -> str:
        where = f"cache {self.dir}: entry for {sample.path.name}"
        if cached is None:
            return (f"{where} is missing (the cache holds {len(self.manifest['entries'])} entries, none for this "
                    "image: was it added after the build?); " + _rebuild_hint(self.dir))
        why = []
        if cached["image_sha256"] != _sha256_file(sample.path):
            why.append("the image bytes changed")
        if cached["caption"] != sample.caption:
            why.append(f"the caption changed (cached {cached['caption']!r}, now {sample.caption!r})")
        if list(cached["bucket"]) != list(sample.bucket):
            why.append(f"the bucket changed (cached {cached['bucket']}, now {list(sample.bucket)})")
        return f"{where} is stale: {', '.join(why) or 'its key differs'}; " + _rebuild_hint(self.dir)

    def _entry(self, key: str) -> dict[str, Tensor]:
        e = self.manifest["entries"][key]
        f = self._files[e["shard"]]
        try:
            return {name: f.get_tensor(f"{key}/{name}") for name in e["tensors"]}
        except Exception as err:
            raise CacheError(f"cache {self.dir}: entry {e['name']} cannot be read from {e['shard']} ({err}); "
                             + _rebuild_hint(self.dir)) from err

    def batch(self, indices: Sequence[int]) -> BatchContexts:
        bucket = self.dataset.samples[indices[0]].bucket
        samples = [self._entry(self.keys[i]) for i in indices]
        return collate(self.m, samples, _reference_grid(bucket, self.vae_scale_factor), self.device)

    def prompts(self, prompts: Sequence[str]) -> BatchContexts:
        missing = [p for p in prompts if p not in self._prompt_keys]
        if missing:
            raise CacheError(f"cache {self.dir} has no context for sample prompt(s) {missing} "
                             "(train.sample_prompts changed after the build); " + _rebuild_hint(self.dir))
        return collate(self.m, [{"student": self._common.get_tensor(f"prompt/{self._prompt_keys[p]}/student")}
                                for p in prompts], None, self.device)


# -----------------------------------------------------------------------------
# The trainer's two entry points
# -----------------------------------------------------------------------------


def load_run_components(cfg: RunConfig, device) -> Components:
    """Live run: every component. Cached run (``data.cache``): the transformer only.

    A cached run never builds the text encoder, the VLM or the VAE; the VAE scale factor comes
    from the manifest.
    """
    if not cfg.data.cache:
        return load_components(cfg.model, device)
    manifest = read_manifest(cfg.data.cache)  # fail before loading the transformer
    comps = load_components(cfg.model, device, encoders=False)
    comps.vae_scale_factor = int(manifest["vae_scale_factor"])
    return comps


def context_source(cfg: RunConfig, comps: Components, dataset: FolderDataset, device) -> ContextSource:
    """:class:`CachedContexts` when ``data.cache`` is set (checked now), else :class:`LiveContexts`."""
    if cfg.data.cache:
        return CachedContexts(cfg.data.cache, cfg, dataset, device)
    return LiveContexts(comps, cfg.model, dataset, device)


# -----------------------------------------------------------------------------
# Decoding the latents a cached run saves instead of sample grids
# -----------------------------------------------------------------------------


@torch.no_grad()
def decode_samples(cfg: RunConfig, path: str | Path, device: torch.device | str = "cpu") -> Path:
    """Decode ``samples/step-*.safetensors`` of a cached run with the VAE into a PNG grid next to it."""
    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from .adapters import flux2_packed_to_pipeline_latents

    path = Path(path)
    with safe_open(str(path), "pt", device="cpu") as f:
        lat = f.get_tensor("latents")
        meta = f.metadata() or {}
    vae = load_components(cfg.model, device).vae
    lat = lat.to(device)
    if cfg.model.backbone == "zimage":
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
    else:
        lat = flux2_packed_to_pipeline_latents(lat, int(meta["h"]), int(meta["w"]), vae)
    img = vae.decode(lat.to(next(vae.parameters()).dtype), return_dict=False)[0]
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    png = path.with_suffix(".png")
    Image.fromarray(np.concatenate(list(img), axis=1)).save(png)
    return png


def main(argv: list[str] | None = None) -> Path:
    """CLI: build a cache (``--config CFG [--set ...] [--out DIR]``) or ``decode`` saved sample latents."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="build", choices=["build", "decode"])
    ap.add_argument("files", nargs="*", help="decode: samples/step-*.safetensors of a cached run")
    ap.add_argument("--config", required=True, help="the run config (its data and model sections decide the cache)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    ap.add_argument("--out", default=None, help="cache folder (default: data.cache)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shard-size", type=int, default=32, help="pairs per safetensors shard")
    ap.add_argument("--random-init", action="store_true", help="real-size random encoders (dry runs)")
    args = ap.parse_args(argv)
    overrides = list(args.set) + (["model.random_init=true"] if args.random_init else [])
    cfg = load_config(args.config, overrides)
    if args.command == "decode":
        out = None
        for f in args.files:
            out = decode_samples(cfg, f, args.device)
            print(out)
        return out
    out = build_cache(cfg, args.out, args.device, args.shard_size)
    n = len(read_manifest(out)["entries"])
    print(f"cache {out}: {n} entries")
    return out


if __name__ == "__main__":
    main()
