"""Classifier-free guidance for the toy denoiser, and the sweep that chose the distillation's.

The shipped 4-step model is *guidance-distilled* (as Z-Image-Turbo and FLUX.2-klein are):
its recipe caches the base model's ODE under the guided velocity

    v_w(x, σ, c) = v(x, σ, c⁻) + w·(v(x, σ, c) − v(x, σ, c⁻))

and the student learns to follow it without guidance. The toy base was never trained with
an empty caption, so the negative context c⁻ is built from the positive one
(:func:`guidance_negative`). Two alternatives that keep a reference's domain out of the
guided difference, :func:`keep_reference_negative` and :func:`concept_token_negative`, are
options of ``evaluate --negative`` and ``distill --negative`` (:data:`NEGATIVES`); the
distillation's default is :func:`guidance_negative`.

    python -m toy_models.models.guidance --n 256 --steps 16      # the sweep quoted in toy_models/README.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext

_SHAPE_IDS = torch.tensor([V.WORD_TO_ID[w] for w in V.KNOWN_SHAPES])


def guidance_negative(ctx: ToyContext) -> ToyContext:
    """The negative context c⁻ used for guidance of ``ctx``.

    Reference contexts: the same caption without the reference (guidance towards the
    reference's concept). Text-only contexts: the caption with every known shape word
    replaced by the rare token ``sks`` ("the shape of an absent reference"), i.e. guidance
    towards the named shape.
    """
    if ctx.has_ref:
        return ToyContext(ctx.tokens)
    tok = ctx.tokens.clone()  # [B, L]
    tok[torch.isin(tok, _SHAPE_IDS.to(tok.device))] = V.WORD_TO_ID[V.SHAPE_TOKEN]
    return ToyContext(tok)


def keep_reference_negative(ctx: ToyContext) -> ToyContext:
    """Alternative c⁻ that keeps the domain (an option; not the distillation's default): for a
    reference context whose caption names a known shape, the *same reference* with the shape
    word replaced by ``sks``, so both branches see the reference's palette and the guided
    difference is only "the named shape" (with c⁻ = no reference, w = 3 also extrapolates the
    palette change at every pixel, docs/results/toy_world_v2.md). Any other context, and a
    reference batch in which some caption names no known shape (as a whole):
    :func:`guidance_negative`.
    """
    if not ctx.has_ref:
        return guidance_negative(ctx)
    named = torch.isin(ctx.tokens, _SHAPE_IDS.to(ctx.tokens.device))  # [B, L]
    if not bool(named.any(dim=1).all()):
        return guidance_negative(ctx)
    tok = ctx.tokens.clone()
    tok[named] = V.WORD_TO_ID[V.SHAPE_TOKEN]
    return ToyContext(tok, ctx.ref, ctx.route)


_RARE_IDS = torch.tensor([V.WORD_TO_ID[V.SHAPE_TOKEN], V.WORD_TO_ID[V.STYLE_TOKEN]])


def concept_token_negative(ctx: ToyContext) -> ToyContext:
    """c⁻ chosen by what the caption leaves to the reference (an option): captions holding a
    rare concept token (``sks`` shape, ``zwx`` fill) defer that concept to the reference, so
    c⁻ drops the reference (:func:`guidance_negative`, guidance towards the reference's
    concept); captions that name everything leave the reference only its domain, so c⁻
    keeps it (:func:`keep_reference_negative`, guidance towards the named shape alone).

    Raises:
        ValueError: a reference batch mixes both kinds of caption (guide them separately).
    """
    if not ctx.has_ref:
        return guidance_negative(ctx)
    rare = concept_token_rows(ctx)  # [B]
    if bool(rare.all()):
        return guidance_negative(ctx)
    if not bool(rare.any()):
        return keep_reference_negative(ctx)
    raise ValueError(f"concept_token_negative: rows {rare.nonzero().flatten().tolist()} of {len(rare)} hold a rare "
                     "concept token and the others do not; guide the two kinds in separate batches")


def concept_token_rows(ctx: ToyContext) -> Tensor:
    """[B] bool: rows whose caption holds a rare concept token (``sks``, ``zwx``)."""
    return torch.isin(ctx.tokens, _RARE_IDS.to(ctx.tokens.device)).any(dim=1)


def split_by_caption_kind(ctx: ToyContext) -> list[ToyContext]:
    """``ctx`` cut into batches that :func:`concept_token_negative` can guide: for a
    reference context, the rows with a rare concept token, then the rows without (empty
    parts left out); a text-only context as it is."""
    if not ctx.has_ref:
        return [ctx]
    rare = concept_token_rows(ctx)  # [B]
    return [ctx[m.nonzero().flatten()] for m in (rare, ~rare) if bool(m.any())]


#: Guidance negatives by name (``evaluate --negative``, ``distill --negative``).
NEGATIVES: dict[str, Callable[[ToyContext], ToyContext]] = {
    "drop_reference": guidance_negative, "keep_reference": keep_reference_negative,
    "concept_token": concept_token_negative,
}


def guidable_batches(ctx: ToyContext, negative: Callable[[ToyContext], ToyContext]) -> list[ToyContext]:
    """``ctx`` as the batches that ``negative`` can guide: split by caption kind for
    :func:`concept_token_negative` (it refuses a mixed reference batch), whole otherwise."""
    return split_by_caption_kind(ctx) if negative is concept_token_negative else [ctx]


def drop_shape_word(ctx: ToyContext) -> ToyContext:
    """Alternative c⁻ (measured worse, kept for the sweep): the caption without its shape word."""
    drop = {0, *_SHAPE_IDS.tolist()}
    rows = [[t for t in row.tolist() if t not in drop] for row in ctx.tokens.cpu()]
    tok = torch.zeros_like(ctx.tokens, device="cpu")
    for i, r in enumerate(rows):
        tok[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ToyContext(tok.to(ctx.tokens.device))


def guided_velocity(model: nn.Module, x: Tensor, sigma: Tensor, ctx: ToyContext, scale: float,
                    negative: Callable[[ToyContext], ToyContext] = guidance_negative) -> Tensor:
    """``v_w = v(x, σ, c⁻) + w·(v(x, σ, c) − v(x, σ, c⁻))``; the plain ``v(x, σ, c)`` when w = 1."""
    v = model(x, sigma, ctx)  # [B, 3, H, W]
    if scale == 1.0:
        return v
    v_neg = model(x, sigma, negative(ctx))
    return v_neg + scale * (v - v_neg)


class GuidedDenoiser(nn.Module):
    """``model`` under guidance scale ``w``, with the velocity-model call signature, so the
    samplers and evaluations in :mod:`toy_models.eval.evaluate` take it unchanged."""

    def __init__(self, model: nn.Module, scale: float,
                 negative: Callable[[ToyContext], ToyContext] = guidance_negative) -> None:
        super().__init__()
        self.model, self.scale, self.negative = model, scale, negative

    def forward(self, x: Tensor, sigma: Tensor, ctx: ToyContext) -> Tensor:
        return guided_velocity(self.model, x, sigma, ctx, self.scale, self.negative)


def sweep(model: nn.Module, n: int, steps: int, scales: Sequence[float], seed: int = 0) -> list[dict]:
    """Text-only shape accuracy / toy-FID / palette (both negatives) and aligned-reference copy
    accuracy of ``model`` sampled with ``steps`` Euler steps at each guidance scale."""
    from toy_models.eval.evaluate import copy_accuracy, score_prompts, real_known
    from toy_models.models.hub import load_evaluator

    ev = load_evaluator()
    known, real = D.specs(seed, n), real_known(n, seed + 777)
    trained = D.specs(seed + 13, max(n // 2, 64))  # the acceptance script's copy targets
    rows = []
    for name, neg in (("rare token", guidance_negative), ("shape word dropped", drop_shape_word)):
        for w in scales:
            if w == 1.0 and name != "rare token":
                continue
            r = score_prompts(GuidedDenoiser(model, w, neg), ev, known, steps, seed, real)
            rows.append({"context": "text-only", "negative": name, "w": w, **r})
            print(json.dumps(rows[-1]), flush=True)
    for w in scales:
        r = copy_accuracy(GuidedDenoiser(model, w), ev, trained, steps, "aligned", "tokens", seed)
        rows.append({"context": "aligned reference", "negative": "no reference", "w": w, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Guidance sweep of the toy base model (chooses the distillation's w).")
    p.add_argument("--model", default=None, help="model folder (default: the shipped base)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from toy_models.models.dit import ToyDiT
    from toy_models.models.hub import load_base

    model = (load_base() if args.model is None else ToyDiT.from_pretrained(args.model)).eval()
    t0 = time.time()
    rows = sweep(model, args.n, args.steps, args.scales, args.seed)
    print(f"\n{args.steps} Euler steps, n = {args.n}, seed {args.seed} ({time.time() - t0:.0f} s)\n")
    print("| context | c⁻ | w | shape acc | toy-FID | palette |\n|---|---|---|---|---|---|")
    for r in rows:
        fid = f"{r['toy_fid']:.2f}" if "toy_fid" in r else "–"
        pal = f"{r['palette']:.4f}" if "palette" in r else "–"
        acc = r.get("shape_acc", r.get("acc"))
        print(f"| {r['context']} | {r['negative']} | {r['w']} | {acc:.3f} | {fid} | {pal} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
