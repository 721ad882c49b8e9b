"""The full experiment suite: concept, style and domain fine-tuning, baselines and ablations.

    python -m toy_models.experiments concept    [--train-seeds 2] [--gen-seeds 3] [--steps 150]
    python -m toy_models.experiments style
    python -m toy_models.experiments domain     # full-parameter fine-tuning to the pastel domain
    python -m toy_models.experiments ablations  # teacher modes, loss space, K, gradient strategy,
                                                # teacher reference (moved vs raw target), σ = 1 step
    python -m toy_models.experiments scopes     # what is trained: prompt-gated LoRA, token-local
                                                # k/v LoRA, all parameters (known-concept damage)

Every run is evaluated at 4 steps (and SFT also at 32) over ``--gen-seeds`` generation seeds
for each of ``--train-seeds`` training seeds. Each table reports the mean per metric and, for
every method, the paired difference to D-OPSD (same training seed and generation seed) with
a 95% t-interval. Results go to ``--out/<suite>/results.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.evaluate import eval_prompts, evaluate_student, load_evaluator
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import run_finetune

METRICS = ("concept_acc", "unseen_acc", "known_acc", "known_fid", "known_palette", "concept_palette", "concept_fid")
# two-sided 95% t quantiles for df = 1..30 (beyond: normal)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


SUITES = ("concept", "style", "domain", "ablations", "scopes")


@dataclass(frozen=True)
class Variant:
    """One row of a suite: a name, config changes, and the sampling steps for evaluation."""

    name: str
    changes: dict[str, Any]
    eval_steps: int = 4
    reuse: str | None = None  # evaluate the trained model of another variant (e.g. SFT at 32 steps)


def suite(name: str) -> tuple[dict[str, Any], list[Variant]]:
    """Base config changes and the variants of a named suite."""
    methods = [Variant("D-OPSD", {"method": "dopsd"}), Variant("SFT", {"method": "sft"}),
               Variant("SFT, 32 steps", {}, 32, reuse="SFT"),
               Variant("off-policy distillation", {"method": "offpolicy"}),
               Variant("SFT on teacher samples", {"method": "sft_teacher"})]
    if name == "concept":
        return {"data": "concept:ell"}, methods
    if name == "style":
        return {"data": "style:hstripe", "teacher_ref_period": 2}, methods
    if name == "domain":
        return {"data": "domain:pastel", "scope": "full", "num_targets": 64, "lr": 1e-4, "ema_decay": 0.999}, methods[:3]
    if name == "ablations":
        return {"data": "concept:ell"}, [
            Variant("D-OPSD (EMA 0.999, x0, K=4)", {"method": "dopsd"}),
            Variant("teacher = live copy", {"method": "dopsd", "teacher": "live"}),
            Variant("teacher = frozen base", {"method": "dopsd", "teacher": "frozen"}),
            Variant("teacher = EMA 0.9", {"method": "dopsd", "ema_decay": 0.9}),
            Variant("teacher = EMA 0.9999", {"method": "dopsd", "ema_decay": 0.9999}),
            Variant("velocity-space loss", {"method": "dopsd", "space": "velocity"}),
            Variant("K = 2", {"method": "dopsd", "rollout_steps": 2}),
            Variant("K = 8", {"method": "dopsd", "rollout_steps": 8}),
            Variant("single backward", {"method": "dopsd", "grad_strategy": "single"}),
            Variant("teacher sees the raw target", {"method": "dopsd", "teacher_ref": "target"}),
            Variant("no loss on the σ = 1 step", {"method": "dopsd", "skip_first_steps": 1}),
        ]
    if name == "scopes":
        full = {"scope": "full", "lr": 2e-4}
        return {"data": "concept:ell"}, [
            Variant("D-OPSD", {"method": "dopsd"}),
            Variant("SFT", {"method": "sft"}),
            Variant("D-OPSD, all parameters", {"method": "dopsd", **full}),
            Variant("SFT, all parameters", {"method": "sft", **full}),
            Variant("D-OPSD, token-local k/v LoRA", {"method": "dopsd", "scope": "token_kv"}),
            Variant("SFT, token-local k/v LoRA", {"method": "sft", "scope": "token_kv"}),
        ]
    raise ValueError(f"unknown suite {name!r}; choose {', '.join(SUITES)}")


def run_suite(name: str, train_seeds: int, gen_seeds: int, steps: int, out: Path, device: str = "auto",
              model: str = "toy-dit-turbo4", progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every variant of a suite; write and return the table rows."""
    base_changes, variants = suite(name)
    cfg0 = FinetuneConfig(steps=steps, device=device, ckpt_every=0, model=model, **base_changes)
    targets = load_targets(cfg0.data, cfg0.num_targets, cfg0.data_seed)
    prompts = eval_prompts(targets)
    ev = load_evaluator()
    # per_seed[variant] = list over (train seed, gen seed) of metric dicts
    per_seed: dict[str, list[dict[str, float]]] = {}
    models: dict[tuple[str, int], Any] = {}
    t0 = time.time()
    for ts in range(train_seeds):
        for v in variants:
            if v.reuse is None:
                cfg = cfg0.replace(seed=ts, out=str(out / "runs" / f"{v.name.replace(' ', '_')}_seed{ts}"), **v.changes)
                models[(v.name, ts)] = run_finetune(cfg, targets=targets, progress=progress, overwrite=True).roles.module
            model = models[(v.reuse or v.name, ts)]
            m = evaluate_student(model, prompts, ev, [100 * ts + g for g in range(gen_seeds)], v.eval_steps,
                                 per_seed=True)
            per_seed.setdefault(v.name, []).extend(m["per_seed"])  # type: ignore[arg-type]
            print(f"[{name}] train seed {ts} {v.name:<32} " + " ".join(f"{k}={m[k]:.3f}" for k in METRICS))
    ref = variants[0].name
    rows = {}
    for v in variants:
        row = {}
        for k in METRICS:
            vals = [r[k] for r in per_seed[v.name]]
            diffs = [a[k] - b[k] for a, b in zip(per_seed[v.name], per_seed[ref])]
            row[k] = {"mean": mean_ci(vals)[0], "ci": mean_ci(vals)[1],
                      "diff_vs_ref": mean_ci(diffs)[0], "diff_ci": mean_ci(diffs)[1]}
        rows[v.name] = row
    lines = [f"# {name} suite", "",
             f"`python -m toy_models.experiments {name} --train-seeds {train_seeds} --gen-seeds {gen_seeds} --steps {steps}`"
             f" ({time.time() - t0:.0f} s). Mean over {train_seeds} training × {gen_seeds} generation seeds; "
             f"in brackets: paired difference to {ref!r} ± 95% CI.", "",
             "| variant | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for vname, row in rows.items():
        cells = []
        for k in METRICS:
            c = row[k]
            cell = f"{c['mean']:.3f}"
            if vname != ref:
                cell += f" ({c['diff_vs_ref']:+.3f} ± {c['diff_ci']:.3f})"
            cells.append(cell)
        lines.append(f"| {vname} | " + " | ".join(cells) + " |")
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    (folder / "results.json").write_text(json.dumps({"rows": rows, "per_seed": per_seed,
                                                     "config": cfg0.to_dict()}, indent=1))
    print("\n".join(lines))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--train-seeds", type=int, default=2)
    p.add_argument("--gen-seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="toy-dit-turbo4")
    p.add_argument("--out", default="outputs/experiments")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    run_suite(a.suite, a.train_seeds, a.gen_seeds, a.steps, Path(a.out), a.device, a.model)


if __name__ == "__main__":
    main()
