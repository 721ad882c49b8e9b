"""Folder loader for user image–caption pairs at the toy resolution.

Layout::

    my_concept/
      images/            PNG/JPEG files, 16×16 (toy resolution)
      captions.jsonl     UTF-8, one JSON object per line: {"image": "a.png", "caption": "large red sks on black"}

Images become float tensors [3, 16, 16] in [−1, 1]. Conversions, stated:

* 8-bit RGB as is; greyscale (8- or 16-bit) is copied to the three channels;
* 16-bit samples are scaled to 8 bits (v/257 for greyscale; Pillow keeps the high byte of
  16-bit RGB), so a 16-bit PNG is never clipped to white;
* an alpha channel (RGBA, LA, or a palette with a transparent colour) is dropped only when
  every pixel is opaque; **transparency is refused** — the toy model has no notion of it and
  any flattening colour would be a guess: composite the image onto the background its caption
  names first;
* other modes (32-bit float, CMYK, ...) are refused.

``image`` paths are relative to ``images/`` and must stay inside it (no ``..``, no absolute
paths, no symlinks leading out). Every problem raises :class:`DatasetFolderError` naming the
file, line and field at fault; long captions and names are shortened in messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from toy_models.world import vocab as V
from toy_models.world.data import RES


class DatasetFolderError(ValueError):
    """A dataset folder is missing a file, or holds an unreadable/wrong-size image or bad caption."""


def shorten(text: str, limit: int = 60) -> str:
    """``text`` as a repr, cut to ``limit`` characters with its full length noted."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"… ({len(text)} characters)"


@dataclass(frozen=True)
class PairDataset:
    """Loaded pairs: images [N, 3, H, W] in [−1, 1], N captions, image names and their lines."""

    images: Tensor
    captions: list[str]
    files: list[str]
    sources: list[str] = field(default_factory=list)  # "captions.jsonl:LINE" of each pair

    def __len__(self) -> int:
        return len(self.captions)


def to_rgb8(im: Image.Image, where: str) -> Image.Image:
    """An opened image as 8-bit RGB, by the conversions stated in the module doc.

    Raises:
        DatasetFolderError: transparency, or a mode with no stated conversion.
    """
    if im.mode in ("RGB", "L"):
        return im.convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        arr = np.asarray(im)
        if im.mode == "F" or arr.min() < 0 or arr.max() > 65535:
            raise DatasetFolderError(f"{where}: {im.mode} image with values in [{arr.min()}, {arr.max()}] has no "
                                     "known range; save it as 8- or 16-bit RGB/greyscale")
        grey = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)  # 16-bit -> 8-bit, 65535 -> 255
        return Image.fromarray(grey, mode="L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if (alpha < 255).any():
            n = int((alpha < 255).sum())
            raise DatasetFolderError(f"{where}: {im.mode} image has transparency ({n} of {alpha.size} pixels with "
                                     "alpha < 255); the toy model has no transparency: composite it onto the "
                                     "background its caption names and save it as RGB")
        return rgba.convert("RGB")
    if im.mode == "P" or im.mode == "1":
        return im.convert("RGB")
    raise DatasetFolderError(f"{where}: image mode {im.mode} is not supported; save it as 8- or 16-bit RGB or greyscale")


def load_image(path: Path, size: int = RES) -> Tensor:
    """One image file → [3, size, size] float32 in [−1, 1] (conversions: module doc)."""
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb8(im, str(path))
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
        DatasetFolderError: missing folder/file, a line that is not UTF-8 or not JSON, missing
            or empty ``image``/``caption`` field, a caption with a word outside the toy
            vocabulary or too many words (when ``check_vocab``), an image path leading out of
            ``images/``, a referenced image that is missing, unreadable, transparent or not
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
    images, captions, files, sources = [], [], [], []
    img_root = img_dir.resolve()
    for n, raw in enumerate(cap_file.read_bytes().splitlines(), start=1):
        where = f"{cap_file}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetFolderError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                     "save the captions file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetFolderError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise DatasetFolderError(f"{where}: expected a JSON object with 'image' and 'caption'")
        for key in ("image", "caption"):
            if not isinstance(rec.get(key), str):
                raise DatasetFolderError(f"{where}: field {key!r} missing or not a string")
        cap = rec["caption"].strip()
        if not cap:
            raise DatasetFolderError(f"{where}: field 'caption' is empty")
        if check_vocab:
            check_caption(cap, where)
        path = img_dir / rec["image"]
        try:
            inside = path.resolve().is_relative_to(img_root) and not Path(rec["image"]).is_absolute()
        except (OSError, ValueError):
            inside = False
        if not inside:
            raise DatasetFolderError(f"{where}: field 'image' {shorten(rec['image'])} leads outside {img_dir}; "
                                     "image paths must be relative and stay inside images/")
        if not path.is_file():
            name = str(path) if len(rec["image"]) <= 60 else f"{shorten(rec['image'])} in {img_dir}"
            raise DatasetFolderError(f"{where}: image file {name} not found")
        images.append(load_image(path, size))
        captions.append(cap)
        files.append(rec["image"])
        sources.append(f"{cap_file.name}:{n}")
    if not captions:
        raise DatasetFolderError(f"{cap_file}: no image–caption pairs")
    return PairDataset(torch.stack(images), captions, files, sources)


def check_caption(cap: str, where: str) -> None:
    """Every word of ``cap`` is in the toy vocabulary and it fits the context length.

    Raises:
        DatasetFolderError: naming ``where``, the word (shortened) and the caption's start.
    """
    words = cap.split()
    if len(words) > V.MAX_TOKENS:
        raise DatasetFolderError(f"{where}: field 'caption' has {len(words)} words, more than {V.MAX_TOKENS} "
                                 f"(caption {shorten(cap, 40)})")
    for w in words:
        if w not in V.WORD_TO_ID or w == V.PAD:
            raise DatasetFolderError(f"{where}: field 'caption': unknown word {shorten(w, 30)} in caption "
                                     f"{shorten(cap, 40)}; vocabulary: {', '.join(V.WORDS[1:])}")


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
