"""Image grids for looking at toy samples."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch
from PIL import Image
from torch import Tensor


def grid(x: Tensor, nrow: int = 8, scale: int = 4, pad: int = 1) -> Image.Image:
    """[N, 3, H, W] in [−1, 1] → a PIL grid image, each tile upscaled ``scale``× (nearest)."""
    n, _, h, w = x.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    canvas = torch.ones(3, rows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = (x[i].clamp(-1, 1) + 1) / 2
    arr = (canvas * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def save_grid(x: Tensor, path: Union[str, Path], nrow: int = 8, scale: int = 4) -> None:
    grid(x, nrow, scale).save(path)
