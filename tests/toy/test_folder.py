"""Folder loader for user pairs: round trip, and documented errors for bad folders."""

import json

import pytest
import torch
from PIL import Image

from toy_models.world import data as D
from toy_models.world.folder import DatasetFolderError, load_pair_folder, write_pair_folder


def _good(tmp_path, n=3):
    sp = D.specs(0, n)
    x = D.render_batch(sp)
    root = write_pair_folder(tmp_path / "ds", x, [D.caption(s) for s in sp])
    return root, x, sp


def test_round_trip(tmp_path):
    """Written pairs load back as [N, 3, 16, 16] in [-1, 1] within 8-bit quantisation."""
    root, x, sp = _good(tmp_path)
    ds = load_pair_folder(root)
    assert ds.images.shape == (3, 3, 16, 16) and len(ds) == 3
    assert (ds.images - x).abs().max() <= 1 / 255 + 1e-6
    assert ds.captions == [D.caption(s) for s in sp]


def _lines(root, recs):
    (root / "captions.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in recs) + "\n")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: __import__("shutil").rmtree(r / "images"), "missing images/ folder"),
        (lambda r: (r / "captions.jsonl").unlink(), "missing captions.jsonl"),
        (lambda r: _lines(r, ["{not json"]), r"captions.jsonl:1: not valid JSON"),
        (lambda r: _lines(r, [{"image": "0000.png"}]), r"captions.jsonl:1: field 'caption' missing"),
        (lambda r: _lines(r, [{"caption": "small red circle on black"}]), r"field 'image' missing"),
        (lambda r: _lines(r, [{"image": "0000.png", "caption": "   "}]), r"field 'caption' is empty"),
        (lambda r: _lines(r, [{"image": "0000.png", "caption": "a purple cat"}]), r"unknown word 'a'"),
        (lambda r: _lines(r, [{"image": "nope.png", "caption": "small red circle on black"}]), r"nope.png not found"),
        (lambda r: (r / "images" / "0000.png").write_bytes(b"not a png"), r"0000.png: unreadable image"),
        (lambda r: Image.new("RGB", (32, 32)).save(r / "images" / "0000.png"), r"image is 32×32, expected 16×16"),
        (lambda r: _lines(r, []), r"no image–caption pairs"),
    ],
)
def test_bad_folders(tmp_path, mutate, match):
    """Each kind of bad folder raises DatasetFolderError naming the file/line/field."""
    root, _, _ = _good(tmp_path)
    mutate(root)
    with pytest.raises(DatasetFolderError, match=match):
        load_pair_folder(root)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetFolderError, match="does not exist"):
        load_pair_folder(tmp_path / "absent")


def _png16(path, arr, color_type):
    """Write a 16-bit PNG by hand (Pillow cannot write 16-bit RGB): arr [H, W] or [H, W, C] uint16."""
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16bit_pngs_are_scaled_not_clipped(tmp_path):
    """16-bit greyscale and RGB PNGs load at their 8-bit value (v/257, or the high byte) —
    a mid-grey 16-bit image is mid-grey, not the all-white image Pillow's RGB conversion gives."""
    import numpy as np

    root, _, _ = _good(tmp_path, n=2)
    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)  # 8-bit value i, exactly
    Image.fromarray(grey).save(root / "images" / "0000.png")  # Pillow writes this as 16-bit greyscale
    assert Image.open(root / "images" / "0000.png").mode.startswith("I")
    rgb = np.stack([grey, 65535 - grey, np.full_like(grey, 128 * 257)], -1)
    _png16(root / "images" / "0001.png", rgb, color_type=2)
    ds = load_pair_folder(root)
    want = torch.arange(256, dtype=torch.float32).reshape(16, 16) / 255 * 2 - 1
    for c in range(3):
        torch.testing.assert_close(ds.images[0, c], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.images[1, 0], want, atol=1e-6, rtol=0)
    torch.testing.assert_close(ds.images[1, 1], -want, atol=1e-6, rtol=0)
    assert ds.images[0].mean().abs() < 0.05  # mid-grey on average, not white


def test_alpha_opaque_is_dropped_and_transparency_refused(tmp_path):
    """A fully opaque alpha channel is dropped (same pixels as RGB); any transparent pixel —
    RGBA, LA, or a palette's transparent colour — is refused with a message saying how to
    flatten it, never silently turned black."""
    root, x, _ = _good(tmp_path, n=2)
    rgb = Image.open(root / "images" / "0000.png").convert("RGB")
    rgb.convert("RGBA").save(root / "images" / "0000.png")
    ds = load_pair_folder(root)
    assert (ds.images[0] - x[0]).abs().max() <= 1 / 255 + 1e-6
    rgba = rgb.convert("RGBA")
    rgba.putpixel((3, 4), (10, 20, 30, 0))
    rgba.save(root / "images" / "0000.png")
    with pytest.raises(DatasetFolderError, match=r"0000.png: RGBA image has transparency \(1 of 256 pixels.*composite"):
        load_pair_folder(root)
    Image.new("LA", (16, 16), (128, 100)).save(root / "images" / "0000.png")
    with pytest.raises(DatasetFolderError, match="LA image has transparency"):
        load_pair_folder(root)
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.info["transparency"] = 0
    pal.save(root / "images" / "0000.png", transparency=0)
    with pytest.raises(DatasetFolderError, match="has transparency"):
        load_pair_folder(root)


def test_non_utf8_captions_name_file_and_line(tmp_path):
    """A captions file that is not UTF-8 is an error naming the file, the line and the byte."""
    root, _, _ = _good(tmp_path)
    lines = (root / "captions.jsonl").read_bytes().splitlines()
    lines[1] = lines[1].replace(b"caption", b"capti\xe9n")
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DatasetFolderError, match=r"captions.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        load_pair_folder(root)


@pytest.mark.parametrize("caption", ["large " * 5000, "small red " + "q" * 100000 + " on black"])
def test_overlong_caption_is_not_echoed_whole(tmp_path, caption):
    """A caption with too many words, or with a huge unknown word, is refused with a short
    message (its start and length), not an echo of the whole caption."""
    root, _, _ = _good(tmp_path)
    _lines(root, [{"image": "0000.png", "caption": caption}])
    with pytest.raises(DatasetFolderError, match=r"captions.jsonl:1: field 'caption'") as info:
        load_pair_folder(root)
    assert len(str(info.value)) < 600 and "characters" in str(info.value)


@pytest.mark.parametrize("image", ["../outside.png", "ABS", "link.png"])
def test_image_paths_outside_the_folder_are_refused(tmp_path, image):
    """`image` must name a file inside images/: `..`, absolute paths and symlinks leading
    out are refused (even though the file exists and is a valid image)."""
    root, _, _ = _good(tmp_path)
    outside = root / "outside.png"
    Image.new("RGB", (16, 16)).save(outside)
    if image == "ABS":
        image = str(outside)
    if image == "link.png":
        (root / "images" / "link.png").symlink_to(outside)
    _lines(root, [{"image": image, "caption": "small red circle on black"}])
    with pytest.raises(DatasetFolderError, match="leads outside"):
        load_pair_folder(root)
