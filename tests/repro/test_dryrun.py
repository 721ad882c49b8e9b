"""Full-size dry run (``paper_repro.dryrun``) and ``--random-init``, checked on CPU.

Invariants:

* The dry-run script runs every row on the tiny components and writes the table; every row of a
  backbone performs the same D-OPSD update (per-step vs single backward, checkpointing on/off,
  cached vs live encoders change memory and time, not the step), so their reported losses agree;
  and no row keeps an earlier row's model alive (that would inflate the later rows' peak memory).
* ``--random-init`` builds the real-size components from the published configs kept in the
  repository: the Z-Image transformer has 6.15 B parameters, FLUX.2-klein-4B's 3.88 B, the
  Qwen3-4B text encoder 4.02 B, Qwen3-VL-4B 4.44 B (counted on the meta device, no allocation),
  and the full-size dry-run config is the recipe at 1024², K = 4, LoRA rank 64.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_dryrun_tiny_runs_every_row_and_writes_the_table(tmp_path):
    from paper_repro.dryrun import ROWS, main

    out = tmp_path / "table.md"
    results = main(["--size", "tiny", "--resolution", "16", "--steps", "1", "--out", str(out),
                    "--workdir", str(tmp_path / "work")])
    text = out.read_text()
    for backbone in ("zimage", "flux2"):
        rows = {r["row"]: r for r in results if r["backbone"] == backbone}
        assert set(rows) >= {r.name for r in ROWS}
        measured = [rows[r.name] for r in ROWS if r.optimizer == "adamw"]
        assert all(r["status"] == "ok" and r["step_s"] > 0 for r in measured), measured
        losses = [r["loss"] for r in measured]
        assert losses[0] > 0 and max(losses) - min(losses) <= 1e-5 * losses[0], losses
        eight_bit = rows["cached, per-step, ckpt, 8-bit AdamW"]["status"]
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            assert eight_bit == "skipped: bitsandbytes not installed"
        for r in ROWS:
            assert f"| {backbone} | {r.name} |" in text
    # no row keeps an earlier row's model alive (it would inflate the later rows' peak memory)
    import gc

    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel

    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, (ZImageTransformer2DModel, Flux2Transformer2DModel))]


@pytest.mark.parametrize("backbone, transformer_b, vlm", [("zimage", 6.15, True), ("flux2", 3.88, False)])
def test_random_init_builds_published_sizes_on_meta(backbone, transformer_b, vlm):
    from paper_repro.components import PUBLISHED_DIR, load_components
    from paper_repro.dryrun import dryrun_config

    cfg = dryrun_config(backbone, "full", Path("data"), Path("out"), 1024)
    assert cfg.model.random_init and cfg.lora.rank == 64 and cfg.train.num_rollout_steps == 4
    assert cfg.data.resolution == 1024 and cfg.model.weight_dtype == "bfloat16" and cfg.train.mixed_precision == "bf16"
    comps = load_components(cfg.model, "meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(comps.transformer) / 1e9 == pytest.approx(transformer_b, abs=0.005)
    assert count(comps.text_encoder) / 1e9 == pytest.approx(4.02, abs=0.005)
    assert (comps.vlm_context is not None) == vlm
    if vlm:
        assert count(comps.vlm_context.vlm) / 1e9 == pytest.approx(4.44, abs=0.005)
        assert comps.vlm_report.fraction == 1.0  # the text encoder fills the VLM's language model
    for f in PUBLISHED_DIR.glob("*.json"):
        assert json.loads(f.read_text())["_source"], f


def test_random_init_flag_and_unknown_checkpoint(monkeypatch):
    import paper_repro.train as train
    from paper_repro.components import load_transformer
    from paper_repro.config import ModelConfig

    seen = {}

    class Stop(Exception):
        pass

    def fake_trainer(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(train, "DOPSDTrainer", fake_trainer)
    with pytest.raises(Stop):
        train.main(["--config", str(ROOT / "paper_repro/configs/zimage_turbo_lora.yaml"), "--random-init"])
    assert seen["cfg"].model.random_init
    with pytest.raises(ValueError, match="published configs of model.pretrained='someone/other'"):
        load_transformer(ModelConfig(backbone="zimage", pretrained="someone/other", random_init=True), "meta")
