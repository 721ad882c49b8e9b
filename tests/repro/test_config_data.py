"""Configs reproduce the released recipe and reject bad fields by name; folder buckets are exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import make_folder

CONFIGS = Path(__file__).resolve().parents[2] / "paper_repro" / "configs"


def test_released_recipe_configs():
    from paper_repro.config import load_config
    from paper_repro.grids import training_grid

    z = load_config(CONFIGS / "zimage_turbo_lora.yaml")
    f = load_config(CONFIGS / "flux2_klein_lora.yaml")
    for c in (z, f):
        assert (c.lora.rank, c.lora.alpha) == (64, 128)
        assert c.train.weight_decay == 0.0 and c.train.max_grad_norm == 1.0 and c.train.ema_decay == 0.9999
        assert c.train.num_rollout_steps == 4 and c.train.betas == (0.9, 0.999)
        assert c.train.mixed_precision == "bf16" and c.train.gradient_checkpointing
    assert z.train.lr == 1e-4 and f.train.lr == 2e-5
    assert training_grid("zimage", 4).tolist() == [1.0, 0.9, 0.75, 0.5]
    g = training_grid("flux2", 4, image_seq_len=64 * 64)  # 1024 px -> 4096 packed tokens
    assert g[0] == 1.0 and g.shape == (4,) and bool((g[1:] < g[:-1]).all())
    assert load_config(CONFIGS / "zimage_turbo_full.yaml").train.mode == "full"


def test_flux2_grid_matches_diffusers_scheduler():
    """Our FLUX.2 grid equals FlowMatchEulerDiscreteScheduler.set_timesteps(K, mu=empirical mu)."""
    import numpy as np
    import torch
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from paper_repro.grids import flux2_grid
    from paper_repro.tiny import klein_scheduler

    for k, seq in [(4, 4096), (4, 1024), (8, 256), (2, 5000)]:
        sch = klein_scheduler()
        sch.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=compute_empirical_mu(seq, k))
        torch.testing.assert_close(flux2_grid(k, seq).float(), sch.sigmas[:-1].float(), atol=1e-6, rtol=0)


def test_config_errors_name_the_field(tmp_path):
    from paper_repro.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: zimage, tiny: true}\ndata: {root: x}\n")
    with pytest.raises(ValueError, match="train.ema_decay"):
        load_config(p, ["train.ema_decay=1.0"])
    with pytest.raises(ValueError, match="model.backbone"):
        load_config(p, ["model.backbone=sd3"])
    with pytest.raises(ValueError, match="unknown field.*train"):
        load_config(p, ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="mixed_precision"):
        load_config(p, ["train.mixed_precision=fp16"])
    p.write_text("model: {backbone: zimage}\ndata: {root: x}\n")
    with pytest.raises(ValueError, match="model.pretrained"):
        load_config(p)


def test_buckets_and_folder_dataset(tmp_path):
    from paper_repro.data import BucketBatchPlan, FolderDataset, make_buckets, nearest_bucket

    b = make_buckets(1024)
    assert (1024, 1024) in b and all(h % 16 == 0 and w % 16 == 0 for h, w in b)
    assert all(abs(h * w / 1024**2 - 1) < 0.05 for h, w in b)
    assert nearest_bucket(600, 800, b)[1] > nearest_bucket(600, 800, b)[0]  # landscape -> wide bucket
    root = make_folder(tmp_path / "d", sizes=((32, 32), (32, 32), (32, 32), (20, 44)))
    ds = FolderDataset(root, resolution=16, multiple=4, caption_prefix="[V]")
    assert ds.samples[0].caption == "[V] a photo of sks dog"
    img, cap = ds.load(3)
    assert (img.height, img.width) == ds.samples[3].bucket and img.width > img.height
    plan = BucketBatchPlan(ds, batch_size=1, world_size=2, seed=0)
    for step in range(6):
        r0, r1 = plan.batch(step, 0), plan.batch(step, 1)
        assert ds.samples[r0[0]].bucket == ds.samples[r1[0]].bucket  # one bucket per global batch
        assert plan.batch(step, 0) == r0  # pure function of (seed, step, rank)
    (root / "img1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="img1.txt"):
        FolderDataset(root, resolution=16, multiple=4)


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps=abc: must be an integer"),
    ("train.lr=fast", "train.lr=fast: must be a number"),
    ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing=maybe: must be true or false"),
    ("train.betas=[0.9]", r"train.betas=\(0.9,\): must be a list of 2 values"),
    ("lora.rank=0", "lora.rank=0: must be >= 1"),
    ("train.lr=-1", r"train.lr=-1.0: must be finite and > 0"),
    ("model.tiny=1", "model.tiny=1: must be true or false"),
    ("train=5", "train: must be a mapping"),
])
def test_every_config_error_names_the_field_and_value(tmp_path, override, message):
    """A wrong type or range in any section is an error naming `section.field=value` (not a
    TypeError deep inside torch later); a float field accepts the string YAML makes of 1e-4."""
    from paper_repro.config import load_config

    p = tmp_path / "c.yaml"
    p.write_text("model: {backbone: zimage, tiny: true}\ndata: {root: x}\n")
    with pytest.raises(ValueError, match=message):
        load_config(p, [override])
    assert load_config(p, ["train.lr=1e-4"]).train.lr == 1e-4


def test_config_file_errors_are_messages(tmp_path, capsys):
    """A missing config file, broken YAML and a non-mapping file are errors naming the file;
    through the CLI they are one-line messages with exit status 2, never tracebacks."""
    from paper_repro.config import load_config
    from paper_repro.train import cli

    with pytest.raises(FileNotFoundError, match="absent.yaml does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {backbone: zimage\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("model: {backbone: zimage, tiny: true}\ndata: {root: x}\n")
    assert cli(["--config", str(good), "--set", "train.steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.steps=abc: must be an integer") and "Traceback" not in err
    assert cli(["--config", str(good)]) == 2
    assert "data.root=x is not a directory" in capsys.readouterr().err


def _png16_grey(path, value):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((32, 32), value, dtype=np.uint16)).save(path)


def test_bad_images_and_captions_are_refused_or_converted_as_stated(tmp_path):
    """Folder data: a 16-bit greyscale PNG is scaled to 8 bits (mid-grey stays mid-grey, not
    the white Pillow's plain conversion gives); transparency is refused naming the file; a
    non-UTF-8 or empty caption names its file; an image that resolves outside the folder
    (symlink) is refused."""
    import numpy as np
    from PIL import Image

    from paper_repro.data import DataError, FolderDataset

    root = make_folder(tmp_path / "d", sizes=((32, 32), (32, 32)))
    _png16_grey(root / "img0.png", 128 * 257)
    ds = FolderDataset(root, resolution=16, multiple=4)
    img, _ = ds.load(0)
    assert np.asarray(img).min() == np.asarray(img).max() == 128
    rgba = Image.new("RGBA", (32, 32), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.save(root / "img1.png")
    with pytest.raises(DataError, match=r"img1.png: RGBA image has transparency \(1 of 1024"):
        FolderDataset(root, resolution=16, multiple=4)
    Image.new("RGBA", (32, 32), (10, 20, 30, 255)).save(root / "img1.png")  # opaque alpha: dropped
    assert np.asarray(FolderDataset(root, resolution=16, multiple=4).load(1)[0])[0, 0].tolist() == [10, 20, 30]
    (root / "img1.txt").write_bytes(b"a photo of \xff sks\n")
    with pytest.raises(DataError, match=r"img1.txt:1: not valid UTF-8 \(byte 0xff\)"):
        FolderDataset(root, resolution=16, multiple=4)
    (root / "img1.txt").write_text("  \n")
    with pytest.raises(DataError, match="img1.txt is empty"):
        FolderDataset(root, resolution=16, multiple=4)
    (root / "img1.txt").write_text("a photo of sks dog")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (32, 32)).save(outside)
    (root / "img2.png").symlink_to(outside)
    (root / "img2.txt").write_text("a photo of sks dog")
    with pytest.raises(DataError, match="img2.png resolves outside the dataset folder"):
        FolderDataset(root, resolution=16, multiple=4)
