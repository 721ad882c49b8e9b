"""Folder loader for user image–caption pairs at the toy resolution.

Layout::

    my_concept/
      images/            PNG/JPEG files, 16×16 (toy resolution), RGB (or RGBA/L, converted)
      captions.jsonl     one JSON object per line: {"image": "a.png", "caption": "large red sks on black"}

Images become float tensors [3, 16, 16] in [−1, 1]. Every problem raises
:class:`DatasetFolderError` naming the file, line and field at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from toy_models import vocab as V
from toy_models.data import RES


class DatasetFolderError(ValueError):
    """A dataset folder is missing a file, or holds an unreadable/wrong-size image or bad caption."""


@dataclass(frozen=True)
class PairDataset:
    """Loaded pairs: images [N, 3, H, W] in [−1, 1] and N captions."""

    images: Tensor
    captions: list[str]
    files: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def load_image(path: Path, size: int = RES) -> Tensor:
    """One image file → [3, size, size] float32 in [−1, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetFolderError(f"{path}: unreadable image ({exc})") from exc
    if rgb.size != (size, size):
        raise DatasetFolderError(f"{path}: image is {rgb.size[0]}×{rgb.size[1]}, expected {size}×{size} (the toy resolution)")
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2 - 1


def save_image(x: Tensor, path: Union[str, Path]) -> None:
    """Save [3, H, W] in [−1, 1] as an 8-bit PNG."""
    arr = ((x.clamp(-1, 1) + 1) / 2 * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(path)


def load_pair_folder(root: Union[str, Path], size: int = RES, check_vocab: bool = True) -> PairDataset:
    """Load ``root/images`` + ``root/captions.jsonl`` (see module doc).

    Raises:
        DatasetFolderError: missing folder/file, bad JSON line, missing or empty
            ``image``/``caption`` field, a caption with a word outside the toy vocabulary
            (when ``check_vocab``), a referenced image that is missing, unreadable or not
            ``size``×``size``, or no pairs at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFolderError(f"{root}: dataset folder does not exist")
    img_dir, cap_file = root / "images", root / "captions.jsonl"
    if not img_dir.is_dir():
        raise DatasetFolderError(f"{img_dir}: missing images/ folder")
    if not cap_file.is_file():
        raise DatasetFolderError(f"{cap_file}: missing captions.jsonl")
    images, captions, files = [], [], []
    for n, line in enumerate(cap_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{cap_file}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFolderError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(rec, dict):
            raise DatasetFolderError(f"{where}: expected a JSON object with 'image' and 'caption'")
        for field in ("image", "caption"):
            if not isinstance(rec.get(field), str):
                raise DatasetFolderError(f"{where}: field {field!r} missing or not a string")
        cap = rec["caption"].strip()
        if not cap:
            raise DatasetFolderError(f"{where}: field 'caption' is empty")
        if check_vocab:
            try:
                V.tokenize([cap])
            except ValueError as exc:
                raise DatasetFolderError(f"{where}: field 'caption': {exc}") from exc
        path = img_dir / rec["image"]
        if not path.is_file():
            raise DatasetFolderError(f"{where}: image file {path} not found")
        images.append(load_image(path, size))
        captions.append(cap)
        files.append(rec["image"])
    if not captions:
        raise DatasetFolderError(f"{cap_file}: no image–caption pairs")
    return PairDataset(torch.stack(images), captions, files)


def write_pair_folder(root: Union[str, Path], images: Tensor, captions: list[str]) -> Path:
    """Write images [N, 3, H, W] and captions as a folder :func:`load_pair_folder` reads."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i, (x, c) in enumerate(zip(images, captions)):
            name = f"{i:04d}.png"
            save_image(x, root / "images" / name)
            f.write(json.dumps({"image": name, "caption": c}) + "\n")
    return root
