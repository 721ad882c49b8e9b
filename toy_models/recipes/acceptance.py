"""Acceptance measurements of the shipped toy weights and the model cards.

    python -m toy_models.recipes.acceptance --n 512 --seed 0 --write-cards

Measures (all with the evaluator; images sampled with the uniform Euler grid):
1. text-only known concepts: base @ 32 and @ 4 steps, 4-step model @ 4 steps — shape and
   colour accuracy, toy-FID vs real renders, palette distance;
2. in-context copy diagnostic (reference-token route, and the encoder route): trained
   shapes via a reference, unlabelled never-seen glyphs (copy IoU), the held-out ``ell``
   and ``hstripe`` concepts via a reference, and the same rare-token prompts text-only;
3. the teacher as D-OPSD uses it (caption + the RAW target, no move) on the held-out L,
   stripes and pastel domain: concept accuracy, the prompt's shape kept, and whether the
   drawn placement follows the noise (overlap with the target's mask vs a shifted mask);
4. SFT damage: flow-matching fine-tuning of the 4-step model on a few ``ell`` targets
   (full parameters), then the text-only numbers of (1) and ``sks``→ell again;
5. speed: wall-clock of 64 images at 4 steps.
Results go to ``toy_models/weights/acceptance.json`` and, with ``--write-cards``, into
each model folder's README.md (toy_models.recipes.cards).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from toy_models.world import data as D
from toy_models.eval import metrics as M
from toy_models.world import vocab as V
from toy_models.world.concepts import concept_captions, concept_specs
from toy_models.models.context import ToyContext
from toy_models.eval.evaluate import copy_accuracy, score_prompts, raw_target_teacher, real_known
from toy_models.models.hub import WEIGHTS_DIR, load_base, load_evaluator, load_turbo
from toy_models.recipes.common import fm_loss_sum, write_json
from toy_models.models.sampling import sample

TARGETS = {
    "turbo_known_shape_acc_min": 0.90,
    "turbo_fid_max_ratio_vs_base32": 1.2,
    "copy_trained_shapes_min": 0.90,
    "teacher_heldout_min": 0.60,
    "student_heldout_textonly_max": 0.20,
    # the raw-target teacher (toy world v2)
    "raw_teacher_ell_min": 0.85,
    "raw_teacher_hstripe_min": 0.85,
    "raw_teacher_pastel_min": 0.80,
    "raw_teacher_pastel_shape_min": 0.85,
    "placement_iou_excess_max": 0.10,  # iou_target − iou_shifted: placement follows the noise
}


def sft(model: torch.nn.Module, images: torch.Tensor, captions: list[str], steps: int, lr: float, seed: int) -> torch.nn.Module:
    """Plain SFT: flow-matching loss on the targets, all parameters, AdamW."""
    m = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    ctx = ToyContext(V.tokenize(captions))
    for _ in tqdm(range(steps), desc="sft"):
        loss = fm_loss_sum(m, images, ctx, gen) / images.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    return m.eval()


def run(n: int, seed: int, sft_steps: int, sft_lr: float, sft_targets: int, skip_sft: bool = False,
        base_path: str | None = None, turbo_path: str | None = None) -> dict:
    """The measurements above, of the shipped weights (or the given model folders)."""
    t0 = time.time()
    base, turbo, ev = load_base(base_path), load_turbo(turbo_path), load_evaluator()
    known = D.specs(seed, n)
    real = real_known(n, seed + 777)
    res: dict = {"n": n, "seed": seed, "targets": TARGETS}
    res["real_vs_real_toy_fid"] = round(M.toy_fid(ev, D.render_batch(D.specs(seed + 778, n)), real), 3)
    res["real_palette"] = round(M.palette_distance(D.render_batch(known)), 4)

    print("== text-only known concepts")
    res["text_only"] = {
        "base@32": score_prompts(base, ev, known, 32, seed, real),
        "base@4": score_prompts(base, ev, known, 4, seed, real),
        "turbo@4": score_prompts(turbo, ev, known, 4, seed, real),
    }
    print(json.dumps(res["text_only"], indent=1))

    print("== copy diagnostic")
    m = max(n // 2, 64)
    glyphs = D.specs(seed + 4242, m, shapes=("glyph",))
    ell = concept_specs("ell", m, seed + 11)
    hst = concept_specs("hstripe", m, seed + 12)
    trained = D.specs(seed + 13, m)
    cd: dict = {}
    for model_name, model in (("turbo@4", turbo), ("base@16", base)):
        steps = 4 if model_name == "turbo@4" else 16
        r: dict = {}
        for route in ("tokens", "encoder"):
            for pl in ("exact", "aligned", "jittered"):
                r[f"{route}/trained/{pl}"] = copy_accuracy(model, ev, trained, steps, pl, route, seed)
                r[f"{route}/ell/{pl}"] = copy_accuracy(model, ev, ell, steps, pl, route, seed)
            r[f"{route}/hstripe/exact"] = copy_accuracy(model, ev, hst, steps, "exact", route, seed, head="style")
            r[f"{route}/glyph/aligned"] = copy_accuracy(model, ev, glyphs, steps, "aligned", route, seed)
            if model_name == "base@16":
                break  # the base only gets the default route (time)
        r["text_only/ell"] = copy_accuracy(model, ev, ell, steps, "exact", None, seed)
        r["text_only/hstripe"] = copy_accuracy(model, ev, hst, steps, "exact", None, seed, head="style")
        r["text_only/glyph"] = copy_accuracy(model, ev, glyphs, steps, "aligned", None, seed)
        cd[model_name] = r
        print(model_name, json.dumps(r, indent=1))
    res["copy"] = cd

    print("== raw-target teacher")
    res["raw_teacher"] = {"turbo@4": {c: raw_target_teacher(turbo, ev, c, n, 4, seed) for c in ("ell", "hstripe", "pastel")}}
    print(json.dumps(res["raw_teacher"], indent=1))

    if not skip_sft:
        print("== SFT damage")
        tg = concept_specs("ell", sft_targets, seed + 99)
        t1 = time.time()
        tuned = sft(turbo, D.render_batch(tg), concept_captions("ell", tg), sft_steps, sft_lr, seed)
        res["sft"] = {
            "targets": sft_targets, "steps": sft_steps, "lr": sft_lr, "params": "all",
            "wall_clock_s": round(time.time() - t1, 1),
            "before": {**res["text_only"]["turbo@4"], "sks_to_ell": cd["turbo@4"]["text_only/ell"]["acc"]},
            "after": {**score_prompts(tuned, ev, known, 4, seed, real),
                      "sks_to_ell": copy_accuracy(tuned, ev, ell, 4, "exact", None, seed)["acc"]},
        }
        print(json.dumps(res["sft"], indent=1))

    ctx = ToyContext(V.tokenize([D.caption(s) for s in known[:64]]))
    sample(turbo, ctx, steps=4, seed=seed)  # warm-up
    t1 = time.time()
    sample(turbo, ctx, steps=4, seed=seed)
    res["speed_64_images_4_steps_s"] = round(time.time() - t1, 3)
    res["threads"] = torch.get_num_threads()
    res["wall_clock_s"] = round(time.time() - t0, 1)
    res["checks"] = checks(res)
    return res


def checks(res: dict) -> dict[str, bool]:
    t = res["text_only"]
    c = res["copy"]["turbo@4"]
    out = {
        "turbo_known_shape_acc>=0.90": t["turbo@4"]["shape_acc"] >= TARGETS["turbo_known_shape_acc_min"],
        "turbo_fid<=1.2x_base32": t["turbo@4"]["toy_fid"] <= TARGETS["turbo_fid_max_ratio_vs_base32"] * t["base@32"]["toy_fid"],
        "turbo_fid<base4": t["turbo@4"]["toy_fid"] < t["base@4"]["toy_fid"],
        "copy_trained_shapes(aligned)>=0.90": c["tokens/trained/aligned"]["acc"] >= TARGETS["copy_trained_shapes_min"],
        "teacher_ell(exact)>=0.60": c["tokens/ell/exact"]["acc"] >= TARGETS["teacher_heldout_min"],
        "student_sks_textonly<=0.20": c["text_only/ell"]["acc"] <= TARGETS["student_heldout_textonly_max"],
    }
    if "raw_teacher" in res:
        r = res["raw_teacher"]["turbo@4"]
        out.update({
            "raw_teacher_ell>=0.85": r["ell"]["acc"] >= TARGETS["raw_teacher_ell_min"],
            "raw_teacher_ell_placement_follows_noise": r["ell"]["iou_target"] - r["ell"]["iou_shifted"] <= TARGETS["placement_iou_excess_max"],
            "raw_teacher_hstripe>=0.85": r["hstripe"]["acc"] >= TARGETS["raw_teacher_hstripe_min"],
            "raw_teacher_pastel>=0.80": r["pastel"]["acc"] >= TARGETS["raw_teacher_pastel_min"],
            "raw_teacher_pastel_shape>=0.85": r["pastel"]["shape_acc"] >= TARGETS["raw_teacher_pastel_shape_min"],
        })
    if "sft" in res:
        b, a = res["sft"]["before"], res["sft"]["after"]
        out["sft_damages_known(fid_or_acc_or_palette)"] = (
            a["toy_fid"] > 1.2 * b["toy_fid"] or a["shape_acc"] < b["shape_acc"] - 0.05 or a["palette"] > 1.1 * b["palette"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--sft-targets", type=int, default=12)
    p.add_argument("--skip-sft", action="store_true")
    p.add_argument("--base", default=None, help="base model folder (default: the shipped one)")
    p.add_argument("--turbo", default=None, help="4-step model folder (default: the shipped one)")
    p.add_argument("--out", default=None, help="results JSON (default: the shipped record, "
                   "toy_models/weights/acceptance.json; required with --base/--turbo)")
    p.add_argument("--write-cards", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.write_cards and (a.base or a.turbo):
        raise SystemExit("--write-cards describes the shipped weights; leave out --base/--turbo")
    if a.out is None and (a.base or a.turbo):
        raise SystemExit("--base/--turbo: pass --out (the default is the shipped weights' acceptance.json)")
    a.out = a.out or str(WEIGHTS_DIR / "acceptance.json")
    res = run(a.n, a.seed, a.sft_steps, a.sft_lr, a.sft_targets, a.skip_sft, a.base, a.turbo)
    res["command"] = "python -m toy_models.recipes.acceptance " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(Path(a.out), res)
    print(json.dumps(res["checks"], indent=1))
    if a.write_cards:
        from toy_models.recipes.cards import write_all_cards
        write_all_cards(res)


if __name__ == "__main__":
    main()
