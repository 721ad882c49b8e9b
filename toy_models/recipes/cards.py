"""Model cards (README.md) for the shipped toy weights, written from recorded numbers.

Every number comes from the folder's ``training.json`` (recipe command, seed, wall-clock)
and from ``acceptance.json`` (measured by ``python -m toy_models.recipes.acceptance``); nothing is
typed by hand. Called by the acceptance script with ``--write-cards``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toy_models.models.hub import BASE, EVALUATOR, TURBO, WEIGHTS_DIR

DESCRIPTIONS = {
    BASE: ("Base flow-matching toy DiT (text + in-context reference), the 'pre-trained model' of the toy world. "
           "Sample it with >= 32 Euler steps for best quality."),
    TURBO: ("4-step distilled toy DiT: the step-distilled ('turbo') model that D-OPSD fine-tunes. Sample it with "
            "4 uniform Euler steps, sigma = 1, 0.75, 0.5, 0.25 -> 0. Text-only context = student; caption + "
            "reference image = the in-context teacher. Guidance-distilled (when the recipe's `guidance` > 1): it "
            "samples without classifier-free guidance, which is baked in from the base's guided ODE."),
    EVALUATOR: ("Evaluator CNN: classifies shape (6 known + ell + glyph), colour, background, fill style, size, "
                "domain. Its 128-d pooled features define toy-FID. Trained on procedural data that includes the "
                "held-out concepts the diffusion models never saw."),
}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(rows: dict[str, dict[str, Any]]) -> str:
    cols = sorted({k for r in rows.values() for k in r})
    out = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        out.append(f"| {name} | " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


def _lineage(tr: dict) -> list[dict]:
    """The runs a continuation started from (``init_training``, nested), latest first."""
    out, t = [], tr.get("init_training")
    while t:
        out.append(t)
        t = t.get("init_training")
    return out


def card(name: str, acc: dict) -> str:
    folder = WEIGHTS_DIR / name
    tr = json.loads((folder / "training.json").read_text()) if (folder / "training.json").exists() else {}
    cfg = json.loads((folder / "config.json").read_text())
    front = ["---", "library_name: dopsd-ref", "tags:", "- dopsd-ref", "- toy", "- model_hub_mixin", "---", ""]
    body = [f"# {name}", "", DESCRIPTIONS[name], "",
            "## Load (offline, no network call)", "", "```python",
            "from toy_models.models.hub import load_base, load_turbo, load_evaluator",
            f"model = {'load_base' if name == BASE else 'load_turbo' if name == TURBO else 'load_evaluator'}()"
            f"  # == {'ToyEvaluator' if name == EVALUATOR else 'ToyDiT'}.from_pretrained('toy_models/weights/{name}')",
            "```", "",
            "## Recipe", "", f"- command: `{tr.get('command', '?')}`", f"- seed: {tr.get('seed', '?')}",
            f"- wall-clock: {tr.get('wall_clock_s', '?')} s on {tr.get('threads', '?')} CPU thread(s) (shared 2-core machine)"]
    if tr.get("history"):
        body.append(f"- history (resumed run): {tr['history']}")
    lineage = _lineage(tr)
    if lineage:
        body += ["- continues (latest first; each run's `--init` is the next one's output):"]
        body += [f"  {i}. `{t.get('command', '?')}` ({t.get('wall_clock_s', '?')} s)"
                 + (f"; its `--init` is the folder as of commit {t['init_commit']}" if t.get("init_commit") else "")
                 for i, t in enumerate(lineage, 1)]
    if tr.get("base_shipped_as"):
        body.append(f"- base: `{tr.get('base')}` when distilled, shipped as `{tr['base_shipped_as']}`")
    for k in ("steps_done", "steps_planned", "steps", "train_steps", "batch", "lr", "ema", "params", "fine_steps", "guidance", "base_steps_done", "wall_clock_cache_s"):
        if k in tr:
            body.append(f"- {k}: {tr[k]}")
    if "heldout_clean_accuracy" in tr:
        body.append(f"- held-out clean-render accuracy per head: {json.dumps({k: round(v, 3) for k, v in tr['heldout_clean_accuracy'].items()})}")
    body += ["", "## Config", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    if acc:
        body += ["## Measured (toy_models.recipes.acceptance)", "",
                 f"Command: `{acc.get('command', '')}`; n = {acc['n']} prompts, seed {acc['seed']}. "
                 f"Real-vs-real toy-FID floor: {acc['real_vs_real_toy_fid']}; real palette distance: {acc['real_palette']}.", "",
                 "Text-only known concepts:", "", _table(acc["text_only"]), ""]
        if name != EVALUATOR:
            key = "turbo@4" if name == TURBO else "base@16"
            body += [f"In-context copy diagnostic ({key}; acc = evaluator agrees with the reference's concept; "
                     "`exact` = the target itself as reference, `aligned` = same placement, other colour/background, "
                     "`jittered` = other placement too; text_only = same rare-token prompt, no reference):", "",
                     _table(acc["copy"][key]), ""]
        if name == TURBO and "sft" in acc:
            s = acc["sft"]
            body += [f"SFT damage (flow-matching loss on {s['targets']} `ell` targets, {s['steps']} steps, lr {s['lr']}, "
                     f"all parameters; 4-step text-only known prompts):", "",
                     _table({"before": s["before"], "after SFT": s["after"]}), ""]
        body += [f"Speed: 64 images at 4 steps in {acc['speed_64_images_4_steps_s']} s ({acc['threads']} thread).", "",
                 "Checks: " + ", ".join(f"{k}: {'PASS' if v else 'MISS'}" for k, v in acc["checks"].items()), ""]
    return "\n".join(front + body)


def write_all_cards(acc: dict | None = None) -> None:
    if acc is None:
        p = WEIGHTS_DIR / "acceptance.json"
        acc = json.loads(p.read_text()) if p.exists() else {}
    for name in (BASE, TURBO, EVALUATOR):
        if (WEIGHTS_DIR / name / "config.json").exists():
            (WEIGHTS_DIR / name / "README.md").write_text(card(name, acc))
            print("wrote", WEIGHTS_DIR / name / "README.md")


if __name__ == "__main__":
    write_all_cards()
