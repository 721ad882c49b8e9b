"""Folder datasets of image-caption pairs with aspect-ratio buckets.

Layout: ``root/xxx.png`` (or .jpg/.jpeg/.webp) with a caption in ``root/xxx.txt`` (same stem).
A missing caption is an error naming the file (a silent empty prompt would train the wrong
thing). Each image goes to the bucket ``(H, W)`` whose aspect ratio is closest to its own
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

__all__ = ["Sample", "make_buckets", "nearest_bucket", "FolderDataset", "BucketBatchPlan", "load_image"]

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


def load_image(path: Path, size: tuple[int, int]):
    """RGB PIL image resized to cover ``size = (H, W)`` and centre-cropped to it."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
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
        from PIL import Image

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.root={self.root} is not a directory")
        self.buckets = make_buckets(resolution, multiple)
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTS)}) in {self.root}")
        self.samples: list[Sample] = []
        for p in files:
            cap = p.with_suffix(".txt")
            if not cap.exists():
                raise FileNotFoundError(f"caption file {cap} missing for image {p.name}")
            with Image.open(p) as im:
                w, h = im.size
            text = (caption_prefix + " " + cap.read_text().strip()).strip()
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
