"""The full experiment suite: concept, style and domain fine-tuning, baselines and ablations.

    python -m toy_models.studies.experiments concept    [--train-seeds 2] [--gen-seeds 3] [--steps 150]
    python -m toy_models.studies.experiments style
    python -m toy_models.studies.experiments domain     # full-parameter fine-tuning to the pastel domain
    python -m toy_models.studies.experiments ablations  # teacher modes, loss space, K, gradient strategy,
                                                # teacher reference (moved vs raw target), σ = 1 step
    python -m toy_models.studies.experiments scopes     # what is trained: prompt-gated LoRA, token-local
                                                # k/v LoRA, all parameters (known-concept damage)

Every run is evaluated at 4 steps (and SFT also at 32) over ``--gen-seeds`` generation seeds
for each of ``--train-seeds`` training seeds. Each table reports the mean per metric and, for
every method, the paired difference to D-OPSD (same training seed and generation seed) with
a 95% t-interval. Results go to ``--out/<suite>/results.{md,json}``.

The paper's protocol, in miniature (default ``--train-seeds 3 --gen-seeds 3``; each writes
``--out/<command>.md``, ``.json`` and, where it draws one, ``.png``; ``--out`` defaults to
``docs/results``; ``--fast`` is a tiny smoke mode: 2 steps, 1 seed, a handful of prompts)::

    python -m toy_models.studies.experiments lora_table  # LoRA customization: base, SFT, SFT on teacher
                                                 # samples, off-policy distillation, DreamBooth
                                                 # (prior preservation), D-OPSD; ungated LoRA on
                                                 # attention + MLP, plus the prompt-gated adapter
    python -m toy_models.studies.experiments full_table  # all parameters, held-out pastel domain
    python -m toy_models.studies.experiments curves      # metric vs step: strategies and teacher kinds,
                                                 # steps to threshold, area under the curve
    python -m toy_models.studies.experiments lr_sweep    # learning rates of D-OPSD and SFT: fidelity vs
                                                 # retention frontier, matched-fidelity comparison
    python -m toy_models.studies.experiments options     # reconstruction loss λ and the K curriculum
    python -m toy_models.studies.experiments retention   # why ungated D-OPSD forgets known prompts: leak
                                                 # of the concept into them, and two changes that
                                                 # test the reason (on-policy prior batch, no σ = 1 step)

Their paired differences to D-OPSD are computed per training seed (mean over its generation
seeds) and the 95% t-interval is taken over training seeds (with one training seed: over
generation seeds), since generation seeds of one trained model are not independent samples
of the training outcome.
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

from dopsd_ref import NonFiniteLossError
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.evaluate import METRICS as EVAL_METRICS, make_eval_prompts, evaluate_student, load_evaluator
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import run_finetune

METRICS = tuple(key for key, _ in EVAL_METRICS)  # column keys of the suite tables
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
    prompts = make_eval_prompts(targets)
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
             f"`python -m toy_models.studies.experiments {name} --train-seeds {train_seeds} --gen-seeds {gen_seeds} --steps {steps}`"
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


# ----------------------------------------------------------------------------------------
# The paper's protocol in miniature: LoRA and full fine-tuning tables, learning curves,
# learning-rate sweep, and the two core options.
# ----------------------------------------------------------------------------------------

COMMANDS = ("lora_table", "full_table", "curves", "lr_sweep", "options", "retention")
BASE_ROW = "base (no fine-tuning)"
# metric key -> column label (↑ higher is better, ↓ lower is better)
LABELS = {
    "concept_acc": "concept acc ↑",
    "concept_dino_d": "DINO-D analogue ↓",
    "concept_fid": "concept toy-FID ↓ (4 steps)",
    "known_acc": "retention: known acc ↑",
    "known_fid": "retention: known toy-FID ↓",
    "unseen_acc": "unseen recombinations acc ↑",
    "known_leak": "known prompts drawn as the concept ↓",
}
TABLE_METRICS = ("concept_acc", "concept_dino_d", "concept_fid", "known_acc", "known_fid", "unseen_acc")
DOMAIN_LABELS = {"concept_acc": "domain acc ↑", "concept_fid": "toy-FID vs domain renders ↓",
                 "concept_dino_d": "DINO-D analogue ↓", "known_acc": "retention: known-shape acc ↑",
                 "known_fid": "known prompts toy-FID ↓ (vs domain renders)", "unseen_acc": "unseen recombinations acc ↑"}


@dataclass(frozen=True)
class Protocol:
    """Shared settings of the protocol commands.

    Attributes:
        train_seeds, gen_seeds: training seeds, and generation seeds per trained model
            (training seed ts uses generation seeds 100·ts + g, g < gen_seeds).
        steps: fine-tuning steps per run.
        fast: tiny smoke mode (3 targets, batch 2, 4 prior pairs, 2 unseen and 4 known prompts).
        eval_every: evaluation period of the learning curves (steps).
        lr: learning rate of every run of a table command (``None``: each table's own); the
            table is then written as ``<command>_lr<lr>.{md,json}``.
    """

    train_seeds: int = 3
    gen_seeds: int = 3
    steps: int = 150
    device: str = "auto"
    model: str = "toy-dit-turbo4"
    fast: bool = False
    eval_every: int = 10
    progress: bool = True
    lr: float | None = None

    def config(self, **changes: Any) -> FinetuneConfig:
        if self.lr is not None:
            changes = {**changes, "lr": self.lr}
        small = {"num_targets": 3, "batch_size": 2, "prior_images": 4} if self.fast else {}
        return FinetuneConfig(steps=self.steps, device=self.device, ckpt_every=0, model=self.model,
                              **{**changes, **small} if self.fast else changes)

    def prompts(self, targets):
        return make_eval_prompts(targets, n_unseen=2, n_known=4) if self.fast else make_eval_prompts(targets)

    def gen_seed_list(self, ts: int) -> list[int]:
        return [100 * ts + g for g in range(self.gen_seeds)]


def paired_summary(per_seed: dict[str, list[dict[str, Any]]], ref: str, metrics: tuple[str, ...]
                   ) -> dict[str, dict[str, dict[str, float]]]:
    """Mean per metric and the paired difference to ``ref`` with its 95% t-interval.

    Rows of ``per_seed`` carry ``train_seed`` and ``gen_seed``; a row of one method is paired
    with ``ref``'s row of the same (training seed, generation seed). The difference is
    averaged within each training seed and the interval (:func:`mean_ci`) taken over the
    training seeds; with a single training seed, over its generation seeds.
    """
    ref_rows = {(r["train_seed"], r["gen_seed"]): r for r in per_seed[ref]}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, rows in per_seed.items():
        out[name] = {}
        for k in metrics:
            diffs: dict[int, list[float]] = {}
            for r in rows:
                diffs.setdefault(r["train_seed"], []).append(r[k] - ref_rows[(r["train_seed"], r["gen_seed"])][k])
            units = [float(np.mean(d)) for d in diffs.values()] if len(diffs) >= 2 else next(iter(diffs.values()))
            mean, ci = mean_ci([r[k] for r in rows])
            d_mean, d_ci = mean_ci(units)
            out[name][k] = {"mean": mean, "ci": ci, "diff_vs_ref": d_mean, "diff_ci": d_ci}
    return out


def _fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def markdown_table(rows: dict[str, dict[str, dict[str, float]]], ref: str | None, metrics: tuple[str, ...],
                   labels: dict[str, str], first: str = "method") -> list[str]:
    """Markdown rows: mean, and for every row but ``ref`` the paired difference ± 95% CI
    (``ref=None``: mean ± 95% CI of the mean instead)."""
    lines = [f"| {first} | " + " | ".join(labels.get(k, k) for k in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for k in metrics:
            c = row[k]
            cell = _fmt(c["mean"])
            if ref is None:
                cell += f" ± {_fmt(c['ci'])}" if c["mean"] == c["mean"] else ""
            elif name != ref:
                d = c["diff_vs_ref"]
                cell += f" ({d:+.3f} ± {_fmt(c['diff_ci'])})" if d == d else " (n/a)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _write(out: Path, name: str, md: list[str], data: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
    return out / f"{name}.md"


def _header(title: str, command: str, seconds: float, proto: Protocol, ref: str) -> list[str]:
    import torch

    units = "training seeds" if proto.train_seeds >= 2 else "generation seeds (one training seed)"
    return [f"# {title}", "",
            f"Produced by `{command}` in {seconds:.0f} s ({torch.get_num_threads()} CPU threads"
            f"{', fast smoke mode: not a result' if proto.fast else ''}).",
            f"Model `{proto.model}`, {proto.steps} fine-tuning steps, {proto.train_seeds} training × {proto.gen_seeds}"
            f" generation seeds, every model sampled at 4 steps. Cells: mean; in brackets: paired difference to"
            f" {ref!r} ± 95% t-interval over {units}.", ""]


def _train(proto: Protocol, cfg: FinetuneConfig, targets, evaluate=None):
    return run_finetune(cfg, targets=targets, evaluate=evaluate, progress=proto.progress, write=False)


def run_table(name: str, title: str, proto: Protocol, base_changes: dict[str, Any], variants: list[Variant],
              ref: str, out: Path, command: str, labels: dict[str, str] = LABELS,
              metrics: tuple[str, ...] = TABLE_METRICS, notes: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train every variant for each training seed, evaluate, and write ``out/<name>.{md,json}``.

    A variant with ``reuse="base"`` is the untouched model; ``reuse=<name>`` evaluates the
    trained model of another variant (e.g. at another step count).
    """
    from toy_models.finetune.train import load_model, resolve_device

    t0 = time.time()
    if proto.lr is not None:
        name = f"{name}_lr{proto.lr:g}"
    cfg0 = proto.config(**base_changes)
    targets = load_targets(cfg0.data, cfg0.num_targets, cfg0.data_seed)
    prompts = proto.prompts(targets)
    ev = load_evaluator()
    device = resolve_device(cfg0.device)
    base = load_model(cfg0.model, device).eval()
    per_seed: dict[str, list[dict[str, Any]]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for ts in range(proto.train_seeds):
        models: dict[str, Any] = {"base": base}
        for v in variants:
            if v.reuse is None:
                cfg = cfg0.replace(seed=ts, **v.changes)
                configs[v.name] = cfg.to_dict()
                models[v.name] = _train(proto, cfg, targets).roles.module.eval()
            seeds = proto.gen_seed_list(ts)
            m = evaluate_student(models[v.reuse or v.name], prompts, ev, seeds, v.eval_steps, device, per_seed=True)
            per_seed.setdefault(v.name, []).extend(
                {**r, "train_seed": ts, "gen_seed": g} for r, g in zip(m["per_seed"], seeds))  # type: ignore[arg-type]
            print(f"[{name}] train seed {ts} {v.name:<40} " + " ".join(f"{k}={m[k]:.3f}" for k in metrics), flush=True)
    rows = paired_summary(per_seed, ref, metrics)
    md = _header(title, command, time.time() - t0, proto, ref) + list(notes) + [""] + markdown_table(rows, ref, metrics, labels)
    path = _write(out, name, md, {"command": command, "rows": rows, "per_seed": per_seed, "base_config": cfg0.to_dict(),
                                  "configs": configs, "wall_clock_s": time.time() - t0})
    print("\n".join(md) + f"\n[{name}] wrote {path}")
    return rows


def lora_table(proto: Protocol, out: Path, command: str) -> dict[str, Any]:
    """Paper Table 1 analogue: LoRA customization on the held-out "L" concept (``sks``).

    Every method trains the same ungated LoRA (``scope="lora"``: attention + MLP of every
    block, rank 8, active for all prompts, plus the ``sks`` embedding offset), so known prompts
    can change and retention is measured. Two extra rows train the prompt-gated adapter (the
    toy's locality option: known prompts untouched by construction).
    """
    variants = [
        Variant(BASE_ROW, {}, reuse="base"),
        Variant("SFT", {"method": "sft"}),
        Variant("SFT on teacher samples", {"method": "sft_teacher"}),
        Variant("off-policy distillation", {"method": "offpolicy"}),
        Variant("DreamBooth (prior preservation)", {"method": "dreambooth"}),
        Variant("D-OPSD", {"method": "dopsd"}),
        Variant("SFT, prompt-gated LoRA", {"method": "sft", "scope": "prompt_gated"}),
        Variant("D-OPSD, prompt-gated LoRA", {"method": "dopsd", "scope": "prompt_gated"}),
    ]
    cfg = proto.config(data="concept:ell", scope="lora")
    notes = (f"Adapter: LoRA rank {cfg.lora_rank} (α {cfg.lora_alpha}) on self-attention, cross-attention and MLP of every"
             f" block, active for every prompt, plus the `sks` embedding offset; lr {cfg.lr}, batch {cfg.batch_size},"
             f" K = {cfg.rollout_steps}, EMA {cfg.ema_decay}. DreamBooth: flow matching on the targets + {cfg.prior_weight}"
             f" × flow matching on {cfg.prior_images} prior pairs (the base model's 4-step samples of known-shape prompts)."
             " Retention columns: known-shape prompts without `sks` (the GenEval analogue). Prompt-gated rows: the"
             " adapter is off for prompts without `sks`, so their retention equals the base by construction.",)
    return run_table("lora_table", "LoRA customization (paper Table 1 analogue)", proto,
                     {"data": "concept:ell", "scope": "lora"}, variants, "D-OPSD", out, command, notes=notes)


def full_table(proto: Protocol, out: Path, command: str) -> dict[str, Any]:
    """Paper Table 2 analogue: all parameters fine-tuned to the held-out pastel domain."""
    changes = {"data": "domain:pastel", "scope": "full", "num_targets": 64, "lr": 1e-4, "ema_decay": 0.999}
    variants = [Variant(BASE_ROW, {}, reuse="base"), Variant("SFT", {"method": "sft"}), Variant("D-OPSD", {"method": "dopsd"})]
    cfg = proto.config(**changes)
    notes = (f"All {cfg.num_targets} targets are pastel renders with ordinary captions; every parameter trains (lr {cfg.lr},"
             f" EMA {cfg.ema_decay} full-parameter teacher). Domain acc: share of train-prompt samples the evaluator calls"
             " pastel; toy-FID: train + unseen prompts vs their pastel renders; retention: shape accuracy on known-shape"
             " prompts (toy-FID vs their pastel renders).",)
    return run_table("full_table", "Full fine-tuning to a held-out domain (paper Table 2 analogue)", proto, changes,
                     variants, "D-OPSD", out, command, labels=DOMAIN_LABELS, notes=notes)


def options_table(proto: Protocol, out: Path, command: str) -> dict[str, Any]:
    """Ablation of the two core options on the LoRA setting: reconstruction loss λ, K curriculum."""
    half = max(1, proto.steps // 2)
    variants = [
        Variant("D-OPSD (λ = 0, K = 4)", {"method": "dopsd"}),
        Variant("+ reconstruction loss λ = 0.1", {"method": "dopsd", "recon_weight": 0.1}),
        Variant("+ reconstruction loss λ = 1", {"method": "dopsd", "recon_weight": 1.0}),
        Variant(f"K curriculum 2 → 4 at step {half}", {"method": "dopsd", "rollout_schedule": f"0:2,{half}:4"}),
        Variant("K = 2 throughout", {"method": "dopsd", "rollout_steps": 2}),
    ]
    notes = ("Ungated LoRA (as in `lora_table`). λ: weight of the auxiliary flow-matching loss on the targets (student,"
             " text context) added to the roll-out loss; K curriculum: roll-out length per optimizer step"
             " (`rollout_schedule`). Sampling is always 4 steps.",)
    return run_table("options", "Reconstruction loss and K curriculum (ablation)", proto,
                     {"data": "concept:ell", "scope": "lora"}, variants, variants[0].name, out, command, notes=notes)


def retention_table(proto: Protocol, out: Path, command: str) -> dict[str, Any]:
    """Why D-OPSD with an ungated LoRA forgets known prompts, and a change that tests the reason.

    Hypothesis: D-OPSD trains on the states the student visits from pure noise, and at high
    noise those states are the same for every prompt; the concept prompts differ from known
    ones only in the ``sks`` token, so the cheapest way to fit the teacher there is to draw
    the concept for every prompt. SFT trains on noised targets, states the known prompts'
    roll-outs rarely visit. Predictions: known prompts' samples turn into the concept
    (``known_leak``); holding the student to its own text-only behaviour on known prompts' own
    roll-outs (``dopsd_prior``: the on-policy analogue of prior preservation) removes the leak
    while keeping the concept; leaving out the σ = 1 step (the one fully shared state) helps
    less, since the next states are still shared before the layout forms.
    """
    variants = [
        Variant(BASE_ROW, {}, reuse="base"),
        Variant("SFT", {"method": "sft"}),
        Variant("DreamBooth (prior preservation)", {"method": "dreambooth"}),
        Variant("D-OPSD", {"method": "dopsd"}),
        Variant("D-OPSD + on-policy prior batch", {"method": "dopsd_prior"}),
        Variant("D-OPSD, σ = 1 step not trained", {"method": "dopsd", "skip_first_steps": 1}),
    ]
    cfg = proto.config(data="concept:ell", scope="lora")
    notes = (f"Ungated LoRA as in `lora_table` (lr {cfg.lr}, {cfg.steps} steps). `D-OPSD + on-policy prior batch`"
             f" (method `dopsd_prior`): each step adds a micro-batch as large as the target batch of known-shape prompts"
             f" (from the {cfg.prior_images} DreamBooth prior captions), where the student rolls out from noise and the EMA"
             " teacher sees the same text only, L = ½ (L_targets + L_prior): about twice D-OPSD's compute."
             " `σ = 1 step not trained`: `skip_first_steps = 1` (the first roll-out state is pure noise for every prompt)."
             " Last column: share of known-prompt samples (no `sks`) the evaluator calls the new concept.",)
    metrics = (*TABLE_METRICS, "known_leak")
    return run_table("retention", "Retention under an ungated LoRA: the concept leaking into known prompts", proto,
                     {"data": "concept:ell", "scope": "lora"}, variants, "D-OPSD", out, command, metrics=metrics,
                     notes=notes)


CURVE_METRICS = ("concept_acc", "concept_fid", "known_acc")


def steps_to_threshold(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first evaluated step whose value is >= ``threshold`` (None: never reached)."""
    for s, v in zip(steps, values):
        if v >= threshold:
            return s
    return None


def normalized_auc(steps: list[int], values: list[float]) -> float:
    """Area under the curve by the trapezoid rule over the evaluated steps, divided by the span
    (the curve's mean value over training: 1 for an accuracy that is 1 from the start)."""
    if len(steps) < 2:
        return float(values[0]) if values else float("nan")
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return float(area / (steps[-1] - steps[0]))


def curve_variants(group: str) -> list[Variant]:
    """Paper Fig. 6a (training strategies) and Fig. 6b (teacher kinds) as config changes."""
    if group == "strategies":
        return [Variant("D-OPSD", {"method": "dopsd"}), Variant("SFT", {"method": "sft"}),
                Variant("SFT on teacher samples", {"method": "sft_teacher"}),
                Variant("off-policy distillation", {"method": "offpolicy"})]
    if group == "teachers":
        return [Variant("D-OPSD", {"method": "dopsd"}),  # EMA 0.999: the toy default
                Variant("teacher = live copy", {"method": "dopsd", "teacher": "live"}),
                Variant("teacher = frozen base", {"method": "dopsd", "teacher": "frozen"}),
                Variant("teacher = EMA 0.9", {"method": "dopsd", "ema_decay": 0.9}),
                Variant("teacher = EMA 0.9999", {"method": "dopsd", "ema_decay": 0.9999})]
    raise ValueError(f"unknown curve group {group!r}")


def curves(proto: Protocol, out: Path, command: str, scope: str = "lora", threshold: float = 0.8,
           group_names: tuple[str, ...] = ("strategies", "teachers")) -> dict[str, Any]:
    """Metric vs step for the training strategies and teacher kinds; steps to threshold and AUC.

    Each run is evaluated every ``proto.eval_every`` steps (and at 0 and the end) over the
    generation seeds of its training seed. Per run: steps until concept accuracy first
    reaches ``threshold`` (not reached: counted as the run length, a lower bound — the number
    reached is reported), the normalized area under the concept-accuracy curve (its mean
    over training) and under the known-prompt accuracy curve. Paired differences to D-OPSD
    over training seeds. ``group_names``: which of the two figures to run. With ``proto.lr``
    the files are ``curves_lr<lr>.{md,json,png}``.
    """
    import warnings

    from dopsd_ref import LiveTeacherWarning

    t0 = time.time()
    cfg0 = proto.config(data="concept:ell", scope=scope, eval_every=proto.eval_every)
    targets = load_targets(cfg0.data, cfg0.num_targets, cfg0.data_seed)
    prompts = proto.prompts(targets)
    ev = load_evaluator()
    groups = {g: curve_variants(g) for g in group_names}
    name = "curves" if proto.lr is None else f"curves_lr{proto.lr:g}"
    names = list(dict.fromkeys(v.name for vs in groups.values() for v in vs))
    changes = {v.name: v.changes for vs in groups.values() for v in vs}
    logs: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    for ts in range(proto.train_seeds):
        seeds = proto.gen_seed_list(ts)

        def evaluate(roles, step, seeds=seeds):
            return evaluate_student(roles.module, prompts, ev, seeds, 4, next(roles.module.parameters()).device)

        for n in names:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LiveTeacherWarning)
                res = _train(proto, cfg0.replace(seed=ts, **changes[n]), targets, evaluate)
            log = [{k: r[k] for k in ("step", *CURVE_METRICS, "concept_dino_d", "known_fid", "unseen_acc")}
                   for r in res.log if "concept_acc" in r]
            logs[n].append(log)
            print(f"[curves] train seed {ts} {n:<28} final " + " ".join(f"{k}={log[-1][k]:.3f}" for k in CURVE_METRICS),
                  flush=True)
    summary_keys = ("steps_to_threshold", "auc_concept_acc", "auc_known_acc", "final_concept_acc", "final_concept_fid",
                    "final_known_acc")
    per_run: dict[str, list[dict[str, Any]]] = {}
    reached: dict[str, int] = {}
    for n in names:
        per_run[n] = []
        reached[n] = 0
        for ts, log in enumerate(logs[n]):
            steps = [r["step"] for r in log]
            hit = steps_to_threshold(steps, [r["concept_acc"] for r in log], threshold)
            reached[n] += hit is not None
            per_run[n].append({"train_seed": ts, "gen_seed": 0,
                               "steps_to_threshold": float(hit if hit is not None else steps[-1]),
                               "auc_concept_acc": normalized_auc(steps, [r["concept_acc"] for r in log]),
                               "auc_known_acc": normalized_auc(steps, [r["known_acc"] for r in log]),
                               "final_concept_acc": log[-1]["concept_acc"], "final_concept_fid": log[-1]["concept_fid"],
                               "final_known_acc": log[-1]["known_acc"]})
    labels = {"steps_to_threshold": f"steps to concept acc ≥ {threshold} ↓", "auc_concept_acc": "AUC concept acc ↑",
              "auc_known_acc": "AUC known acc ↑", "final_concept_acc": "final concept acc ↑",
              "final_concept_fid": "final concept toy-FID ↓", "final_known_acc": "final known acc ↑"}
    md = _header("Learning curves: training strategies and teacher kinds (paper Fig. 6 analogue)", command,
                 time.time() - t0, proto, "D-OPSD")
    md[-2] = md[-2].replace("over generation seeds (one training seed)", "(one training seed: no interval)")
    md += [f"Scope `{scope}`, evaluated every {proto.eval_every} steps over the generation seeds. Steps to threshold:"
           f" the first evaluation at which concept accuracy ≥ {threshold}; a run that never reaches it counts as"
           f" {proto.steps} (a lower bound), and `reached` says how many training seeds did. AUC: trapezoid area under"
           " the curve divided by the step span (the mean over training). D-OPSD uses the EMA 0.999 teacher (the toy"
           " default) and is the same run in both tables.", ""]
    for g, vs in groups.items():
        rows = paired_summary({v.name: per_run[v.name] for v in vs}, "D-OPSD", summary_keys)
        table = markdown_table(rows, "D-OPSD", summary_keys, labels, first={"strategies": "strategy", "teachers": "teacher"}[g])
        table[0] = table[0][:-1] + "| reached |"
        table[1] += "---|"
        table[2:] = [line + f" {reached[v.name]}/{proto.train_seeds} |" for line, v in zip(table[2:], vs)]
        md += [f"## {g}", ""] + table + [""]
    plot_curves(logs, groups, out / f"{name}.png", threshold)
    md += [f"![learning curves]({name}.png)"]
    path = _write(out, name, md, {"command": command, "logs": logs, "per_run": per_run, "reached": reached,
                                      "threshold": threshold, "config": cfg0.to_dict(), "wall_clock_s": time.time() - t0})
    print("\n".join(md) + f"\n[{name}] wrote {path}")
    return {"logs": logs, "per_run": per_run}


def plot_curves(logs: dict[str, list[list[dict[str, Any]]]], groups: dict[str, list[Variant]], path: Path,
                threshold: float) -> None:
    """One row per group, one column per metric: mean over training seeds with a 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"concept_acc": "concept accuracy (4 steps)", "concept_fid": "concept toy-FID", "known_acc": "known-prompt accuracy"}
    fig, axes = plt.subplots(len(groups), len(CURVE_METRICS), figsize=(5 * len(CURVE_METRICS), 3.6 * len(groups)),
                             squeeze=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, (g, vs) in enumerate(groups.items()):
        for j, k in enumerate(CURVE_METRICS):
            ax = axes[i][j]
            for v in vs:
                runs = logs[v.name]
                steps = [r["step"] for r in runs[0]]
                stats = [mean_ci([run[t][k] for run in runs]) for t in range(len(steps))]
                mean = np.array([m for m, _ in stats])
                ci = np.nan_to_num(np.array([c for _, c in stats]))
                ax.plot(steps, mean, marker="o", ms=3, label=v.name)
                ax.fill_between(steps, mean - ci, mean + ci, alpha=0.15)
            if k == "concept_acc":
                ax.axhline(threshold, color="gray", lw=0.8, ls="--")
            ax.set_title(f"{g}: {titles[k]}")
            ax.set_xlabel("fine-tuning step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LR_GRIDS = {"full": (3e-5, 1e-4, 3e-4, 1e-3), "default": (3e-4, 1e-3, 3e-3, 1e-2)}


def frontier_at(points: list[tuple[float, float]], fidelity: float) -> float:
    """Best retention among (fidelity, retention) points with fidelity >= ``fidelity`` (NaN: none)."""
    ok = [r for f, r in points if f >= fidelity]
    return max(ok) if ok else float("nan")


def lr_sweep(proto: Protocol, out: Path, command: str, scope: str = "lora", lrs: tuple[float, ...] | None = None,
             levels: tuple[float, ...] = (0.5, 0.7, 0.9)) -> dict[str, Any]:
    """Learning-rate sweep of D-OPSD and SFT where known prompts can change (``scope``).

    Every (method, lr) trains once per training seed and is evaluated at the end: concept
    fidelity (concept accuracy) against retention (known-prompt accuracy). Matched-fidelity
    comparison: per training seed, each method's best retention over the learning rates that
    reach concept accuracy >= f, for each level f; the paired difference D-OPSD − SFT is taken
    over the training seeds where both reach f (their number is reported).
    """
    t0 = time.time()
    lrs = lrs or (LR_GRIDS["full"] if scope == "full" else LR_GRIDS["default"])
    cfg0 = proto.config(data="concept:ell", scope=scope)
    targets = load_targets(cfg0.data, cfg0.num_targets, cfg0.data_seed)
    prompts = proto.prompts(targets)
    ev = load_evaluator()
    methods = {"D-OPSD": "dopsd", "SFT": "sft"}
    per_seed: dict[str, list[dict[str, Any]]] = {}
    for ts in range(proto.train_seeds):
        for mname, method in methods.items():
            for lr in lrs:
                name = f"{mname}, lr {lr:g}"
                seeds = proto.gen_seed_list(ts)
                try:
                    model = _train(proto, cfg0.replace(seed=ts, method=method, lr=lr), targets).roles.module.eval()
                except NonFiniteLossError as exc:  # a too-large lr: recorded as diverged (NaN), the sweep goes on
                    print(f"[lr_sweep] train seed {ts} {name}: diverged ({exc})", flush=True)
                    nan = {k: float("nan") for k in TABLE_METRICS}
                    m = {**nan, "per_seed": [dict(nan) for _ in seeds]}
                else:
                    m = evaluate_student(model, prompts, ev, seeds, 4, next(model.parameters()).device, per_seed=True)
                per_seed.setdefault(name, []).extend(
                    {**r, "train_seed": ts, "gen_seed": g} for r, g in zip(m["per_seed"], seeds))  # type: ignore[arg-type]
                print(f"[lr_sweep] train seed {ts} {name:<22} concept_acc={m['concept_acc']:.3f} "
                      f"known_acc={m['known_acc']:.3f}", flush=True)
    # means per (method, lr, train seed)
    point: dict[tuple[str, float, int], tuple[float, float]] = {}
    for mname in methods:
        for lr in lrs:
            for ts in range(proto.train_seeds):
                rs = [r for r in per_seed[f"{mname}, lr {lr:g}"] if r["train_seed"] == ts]
                point[(mname, lr, ts)] = (float(np.mean([r["concept_acc"] for r in rs])),
                                          float(np.mean([r["known_acc"] for r in rs])))
    matched = []
    for f in levels:
        per_ts = {m: [frontier_at([point[(m, lr, ts)] for lr in lrs], f) for ts in range(proto.train_seeds)]
                  for m in methods}
        both = [(a, b) for a, b in zip(per_ts["D-OPSD"], per_ts["SFT"]) if a == a and b == b]
        d_mean, d_ci = mean_ci([a - b for a, b in both]) if both else (float("nan"), float("nan"))
        matched.append({"fidelity": f, "dopsd_retention": per_ts["D-OPSD"], "sft_retention": per_ts["SFT"],
                        "seeds_both": len(both), "diff": d_mean, "diff_ci": d_ci})
    ref = f"D-OPSD, lr {lrs[0]:g}"  # only for the JSON's paired differences; the table shows mean ± CI
    rows = paired_summary(per_seed, ref, TABLE_METRICS)
    md = _header(f"Learning-rate sweep: fidelity vs retention (scope `{scope}`)", command, time.time() - t0, proto, ref)
    md[-2] = md[-2].split(" Cells:")[0] + " Cells: mean ± 95% t-interval over all (training, generation) seeds."
    md += [f"Learning rates {', '.join(f'{lr:g}' for lr in lrs)}; every run sampled at 4 steps. Retention = accuracy on"
           " known-shape prompts without `sks`. A run whose loss became NaN/inf is shown as n/a (diverged).", ""]
    md += markdown_table(rows, None, TABLE_METRICS, LABELS) + [""]
    md += ["## Matched fidelity", "",
           "Per training seed, each method's best retention over the learning rates whose concept accuracy reaches the"
           " level; D-OPSD − SFT over the training seeds where both reach it.", "",
           "| concept acc ≥ | D-OPSD best retention | SFT best retention | D-OPSD − SFT | seeds (both reach) |",
           "|---|---|---|---|---|"]
    for r in matched:
        da, sa = [v for v in r["dopsd_retention"] if v == v], [v for v in r["sft_retention"] if v == v]
        md.append(f"| {r['fidelity']} | {_fmt(float(np.mean(da))) if da else 'not reached'} | "
                  f"{_fmt(float(np.mean(sa))) if sa else 'not reached'} | "
                  f"{_fmt(r['diff'])} ± {_fmt(r['diff_ci'])} | {r['seeds_both']}/{proto.train_seeds} |")
    plot_frontier(point, methods, lrs, proto.train_seeds, out / "lr_sweep.png", scope)
    md += ["", "![fidelity vs retention](lr_sweep.png)"]
    path = _write(out, "lr_sweep", md, {"command": command, "rows": rows, "per_seed": per_seed, "matched": matched,
                                        "lrs": list(lrs), "config": cfg0.to_dict(), "wall_clock_s": time.time() - t0})
    print("\n".join(md) + f"\n[lr_sweep] wrote {path}")
    return {"rows": rows, "matched": matched}


def plot_frontier(point, methods, lrs, train_seeds: int, path: Path, scope: str) -> None:
    """Concept fidelity (y) against retention (x), one line per method through its learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for m in methods:
        xs, ys, xe, ye = [], [], [], []
        for lr in lrs:
            f_m, f_ci = mean_ci([point[(m, lr, ts)][0] for ts in range(train_seeds)])
            r_m, r_ci = mean_ci([point[(m, lr, ts)][1] for ts in range(train_seeds)])
            xs.append(r_m), ys.append(f_m), xe.append(np.nan_to_num(r_ci)), ye.append(np.nan_to_num(f_ci))
        ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", capsize=3, label=m)
        for x, y, lr in zip(xs, ys, lrs):
            ax.annotate(f"{lr:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("retention: known-prompt accuracy")
    ax.set_ylabel("concept fidelity: concept accuracy")
    ax.set_title(f"learning-rate sweep (scope {scope}), 4 steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_command(name: str, proto: Protocol, out: Path, command: str, scope: str | None = None,
                lrs: tuple[float, ...] | None = None, threshold: float = 0.8,
                groups: tuple[str, ...] = ("strategies", "teachers")) -> dict[str, Any]:
    """Dispatch one protocol command (see the module doc)."""
    if name == "lora_table":
        return lora_table(proto, out, command)
    if name == "full_table":
        return full_table(proto, out, command)
    if name == "options":
        return options_table(proto, out, command)
    if name == "retention":
        return retention_table(proto, out, command)
    if name == "curves":
        return curves(proto, out, command, scope or "lora", threshold, groups)
    if name == "lr_sweep":
        return lr_sweep(proto, out, command, scope or "lora", lrs)
    raise ValueError(f"unknown command {name!r}; choose {', '.join(COMMANDS)}")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=SUITES + COMMANDS)
    p.add_argument("--train-seeds", type=int, default=None, help="default: 2 for suites, 3 for the protocol commands")
    p.add_argument("--gen-seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="toy-dit-turbo4")
    p.add_argument("--out", default=None, help="default: outputs/experiments for suites, docs/results for commands")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--fast", action="store_true", help="protocol commands: tiny smoke mode (2 steps, 1 seed, few prompts)")
    p.add_argument("--eval-every", type=int, default=10, help="curves: evaluation period in steps")
    p.add_argument("--threshold", type=float, default=0.8, help="curves: concept accuracy for steps-to-threshold")
    p.add_argument("--scope", default=None, help="curves, lr_sweep: adapter scope (default 'lora', ungated)")
    p.add_argument("--lrs", default=None, help="lr_sweep: comma-separated learning rates")
    p.add_argument("--groups", default="strategies,teachers", help="curves: which figures (strategies, teachers)")
    p.add_argument("--lr", type=float, default=None,
                   help="table commands and curves: one learning rate for every run, written as <command>_lr<lr>.md")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.suite in SUITES:
        run_suite(a.suite, a.train_seeds or 2, a.gen_seeds, a.steps, Path(a.out or "outputs/experiments"), a.device, a.model)
        return
    if a.fast:
        proto = Protocol(train_seeds=1, gen_seeds=1, steps=2, device=a.device, model=a.model, fast=True, eval_every=1,
                         progress=False, lr=a.lr)
    else:
        proto = Protocol(a.train_seeds or 3, a.gen_seeds, a.steps, a.device, a.model, False, a.eval_every, lr=a.lr)
    lrs = tuple(float(v) for v in a.lrs.split(",")) if a.lrs else ((1e-3, 1e-2) if a.fast else None)
    command = "python -m toy_models.studies.experiments " + " ".join(argv)
    groups = tuple(g.strip() for g in a.groups.split(",") if g.strip())
    if not groups or set(groups) - {"strategies", "teachers"}:
        p.error(f"--groups must name strategies and/or teachers, got {a.groups!r}")
    run_command(a.suite, proto, Path(a.out or "docs/results"), command, a.scope, lrs, a.threshold, groups)


if __name__ == "__main__":
    main()
