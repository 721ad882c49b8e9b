"""Recipes run end to end at tiny sizes and write loadable HF-style folders."""

import json

import torch

from toy_models.dit import ToyDiT
from toy_models.evaluator import ToyEvaluator
from toy_models.recipes import distill, pretrain, train_evaluator


def test_pretrain_then_distill_tiny(tmp_path):
    """pretrain (XS, 3 steps) → folder with config/safetensors/training.json; distill from it
    (tiny cache) → a loadable 4-step folder; rerunning pretrain with the same seed gives
    identical weights."""
    base = tmp_path / "base"
    args = ["--size", "XS", "--steps", "3", "--batch", "8", "--ckpt-every", "100", "--threads", "1",
            "--out", str(base), "--state", str(tmp_path / "st.pt")]
    pretrain.main(args)
    tr = json.loads((base / "training.json").read_text())
    assert tr["steps_done"] == 3 and tr["seed"] == 0 and "wall_clock_s" in tr
    m1 = ToyDiT.from_pretrained(base)
    pretrain.main(args[:-2] + ["--state", str(tmp_path / "st2.pt")] + ["--out", str(tmp_path / "base2")])
    m2 = ToyDiT.from_pretrained(tmp_path / "base2")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    out = tmp_path / "turbo"
    distill.main(["--base", str(base), "--out", str(out), "--n-text", "8", "--n-ref", "8", "--fine-steps", "4",
                  "--train-steps", "2", "--batch", "8", "--cache", str(tmp_path / "cache.pt"), "--threads", "1"])
    assert json.loads((out / "training.json").read_text())["K"] == 4
    assert ToyDiT.from_pretrained(out).config == m1.config


def test_train_evaluator_tiny(tmp_path):
    train_evaluator.main(["--steps", "2", "--batch", "8", "--out", str(tmp_path / "ev"), "--threads", "1"])
    assert "heldout_clean_accuracy" in json.loads((tmp_path / "ev" / "training.json").read_text())
    ToyEvaluator.from_pretrained(tmp_path / "ev")
