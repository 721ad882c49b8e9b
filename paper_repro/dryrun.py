"""Full-size dry run: step time and peak memory of one D-OPSD LoRA step, per setting, as a table.

Builds the real-size components from their published configs with random weights
(``model.random_init``: Z-Image-Turbo 6.15 B transformer + Qwen3-4B + Qwen3-VL-4B + VAE;
FLUX.2-klein-4B 3.88 B transformer + Qwen3-4B + VAE), a one-image data folder at the run
resolution, and then runs the training script's own step (``DOPSDTrainer.train_step``) for

| row | encoders | backward | checkpointing |
|---|---|---|---|
| official-style (released recipe) | live | single | on |
| live, per-step | live | per_step | on |
| **cached, per-step, ckpt** (the 24 GB target) | cached | per_step | on |
| cached, single | cached | single | on |
| cached, per-step, no ckpt | cached | per_step | off |
| cached, single, no ckpt | cached | single | off |
| cached, per-step, ckpt, 8-bit AdamW | cached | per_step | on (only if bitsandbytes is installed) |

with K = 4, LoRA rank 64 and the recipe's other settings (bf16 weights and autocast). Per row:
median wall time of the timed steps (after one warm-up step) and, on CUDA,
``torch.cuda.max_memory_allocated`` over warm-up + timed steps (everything resident: weights,
LoRA, AdamW state, activations), next to ``paper_repro.memory_plan``'s estimate for Z-Image.
Cached rows run first, on a GPU that holds no encoder; the cache is built once from the
random encoders. A row that runs out of memory or time is reported as such.

On CPU, ``--size tiny`` runs the same rows on the tiny components (``tests/repro/test_dryrun.py``).

Run (GPU, ~5-8 min for both backbones)::

    python -m paper_repro.dryrun --out dryrun.md
    python -m paper_repro.dryrun --size tiny --resolution 16 --out /tmp/dryrun_tiny.md   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import RunConfig, load_config

__all__ = ["Row", "ROWS", "dryrun_config", "run_backbone", "markdown", "main"]

CONFIGS = Path(__file__).resolve().parent / "configs"
TARGET_GB = 22.0


@dataclass(frozen=True)
class Row:
    """One measured setting."""

    name: str
    cached: bool
    grad_strategy: str
    checkpointing: bool
    optimizer: str = "adamw"


ROWS: tuple[Row, ...] = (
    Row("cached, per-step, ckpt (target)", True, "per_step", True),
    Row("cached, single, ckpt", True, "single", True),
    Row("cached, per-step, no ckpt", True, "per_step", False),
    Row("cached, single, no ckpt", True, "single", False),
    Row("cached, per-step, ckpt, 8-bit AdamW", True, "per_step", True, "adamw8bit"),
    Row("official-style: live, single, ckpt", False, "single", True),
    Row("live, per-step, ckpt", False, "per_step", True),
)


def dryrun_config(backbone: str, size: str, data: Path, out: Path, resolution: int) -> RunConfig:
    """The recipe config (full: random-init real sizes; tiny: tiny components) for a dry run."""
    name = {("zimage", "full"): "zimage_turbo_lora", ("flux2", "full"): "flux2_klein_lora",
            ("zimage", "tiny"): "tiny_zimage", ("flux2", "tiny"): "tiny_flux2"}[(backbone, size)]
    sets = [f"data.root={data}", f"output_dir={out}", f"data.resolution={resolution}", "train.steps=1000000",
            "train.checkpoint_every=1000000", "train.sample_every=1000000", "train.log_every=1000000",
            "train.sample_prompts=[]", "train.num_rollout_steps=4", "train.grad_accum=1", "train.batch_size=1"]
    if size == "full":
        sets += ["model.random_init=true", "lora.rank=64", "lora.alpha=128"]
    return load_config(CONFIGS / f"{name}.yaml", sets)


def _make_data(root: Path, resolution: int) -> Path:
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(root / "img0.png")
    (root / "img0.txt").write_text("a photo of sks dog on the beach")
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(acc, device: torch.device) -> None:
    acc.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _estimate_gb(backbone: str, row: Row, resolution: int, size: str) -> float | None:
    """``paper_repro.memory_plan`` total for the row (Z-Image, full size, AdamW only)."""
    if backbone != "zimage" or size != "full" or row.optimizer != "adamw":
        return None
    from .memory_plan import plan

    label = f"ckpt={'on' if row.checkpointing else 'off'}, {row.grad_strategy} backward"
    for r in plan(resolution=resolution, encoders=not row.cached):
        if label in r.setting:
            return r.total_gb
    return None


def _measure(cfg: RunConfig, row: Row, steps: int) -> dict:
    """One row in a fresh ``Accelerator`` (its hooks would otherwise keep earlier rows' trainers alive)."""
    from accelerate import Accelerator

    from .train import DOPSDTrainer

    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    before = torch.cuda.memory_allocated(acc.device) if acc.device.type == "cuda" else None
    t = replace(cfg.train, grad_strategy=row.grad_strategy, gradient_checkpointing=row.checkpointing)
    trainer = DOPSDTrainer(replace(cfg, train=t), accelerator=acc)
    device = trainer.device
    if row.cached != (trainer.comps.text_encoder is None):
        raise RuntimeError(f"row {row.name!r}: the trainer {'built' if row.cached else 'did not build'} the encoders")
    if row.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # measurement-only swap of the optimizer

        trainer.optimizer = acc.prepare(bnb.optim.AdamW8bit(trainer.params, lr=t.lr, betas=tuple(t.betas),
                                                            weight_decay=t.weight_decay))
    resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(steps + 1):  # step 0 = warm-up (allocator, kernels, AdamW state)
        _sync(device)
        t0 = time.perf_counter()
        metrics = trainer.train_step()
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    n_params = sum(p.numel() for p in trainer.unwrapped.parameters())
    del trainer
    _free(acc, device)
    return {"step_s": statistics.median(times), "peak_gb": peak / 1e9 if peak is not None else None,
            "resident_gb": resident / 1e9 if resident is not None else None, "loss": losses[-1],
            "before_gb": before / 1e9 if before is not None else None, "transformer_params": n_params}


def run_backbone(backbone: str, size: str, resolution: int, steps: int, workdir: Path, deadline: float,
                 rows: tuple[Row, ...] = ROWS, on_row=None) -> list[dict]:
    """Measure every row for one backbone; rows past ``deadline`` (time.time()) are skipped."""
    from accelerate import Accelerator

    from .cache import build_cache
    from .components import load_components

    data = _make_data(workdir / f"data_{backbone}", resolution)
    cfg = dryrun_config(backbone, size, data, workdir / f"run_{backbone}", resolution)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision)
    device = acc.device
    results = []

    def record(row: Row, **fields) -> None:
        res = {"backbone": backbone, "row": row.name, "estimate_gb": _estimate_gb(backbone, row, resolution, size),
               **fields}
        results.append(res)
        if on_row is not None:
            on_row(results)

    t0 = time.perf_counter()
    comps = load_components(cfg.model, device)
    cache = build_cache(cfg, workdir / f"cache_{backbone}", device, comps=comps)
    cache_s = time.perf_counter() - t0
    del comps
    _free(acc, device)
    for row in rows:
        if row.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                record(row, status="skipped: bitsandbytes not installed")
                continue
        if time.time() > deadline:
            record(row, status="skipped: time budget")
            continue
        rcfg = replace(cfg, data=replace(cfg.data, cache=str(cache) if row.cached else ""))
        try:
            res = _measure(rcfg, row, steps)
            record(row, status="ok", **res)
        except torch.OutOfMemoryError:
            record(row, status="OOM")
        except Exception as e:  # a row's failure is a result; the others still run
            record(row, status=f"error: {type(e).__name__}: {str(e)[:120]}")
        _free(acc, device)
    results.append({"backbone": backbone, "row": "(cache build incl. loading the live encoders, 1 image)", "status": "ok",
                    "step_s": cache_s})
    return results


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: list[dict], header: dict) -> str:
    """The results as a markdown table plus the 22 GB target verdict."""
    lines = [f"Dry run: {json.dumps(header)}", "",
             "| backbone | setting | status | time per step (s) | peak GB (max_memory_allocated) | resident before step GB "
             "| memory_plan estimate GB | loss | allocated before the row GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['backbone']} | {r['row']} | {r['status']} | {_fmt(r.get('step_s'), '.3f')} | "
                     f"{_fmt(r.get('peak_gb'), '.2f')} | {_fmt(r.get('resident_gb'), '.2f')} | "
                     f"{_fmt(r.get('estimate_gb'), '.1f')} | {_fmt(r.get('loss'), '.3g')} | "
                     f"{_fmt(r.get('before_gb'), '.2f')} |")
    lines.append("")
    for r in results:
        if r["row"] == ROWS[0].name and r.get("peak_gb") is not None:
            verdict = "PASS" if r["peak_gb"] <= TARGET_GB else "FAIL"
            lines.append(f"Target ({r['backbone']}): cached, per-step, checkpointed LoRA step peak "
                         f"{r['peak_gb']:.2f} GB <= {TARGET_GB:.0f} GB: {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    """CLI: ``python -m paper_repro.dryrun --out table.md [--size tiny] [--backbones zimage flux2]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="markdown table (rewritten after every row)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full")
    ap.add_argument("--backbones", nargs="+", choices=["zimage", "flux2"], default=["zimage", "flux2"])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="rows starting later than this are skipped")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    deadline = time.time() + args.budget_s
    out = Path(args.out)
    header = {"size": args.size, "resolution": args.resolution, "K": 4, "lora_rank": 64 if args.size == "full" else 4,
              "timed_steps": args.steps, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    done: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for backbone in args.backbones:
            def on_row(partial, prior=list(done)):
                out.write_text(markdown(prior + partial, header))

            done += run_backbone(backbone, args.size, args.resolution, args.steps, work, deadline, on_row=on_row)
            out.write_text(markdown(done, header))
    print(out.read_text())
    return done


if __name__ == "__main__":
    main()
