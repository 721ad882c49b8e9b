"""Folder datasets of image-caption pairs with aspect-ratio buckets.

Layout: ``root/xxx.png`` (or .jpg/.jpeg/.webp) with a UTF-8 caption in ``root/xxx.txt`` (same
stem). A missing, empty or non-UTF-8 caption is an error naming the file (a silent empty prompt
would train the wrong thing). Images are converted to 8-bit RGB as stated by
:func:`to_rgb8`: 16-bit samples are scaled (not clipped to white), an alpha channel is dropped
only when every pixel is opaque, and transparency is refused (flatten the image onto the
background you want first). Images that resolve outside ``root`` (symlinks) are refused. Each image goes to the bucket ``(H, W)`` whose aspect ratio is closest to its own
(log-ratio distance); buckets keep ``H·W ≈ resolution²`` with sides multiple of ``multiple``
(16 for both backbones: VAE 8x and 2x2 patches). Images are resized to cover the bucket and
centre-cropped.

Batches never mix buckets. The order is a pure function of ``(seed, epoch)`` and every rank
takes a disjoint slice, so a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Sample", "make_buckets", "nearest_bucket", "FolderDataset", "BucketBatchPlan", "load_image", "to_rgb8",
           "DataError"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def make_buckets(resolution: int, multiple: int = 16, ratios: tuple[float, ...] = (
        1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16)) -> list[tuple[int, int]]:
    """Bucket sizes ``(H, W)``: area ≈ resolution², sides rounded to ``multiple``; ratio = W/H."""
    if resolution % multiple:
        raise ValueError(f"resolution={resolution} must be a multiple of {multiple}")
    out = []
    for r in ratios:
        h = max(multiple, int(round(resolution / math.sqrt(r) / multiple)) * multiple)
        w = max(multiple, int(round(resolution * math.sqrt(r) / multiple)) * multiple)
        if (h, w) not in out:
            out.append((h, w))
    return out


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width/height`` in log space."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - r), b))


class DataError(ValueError):
    """A dataset file is unreadable, or holds an image or caption with no stated conversion."""


def to_rgb8(im, where: str):
    """An opened PIL image as 8-bit RGB.

    8-bit RGB/greyscale/palette as is; 16-bit greyscale (``I;16``/``I``) scaled by 1/257;
    16-bit RGB keeps its high byte (Pillow); alpha (RGBA, LA, a palette's transparent colour)
    dropped only when every pixel is opaque.

    Raises:
        DataError: transparency, or a mode with no stated conversion (float, CMYK, ...).
    """
    from PIL import Image

    if im.mode in ("RGB", "L", "1") or (im.mode == "P" and "transparency" not in im.info):
        return im.convert("RGB")
    if im.mode == "I" or im.mode.startswith("I;16"):
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise DataError(f"{where}: {im.mode} image with values in [{arr.min()}, {arr.max()}] has no known range")
        grey = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha < 255).any():
            raise DataError(f"{where}: {im.mode} image has transparency ({int((alpha < 255).sum())} of {alpha.size} "
                            "pixels with alpha < 255): composite it onto the background you want and save it as RGB")
        return rgba.convert("RGB")
    raise DataError(f"{where}: image mode {im.mode} is not supported; save it as 8- or 16-bit RGB or greyscale")


def load_image(path: Path, size: tuple[int, int]):
    """RGB PIL image (:func:`to_rgb8`) resized to cover ``size = (H, W)`` and centre-cropped to it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb8(im, str(path))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None
    h, w = size
    scale = max(h / img.height, w / img.width)
    nh, nw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - h) // 2, (nw - w) // 2
    return img.crop((left, top, left + w, top + h))


def pil_to_tensor(img) -> Tensor:
    """PIL RGB -> ``(3, H, W)`` float in [-1, 1] (the VAE's input range)."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1.0
    return arr.permute(2, 0, 1)


@dataclass(frozen=True)
class Sample:
    """One image-caption pair and its bucket."""

    path: Path
    caption: str
    bucket: tuple[int, int]


class FolderDataset:
    """Image-caption pairs of a folder, each assigned to an aspect-ratio bucket.

    Args:
        root: the folder.
        resolution: bucket area side (e.g. 1024; tiny tests use 16-32).
        caption_prefix: prepended to every caption (e.g. an identifier "[V]").
    """

    def __init__(self, root: str | Path, resolution: int, multiple: int = 16, caption_prefix: str = ""):
        from PIL import Image, UnidentifiedImageError

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} is not a directory")
        self.buckets = make_buckets(resolution, multiple)
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"data.root={self.root}: no images ({', '.join(IMAGE_EXTS)})")
        inside = self.root.resolve()
        self.samples: list[Sample] = []
        for p in files:
            if not p.resolve().is_relative_to(inside):
                raise DataError(f"data.root={self.root}: {p.name} resolves outside the dataset folder ({p.resolve()})")
            cap = p.with_suffix(".txt")
            if not cap.exists():
                raise FileNotFoundError(f"caption file {cap} missing for image {p.name}")
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    if im.mode not in ("RGB", "L"):
                        to_rgb8(im, str(p))  # refuse transparency / unknown modes before training starts
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{p}: unreadable image ({exc})") from None
            raw = cap.read_bytes()
            try:
                body = raw.decode("utf-8-sig").strip()
            except UnicodeDecodeError as exc:
                line = raw[: exc.start].count(b"\n") + 1
                raise DataError(f"caption file {cap}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                                "save it as UTF-8") from None
            if not body:
                raise DataError(f"caption file {cap} is empty (an empty prompt would train the wrong thing)")
            text = (caption_prefix + " " + body).strip()
            self.samples.append(Sample(p, text, nearest_bucket(h, w, self.buckets)))

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, idx: int):
        """``(PIL image at its bucket size, caption)``."""
        s = self.samples[idx]
        return load_image(s.path, s.bucket), s.caption


class BucketBatchPlan:
    """Deterministic per-rank batches of same-bucket indices.

    The global batch ``batch_size · world_size`` is drawn from one bucket; rank r takes the
    r-th slice. Each epoch is a permutation seeded by ``(seed, epoch)``; incomplete global
    batches are dropped (a bucket with fewer samples than one global batch is sampled with
    replacement so small concept datasets still train).
    """

    def __init__(self, dataset: FolderDataset, batch_size: int, world_size: int = 1, seed: int = 0):
        self.dataset, self.batch_size, self.world_size, self.seed = dataset, batch_size, world_size, seed

    def epoch(self, epoch: int) -> list[list[int]]:
        """Global batches (lists of ``batch_size·world_size`` indices) of one epoch."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        g = self.batch_size * self.world_size
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.dataset.samples):
            by_bucket.setdefault(s.bucket, []).append(i)
        batches = []
        for b in sorted(by_bucket):
            idx = by_bucket[b][:]
            rng.shuffle(idx)
            if len(idx) < g:
                idx = [rng.choice(by_bucket[b]) for _ in range(g)]
            batches += [idx[i:i + g] for i in range(0, len(idx) - g + 1, g)]
        rng.shuffle(batches)
        return batches

    def batch(self, step: int, rank: int) -> list[int]:
        """Indices of this rank's micro-batch for global micro-step ``step`` (pure function)."""
        n = len(self.epoch(0))
        ep, i = divmod(step, n)
        gb = self.epoch(ep)[i]
        return gb[rank * self.batch_size:(rank + 1) * self.batch_size]
