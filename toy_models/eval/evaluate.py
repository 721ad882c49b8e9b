"""Reusable evaluations of toy denoisers (used by the acceptance script, demo, tutorials).

All functions sample with the K-step uniform Euler sampler and score with the evaluator:

- :func:`score_prompts` — text-only prompts: shape/colour accuracy, toy-FID vs real renders,
  palette distance;
- :func:`copy_accuracy` — the in-context (teacher) diagnostic: caption with the rare token
  + a reference image; the evaluator must see the reference's concept;
- :func:`raw_target_teacher` — the teacher as D-OPSD uses it: the caption + the raw target
  image; concept accuracy and whether the drawn placement follows the noise or the target
  (:func:`placement_overlap`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from toy_models.world import data as D
from toy_models.eval import metrics as M
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.eval.evaluator import ToyEvaluator
from toy_models.models.sampling import sample

PLACEMENTS = ("exact", "aligned", "jittered")


def real_known(n: int, seed: int = 12345) -> Tensor:
    """Real renders of known-concept specs (the toy-FID reference set)."""
    return D.render_batch(D.specs(seed, n))


def score_prompts(
    model: nn.Module,
    evaluator: ToyEvaluator,
    specs: Sequence[D.Spec],
    steps: int,
    seed: int = 0,
    real: Optional[Tensor] = None,
    captions: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Text-only sampling of ``specs``' captions; scores against the specs' attributes.

    Returns shape_acc, color_acc, palette (distance), and toy_fid when ``real`` is given.
    """
    caps = list(captions) if captions is not None else [D.caption(s) for s in specs]
    x = sample(model, ToyContext(V.tokenize(caps)), steps=steps, seed=seed)
    pred = evaluator.predict(x)
    out = {
        "shape_acc": M.accuracy(pred["shape"], [s.shape for s in specs]),
        "color_acc": M.accuracy(pred["color"], [s.color for s in specs]),
        "palette": M.palette_distance(x, specs[0].domain),
    }
    if real is not None:
        out["toy_fid"] = M.toy_fid(evaluator, x, real)
    return out


def reference_specs(targets: Sequence[D.Spec], placement: str, seed: int) -> list[D.Spec]:
    """References for targets: ``exact`` (the target itself, as D-OPSD's teacher sees it),
    ``aligned`` (same placement, other colour and background) or ``jittered`` (other
    placement/size too)."""
    if placement == "exact":
        return list(targets)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    rng = np.random.default_rng([seed, 555])
    return [D.concept_reference(rng, t, aligned=placement == "aligned", same_color=False) for t in targets]


def copy_accuracy(
    model: nn.Module,
    evaluator: ToyEvaluator,
    targets: Sequence[D.Spec],
    steps: int,
    placement: str = "aligned",
    route: Optional[str] = "tokens",
    seed: int = 0,
    head: str = "shape",
    captions: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Sample with caption (rare token) + reference; accuracy of ``head`` vs the targets.

    ``route=None`` samples text-only (the student's view of the same rare-token prompt).
    For glyph targets (no class of their own) also reports ``copy_iou`` of the foreground.
    """
    if captions is None:
        if head == "style":
            captions = [D.caption(t, style_word=V.STYLE_TOKEN) for t in targets]
        else:
            captions = [D.caption(t, shape_word=V.SHAPE_TOKEN) for t in targets]
    refs = reference_specs(targets, placement, seed)
    tok = V.tokenize(list(captions))
    ctx = ToyContext(tok) if route is None else ToyContext(tok, D.render_batch(refs), route)
    x = sample(model, ctx, steps=steps, seed=seed)
    pred = evaluator.predict(x)
    out = {"acc": M.accuracy(pred[head], [getattr(t, head) for t in targets]),
           "color_acc": M.accuracy(pred["color"], [t.color for t in targets])}
    if targets[0].shape == "glyph" and placement != "jittered":
        out["copy_iou"] = M.copy_iou(x, targets)
    return out


def placement_overlap(x: Tensor, targets: Sequence[D.Spec], seed: int = 0) -> dict[str, float]:
    """Does a sample sit where the target sits, or where the noise put it?

    ``iou_target``: mean IoU of each sample's foreground with its target's shape mask;
    ``iou_shifted``: the same with the target's mask moved to a random other placement
    (same size; seeded). A teacher that copies the target's placement has
    ``iou_target ≫ iou_shifted``; one whose placement follows the noise has them about equal.
    """
    rng = np.random.default_rng([seed, 8080])
    shifted = [t.replace(cx=c[0], cy=c[1]) for t in targets for c in [D.random_placement(rng, t.size)]]
    return {"iou_target": M.copy_iou(x, list(targets)), "iou_shifted": M.copy_iou(x, shifted)}


#: Held-out concept → (caption rule, evaluator head that must name it, value).
RAW_TARGET_CONCEPTS = {
    "ell": ("shape", V.NOVEL_SHAPE),
    "hstripe": ("style", V.NOVEL_STYLE),
    "pastel": ("domain", "pastel"),
}


def raw_target_samples(
    model: nn.Module, concept: str, n: int, steps: int, seed: int = 0
) -> tuple[list[D.Spec], Tensor, Tensor]:
    """(target specs, target images [n,3,16,16], samples [n,3,16,16]) of the in-context
    teacher given the RAW target (what D-OPSD's teacher sees, no move).

    Targets are the held-out concept's specs (toy_models.world.concepts), captions name the
    concept with its rare token (pastel: the ordinary caption).
    """
    from toy_models.world.concepts import concept_captions, concept_specs

    targets = concept_specs(concept, n, seed + 21)
    return (targets, *reference_samples(model, targets, concept_captions(concept, targets), steps, seed))


def reference_samples(model: nn.Module, targets: Sequence[D.Spec], captions: Sequence[str], steps: int, seed: int
                      ) -> tuple[Tensor, Tensor]:
    """(target images [n,3,16,16], samples [n,3,16,16]): each target's own render as the
    reference (token route) with its caption."""
    ref = D.render_batch(list(targets))
    ctx = ToyContext(V.tokenize(list(captions)), ref, "tokens")
    return ref, sample(model, ctx, steps=steps, seed=seed)


def raw_target_teacher(
    model: nn.Module, evaluator: ToyEvaluator, concept: str, n: int, steps: int, seed: int = 0
) -> dict[str, float]:
    """Scores :func:`raw_target_samples`: ``acc`` (the concept's head: shape ``ell`` / style
    ``hstripe`` / domain ``pastel``), ``shape_acc`` (the prompt's shape is kept), ``color_acc``,
    ``shape_acc_silhouette`` (the shape read from :func:`toy_models.eval.metrics.silhouette`,
    blind to off-palette colours; a diagnostic, the acceptance targets use ``shape_acc``) and
    :func:`placement_overlap`.
    """
    head, value = RAW_TARGET_CONCEPTS[concept]
    targets, _, x = raw_target_samples(model, concept, n, steps, seed)
    pred = evaluator.predict(x)
    return {
        "acc": M.accuracy(pred[head], [value] * len(targets)),
        "shape_acc": M.accuracy(pred["shape"], [t.shape for t in targets]),
        "color_acc": M.accuracy(pred["color"], [t.color for t in targets]),
        "shape_acc_silhouette": M.accuracy(evaluator.predict(M.silhouette(x))["shape"], [t.shape for t in targets]),
        **placement_overlap(x, targets, seed),
    }


def family_domain_specs(n: int, seed: int) -> list[D.Spec]:
    """``n`` known-shape specs, each restyled into its own fresh procedural domain
    (:func:`toy_models.world.data.random_domain`: the distribution base training's domain
    pairs draw from, so new members of it, not the held-out pastel)."""
    rng = np.random.default_rng([seed, 4242])
    return [t.replace(domain=D.random_domain(rng)) for t in D.specs(seed + 29, n)]


def family_domain_teacher(model: nn.Module, evaluator: ToyEvaluator, n: int, steps: int, seed: int = 0
                          ) -> dict[str, float]:
    """The pastel row's protocol on fresh *training-family* domains: the raw target (same
    shape, colour and placement) as the reference, the ordinary caption.

    The evaluator's shape head was trained on the base and pastel palettes only (it reads
    about half of clean family renders), so shapes are read from
    :func:`toy_models.eval.metrics.silhouette` re-renderings: ``shape_acc`` for the samples,
    ``shape_acc_clean`` for the targets themselves (the reading's ceiling). Tells whether
    losing the prompt's shape is particular to the held-out pastel (a generalisation gap) or
    comes with any domain reference.
    """
    targets = family_domain_specs(n, seed)
    ref, x = reference_samples(model, targets, [D.caption(t) for t in targets], steps, seed)
    shapes = [t.shape for t in targets]
    return {"shape_acc": M.accuracy(evaluator.predict(M.silhouette(x))["shape"], shapes),
            "shape_acc_clean": M.accuracy(evaluator.predict(M.silhouette(ref))["shape"], shapes)}


#: The rows ``evaluate`` prints, in order (``--rows`` picks a subset).
EVALUATE_ROWS = (*RAW_TARGET_CONCEPTS, "text_only", "copy_trained_jittered", "family_domain")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Teacher diagnostic of any model folder (e.g. an intermediate base checkpoint)::

        python -m toy_models.eval.evaluate --model runs/base-v2/toy-dit-base --steps 16 --guidance 3 --n 128

    Prints JSON: the raw-target teacher on the held-out L, stripes and pastel domain
    (:func:`raw_target_teacher`), text-only known prompts, copying trained shapes from a
    jittered reference, and the pastel protocol on fresh training-family domains
    (:func:`family_domain_teacher`).
    """
    import argparse
    import contextlib
    import json
    import sys

    from toy_models.models.dit import ToyDiT
    from toy_models.models.guidance import NEGATIVES, GuidedDenoiser
    from toy_models.models.hub import load_evaluator

    p = argparse.ArgumentParser(description="teacher diagnostic of a toy model folder")
    p.add_argument("--model", required=True, help="HF-style model folder")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1 = none; the distillation's is 3)")
    p.add_argument("--negative", default="drop_reference", choices=sorted(NEGATIVES),
                   help="guidance negative c⁻ for w != 1 (toy_models.models.guidance; the distillation's default: drop_reference)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default="", help="also save a PNG: per held-out concept, 8 raw targets over the 8 samples")
    p.add_argument("--rows", default=",".join(EVALUATE_ROWS),
                   help="comma-separated subset of the rows to measure (default: all)")
    a = p.parse_args(argv)
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(EVALUATE_ROWS))
    if unknown or not rows:
        p.error(f"--rows: unknown {unknown or 'empty list'}; choose from {', '.join(EVALUATE_ROWS)}")
    torch.set_num_threads(a.threads)
    with contextlib.redirect_stdout(sys.stderr):  # huggingface_hub prints on load; stdout stays JSON
        model: nn.Module = ToyDiT.from_pretrained(a.model).eval()
        ev = load_evaluator()
    if a.guidance != 1.0:
        model = GuidedDenoiser(model, a.guidance, NEGATIVES[a.negative]).eval()
    out = {c: raw_target_teacher(model, ev, c, a.n, a.steps, a.seed) for c in RAW_TARGET_CONCEPTS if c in rows}
    if "text_only" in rows:
        out["text_only"] = score_prompts(model, ev, D.specs(a.seed, a.n), a.steps, a.seed)
    if "copy_trained_jittered" in rows:
        out["copy_trained_jittered"] = copy_accuracy(model, ev, D.specs(a.seed + 13, a.n), a.steps, "jittered", "tokens",
                                                     a.seed)
    if "family_domain" in rows:
        out["family_domain"] = family_domain_teacher(model, ev, a.n, a.steps, a.seed)
    print(json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in out.items()}, indent=1))
    if a.grid:
        from toy_models.eval.viz import save_grid

        ims = [im for c in RAW_TARGET_CONCEPTS if c in rows for im in raw_target_samples(model, c, 8, a.steps, a.seed)[1:]]
        save_grid(torch.cat(ims), a.grid, nrow=8)  # rows: L targets, L samples, stripes …, pastel …


if __name__ == "__main__":
    main()
