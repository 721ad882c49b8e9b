"""Small helpers for the paper_repro tests: a tiny image-caption folder and tiny configs."""

from __future__ import annotations

from pathlib import Path


def make_folder(root: Path, sizes=((32, 32), (32, 32), (24, 40), (40, 24)), seed: int = 0,
                caption: str = "a photo of sks dog") -> Path:
    """Write random RGB PNGs with same-stem caption files; returns ``root``."""
    from paper_repro.tiny import make_tiny_dataset

    return make_tiny_dataset(root, sizes, caption, seed)


def tiny_config(backbone: str, data_root: Path, out: Path, flux2_teacher: str = "editing",
                weight_dtype: str = "float32", **train):
    """A validated tiny RunConfig (float32, no autocast) for ``backbone``."""
    from paper_repro.config import DataConfig, LoraConfigSpec, ModelConfig, RunConfig, TrainConfig

    model = ModelConfig(backbone=backbone, tiny=True, weight_dtype=weight_dtype, max_sequence_length=48,
                        flux2_text_layers=(1, 2, 3), flux2_teacher=flux2_teacher)
    t = dict(steps=2, lr=1e-2, ema_decay=0.9, mixed_precision="no", gradient_checkpointing=False,
             checkpoint_every=1000, sample_every=1000, log_every=1)
    t.update(train)
    return RunConfig(model=model, data=DataConfig(root=str(data_root), resolution=16),
                     lora=LoraConfigSpec(rank=4, alpha=8), train=TrainConfig(**t), output_dir=str(out))
