"""Folder loader for user pairs: round trip, and documented errors for bad folders."""

import json

import pytest
import torch
from PIL import Image

from toy_models import data as D
from toy_models.folder import DatasetFolderError, load_pair_folder, write_pair_folder


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
