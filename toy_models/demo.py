"""The main job: D-OPSD vs SFT vs the untouched base on the shipped 4-step toy model.

Learns the held-out "L" glyph (never seen in base training), named by the rare token
``sks``, from a few image–caption pairs in the paper's setting: an ungated LoRA on attention
+ MLP of every block, active for every prompt, so prompts without ``sks`` can change and
retention on known prompts is measured (accuracy, toy-FID; paired differences to the base).
Both objectives get the same adapter, learning rate and step budget, plus SFT with
``--sft-factor`` times the steps (about D-OPSD's compute); every model is evaluated at its
native 4 steps over several generation seeds. The D-OPSD teacher sees the target moved to
the student's layout (:mod:`toy_models.finetune.reference`). Writes to ``--out``:

* ``results.md`` / ``results.json`` — the table (and per-seed values, curves, settings);
* ``targets.png``, ``teacher_samples.png``, ``samples_<model>_<prompts>.png`` — grids;
* ``curves.png`` — loss, concept accuracy and toy-FID against fine-tuning steps.

    python -m toy_models.demo [--steps 150] [--seed 0] [--out outputs/demo] [--device auto] [--sft-factor 4]
                              [--scope lora|prompt_gated|...] [--lr LR]

The default learning rate depends on the scope: 3e-4 for the ungated ``lora`` (the rate
with the best retention in ``docs/results/lr_sweep.md``, for both methods; at 3e-3 D-OPSD
forgets known prompts, see ``docs/results/retention.md``), 3e-3 (the fine-tuning default)
otherwise. ``--scope prompt_gated`` is the toy's locality option: the adapter is on only
for prompts with ``sks``, so known prompts are untouched by construction.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import dopsd_ref
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.evaluate import METRICS, EvalPrompts, make_eval_prompts, evaluate_student, load_evaluator, sample_prompts
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import load_model, resolve_device, run_finetune



def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def results_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model, one column per metric."""
    head = "| model (4 steps unless noted) | " + " | ".join(label for _, label in METRICS) + " |"
    sep = "|---" * (len(METRICS) + 1) + "|"
    lines = [head, sep]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m[k]) for k, _ in METRICS) + " |")
    return "\n".join(lines)


def plot_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(21, 3.6))
    for name, log in logs.items():
        train = [r for r in log if "loss" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name, alpha=0.8)
        ev = [r for r in log if "concept_acc" in r]
        steps = [r["step"] for r in ev]
        axes[1].plot(steps, [r["concept_acc"] for r in ev], marker="o", label=name)
        axes[2].plot(steps, [r["known_acc"] for r in ev], marker="o", label=name)
        axes[3].plot(steps, [r["concept_fid"] for r in ev], marker="o", label=name)
        axes[4].plot(steps, [r["concept_palette"] for r in ev], marker="o", label=name)
    titles = ["training loss", "concept accuracy (4 steps)", "known-concept accuracy", "toy-FID (concept prompts)",
              "palette distance (concept prompts)"]
    for ax, t in zip(axes, titles):
        ax.set_title(t)
        ax.set_xlabel("fine-tuning step")
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matched_checkpoint(log: list[dict[str, Any]], concept_acc: float) -> dict[str, Any] | None:
    """The logged evaluation whose concept accuracy is closest to ``concept_acc`` (earliest on ties)."""
    evals = [r for r in log if "concept_acc" in r and r["step"] > 0]
    if not evals:
        return None
    return min(evals, key=lambda r: (abs(r["concept_acc"] - concept_acc), r["step"]))


def matched_rows(rows: dict[str, dict[str, Any]], logs: dict[str, list[dict[str, Any]]],
                 sft_names: list[str]) -> dict[str, dict[str, Any]]:
    """Matched-accuracy rows: for each SFT run, the method that ends higher, at its logged
    checkpoint closest to the other's final concept accuracy. One row per checkpoint: when
    several SFT runs match the same checkpoint, its label names them all."""
    found: dict[tuple[str, int], tuple[list[str], dict[str, Any]]] = {}
    for sft_name in sft_names:
        hi, lo = ("D-OPSD", sft_name) if rows["D-OPSD"]["concept_acc"] >= rows[sft_name]["concept_acc"] else (sft_name, "D-OPSD")
        m = matched_checkpoint(logs[hi], rows[lo]["concept_acc"])
        if m is not None:
            found.setdefault((hi, m["step"]), ([], m))[0].append(lo)
    return {f"{hi} @ step {step} (matched to {'; '.join(los)})": {k: m[k] for k, _ in METRICS}
            for (hi, step), (los, m) in found.items()}


SCOPE_WORDS = {
    "token_kv": "rare-token-local LoRA (cross-attention k/v at the rare token's positions)",
    "prompt_gated": "prompt-gated LoRA (self/cross-attention and MLP, active only for prompts with the rare token)",
    "lora": "ungated LoRA (self/cross-attention and MLP, active for every prompt: the paper's setting)",
    "cross_attn": "LoRA on every cross-attention k/v (not local)",
    "full": "full-parameter fine-tuning",
}


# Ungated LoRA: the learning rate with the best retention of the sweep (docs/results/lr_sweep.md).
UNGATED_LR = 3e-4

RETENTION = (("known_acc", "known-concept acc"), ("known_fid", "toy-FID (known)"))


def retention_vs_base(per_seed: dict[str, list[dict[str, float]]], names: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Retention on known prompts: each model's paired difference to the base (same generation
    seed) in known-prompt accuracy and toy-FID, mean ± 95% t-interval over generation seeds."""
    from toy_models.studies.experiments import mean_ci

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        out[name] = {}
        for k, _ in RETENTION:
            mean, ci = mean_ci([a[k] - b[k] for a, b in zip(per_seed[name], per_seed["base"])])
            out[name][k] = {"diff_vs_base": mean, "ci": ci}
    return out


def retention_lines(retention: dict[str, dict[str, dict[str, float]]], scope: str, seeds: int) -> list[str]:
    """Markdown: how retention is obtained for this scope, and the measured differences."""
    local = scope in ("prompt_gated", "token_kv")
    how = ("the adapter is off for prompts without the rare token, so known prompts are computed exactly as by the base"
           " model (retention by construction; the differences below are 0)" if local else
           "the adapter is active for every prompt, so known prompts can change: retention is measured")
    lines = [f"Retention on known prompts (no rare token): {how}. Paired difference to the base model, mean ± 95%"
             f" t-interval over {seeds} generation seeds (one training seed):", "",
             "| model | " + " | ".join(f"Δ {label} vs base" for _, label in RETENTION) + " |", "|---" * (len(RETENTION) + 1) + "|"]
    for name, row in retention.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]['diff_vs_base']:+.3f} ± {_fmt(row[k]['ci'])}"
                                                 if row[k]['ci'] == row[k]['ci'] else f"{row[k]['diff_vs_base']:+.3f}"
                                                 for k, _ in RETENTION) + " |")
    return lines + [""]


def _grids(out: Path, name: str, student, prompts: EvalPrompts, device, steps: int = 4) -> None:
    from toy_models.eval.viz import save_grid

    for label, ps in (("train", prompts.train[:8]), ("unseen", prompts.unseen[:8])):
        x = torch.cat([sample_prompts(student, ps, 1000 + s, steps, device) for s in range(3)])
        save_grid(x, out / f"samples_{name}_{label}.png", nrow=len(ps))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per method")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate for both methods (default: {UNGATED_LR} for --scope lora, else the fine-tuning default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="generation seeds per evaluation")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--device", default="auto")
    p.add_argument("--model", default="toy-dit-turbo4", help="shipped model name or folder")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--sft-factor", type=int, default=4,
                   help="also train SFT for this many times the steps (about D-OPSD's compute; 1: off)")
    p.add_argument("--teacher-ref", default="moved", choices=("moved", "target"),
                   help="D-OPSD teacher's reference: the target moved to the student's layout, or the raw target")
    p.add_argument("--scope", default="lora", choices=tuple(SCOPE_WORDS),
                   help="what trains: lora (default; ungated, the paper's setting: retention measured), prompt_gated"
                        " (known prompts untouched by construction), token_kv, cross_attn, full")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    base_cfg = FinetuneConfig(model=args.model, steps=args.steps, seed=args.seed, device=str(device),
                              eval_every=args.eval_every, eval_seeds=args.seeds, ckpt_every=0, teacher_ref=args.teacher_ref,
                              scope=args.scope)
    if args.lr is not None:
        base_cfg = base_cfg.replace(lr=args.lr)
    elif args.scope == "lora":
        base_cfg = base_cfg.replace(lr=UNGATED_LR)
    targets = load_targets(base_cfg.data, base_cfg.num_targets, base_cfg.data_seed)
    prompts = make_eval_prompts(targets)
    evaluator = load_evaluator()
    seeds = list(range(args.seeds))
    from toy_models.eval.viz import save_grid

    save_grid(targets.images, out / "targets.png", nrow=len(targets))
    print(f"[demo] {len(targets)} targets of {targets.name!r} (rare token {V.SHAPE_TOKEN!r}); device {device}")

    base = load_model(args.model, device).eval()
    rows: dict[str, dict[str, float]] = {}
    per_seed: dict[str, Any] = {}

    def record(name: str, student, steps: int = 4) -> None:
        m = evaluate_student(student, prompts, evaluator, seeds, steps, device, per_seed=True)
        per_seed[name] = m.pop("per_seed")
        rows[name] = m
        print(f"[demo] {name:<24} " + "  ".join(f"{k}={_fmt(m[k])}" for k, _ in METRICS))

    record("base", base)
    record("base, 32 steps", base, steps=32)
    _grids(out, "base", base, prompts, device)
    # What the in-context teacher draws for the targets (text + target image).
    tctx = ToyContext(V.tokenize(targets.captions), targets.images, base_cfg.teacher_route).to(device)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(targets), 3, 16, 16, generator=g).to(device)
    with torch.no_grad():
        teach = dopsd_ref.euler_sample(lambda x, s: base(x, s, tctx), noise, dopsd_ref.uniform_sigmas(4)).clamp(-1, 1)
    save_grid(torch.cat([targets.images, teach.cpu()]), out / "teacher_samples.png", nrow=len(targets))
    teacher_acc = float(sum(p == prompts.concept for p in evaluator.predict(teach.cpu())[prompts.head]) / len(targets))
    print(f"[demo] teacher (text + target image) draws the concept in {teacher_acc:.2f} of its samples")

    def evaluate(roles, step: int) -> dict[str, float]:
        return evaluate_student(roles.module, prompts, evaluator, seeds, 4, device)

    logs: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    runs = [("sft", "SFT", base_cfg), ("dopsd", "D-OPSD", base_cfg)]
    if args.sft_factor > 1:  # about D-OPSD's compute: an SFT step costs ~1/4 of a K = 4 roll-out
        runs.insert(1, ("sft_long", f"SFT, {args.sft_factor}× steps",
                        base_cfg.replace(steps=args.sft_factor * args.steps, eval_every=args.sft_factor * args.eval_every)))
    for key, name, run_cfg in runs:
        method = "sft" if key.startswith("sft") else "dopsd"
        cfg = run_cfg.replace(method=method, out=str(out / "runs" / key))
        res = run_finetune(cfg, targets=targets, evaluate=evaluate, overwrite=True)
        logs[name] = res.log
        timings[name] = res.seconds
        record(name, res.roles.module)
        if key == "sft":
            record("SFT, 32 steps", res.roles.module, steps=32)
        _grids(out, key, res.roles.module, prompts, device)
    plot_curves(logs, out / "curves.png")
    # Matched concept accuracy: for each SFT run, the method that ends higher at its logged
    # checkpoint closest to the other's final accuracy (quality where both draw the concept
    # about as often).
    rows.update(matched_rows(rows, logs, [n for _, n, _ in runs if n.startswith("SFT")]))

    table = results_table(rows)
    settings = {k: v for k, v in base_cfg.to_dict().items() if k not in ("method", "out")}
    md = [
        "# D-OPSD vs SFT on the toy 4-step model",
        "",
        f"Produced by `python -m toy_models.demo --steps {args.steps} --seed {args.seed} --seeds {args.seeds}"
        f"{f' --threads {args.threads}' if args.threads else ''}"
        f"{f' --teacher-ref {args.teacher_ref}' if args.teacher_ref != 'moved' else ''}"
        f"{f' --scope {args.scope}' if args.scope != 'lora' else ''}{f' --lr {args.lr:g}' if args.lr is not None else ''}` in {time.time() - t0:.0f} s on {device}"
        f" ({torch.get_num_threads()} CPU threads).",
        f"Targets: {len(targets)} images of the held-out concept `{prompts.concept}` named `{V.SHAPE_TOKEN}`;"
        f" adapter: {SCOPE_WORDS[base_cfg.scope]}"
        f"{f', rank {base_cfg.lora_rank}, + `{V.SHAPE_TOKEN}` embedding offset' if base_cfg.scope != 'full' else ''};"
        f" lr {base_cfg.lr}, {args.steps} steps, batch {base_cfg.batch_size}, K = {base_cfg.rollout_steps},"
        f" EMA {base_cfg.ema_decay}, {base_cfg.space}-space loss; D-OPSD teacher reference:"
        f" {'the target moved to the student’s layout' if args.teacher_ref == 'moved' else 'the raw target'}."
        f" Means over {args.seeds} generation seeds.",
        f"The in-context teacher (base model, text + target image) draws the concept in {teacher_acc:.2f} of its samples."
        + (f" `SFT, {args.sft_factor}× steps` trains {args.sft_factor * args.steps} steps, about D-OPSD's compute."
           if args.sft_factor > 1 else ""),
        "",
        table,
        "",
    ]
    retention = retention_vs_base(per_seed, [n for _, n, _ in runs])
    md += retention_lines(retention, base_cfg.scope, args.seeds)
    (out / "results.md").write_text("\n".join(md))
    result = {"rows": rows, "per_seed": per_seed, "teacher_concept_acc": teacher_acc, "curves": logs, "retention": retention,
              "settings": settings, "timings_s": timings, "wall_clock_s": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print("\n" + table + "\n")
    print(f"[demo] wrote {out}/results.md, results.json, curves.png and sample grids ({time.time() - t0:.0f} s)")
    return result


if __name__ == "__main__":
    main()
