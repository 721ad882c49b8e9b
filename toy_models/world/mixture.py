"""The base-training mixture: text-only samples plus in-context (reference) samples.

Per step the batch is split into three sub-batches, each a single forward pass:

- text-only: known shapes (mostly solid, some known fills), caption with real words;
- reference-token route: target + a reference sharing its concept (known shape, an
  unlabelled glyph, or a fill style) but with its own background and often colour; the
  concept word is replaced by the rare token (``sks`` shape / ``zwx`` style) — always for
  glyphs, which have no word;
- encoder route: the same kind of pairs, the reference read by the text encoder.

Curriculum: references start aligned (same position and size), and a growing share is
jittered (other position/size) as training proceeds (``aligned_prob``).

The two main mixtures in :data:`MIXTURES` (its other entries are variants, listed there):
``v1`` made the shipped weights up to the commit that introduced ``v2`` (70 % aligned
references at the end: the teacher learned to copy the reference's *placement*, and never
saw a domain). ``v2`` (a continuation of v1's weights) adds what a VLM's in-context ability
carries and v1 lacked:

- references mostly jittered by the end (5 % aligned): the concept, not its position;
- procedural periodic fills (``style="pattern"``, rare token ``zwx``), half of them on a
  reference of another shape, so "the reference's fill" is separated from its shape;
- domains: a share of pairs is restyled into a random procedural domain
  (:func:`toy_models.world.data.random_domain`, never near the held-out pastel), target and
  reference alike, with the reference showing the caption's colour and background; plus
  domain-only pairs whose reference has another shape and the caption names the shape —
  the output domain is always the reference's.

With the v2 fields at 0 (``v1``) the random stream is exactly v1's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext


@dataclass(frozen=True)
class MixtureConfig:
    p_ref: float = 0.6  # share of samples carrying a reference
    p_encoder: float = 0.15  # share of reference samples routed through the text encoder
    p_glyph: float = 0.45  # reference samples whose concept is an unlabelled glyph
    p_style_copy: float = 0.12  # reference samples whose concept is a fill style (`zwx`)
    p_rare_word: float = 0.6  # known shapes: shape word replaced by `sks`
    p_same_color: float = 0.5
    p_textured: float = 0.25  # text-only samples with a known (non-solid) fill
    aligned_start: float = 1.0
    aligned_end: float = 0.7
    curriculum: tuple[float, float] = (0.15, 0.6)  # fraction of training: hold, then ramp
    # v2 fields (0 = the v1 stream)
    p_fill_family: float = 0.0  # reference samples whose concept is a procedural fill (`zwx`)
    p_fill_other_shape: float = 0.0  # of fill samples: the reference has another known shape
    p_domain_only: float = 0.0  # reference samples that carry only a domain (caption names the shape)
    p_domain: float = 0.0  # other reference samples restyled (target and reference) into a random domain
    jitter_size: bool = True  # a jittered reference also redraws its size (False: translation only)

    def aligned_prob(self, frac: float) -> float:
        a, b = self.curriculum
        if frac <= a:
            return self.aligned_start
        t = min(1.0, (frac - a) / max(b - a, 1e-9))
        return self.aligned_start + t * (self.aligned_end - self.aligned_start)


_TEXTURES = tuple(s for s in V.KNOWN_STYLES if s != "solid")


def _text_spec(rng: np.random.Generator, cfg: MixtureConfig) -> D.Spec:
    if rng.random() < cfg.p_textured:
        return D.random_spec(rng, styles=_TEXTURES)
    return D.random_spec(rng)


def _ref_pair(rng: np.random.Generator, cfg: MixtureConfig, aligned_p: float) -> tuple[D.Spec, D.Spec, str]:
    """(target, reference, caption) for one in-context sample."""
    if cfg.p_fill_family or cfg.p_domain_only or cfg.p_domain:
        return _ref_pair_v2(rng, cfg, aligned_p)
    u = rng.random()
    if u < cfg.p_glyph:
        tgt = D.random_spec(rng, shapes=("glyph",))
        cap = D.caption(tgt)  # glyphs are always `sks`
    elif u < cfg.p_glyph + cfg.p_style_copy:
        tgt = D.random_spec(rng, styles=_TEXTURES)
        cap = D.caption(tgt, style_word=V.STYLE_TOKEN)
    else:
        tgt = _text_spec(rng, cfg)
        word = V.SHAPE_TOKEN if rng.random() < cfg.p_rare_word else None
        cap = D.caption(tgt, shape_word=word)
    ref = D.concept_reference(rng, tgt, aligned=rng.random() < aligned_p, same_color=rng.random() < cfg.p_same_color,
                              resize=cfg.jitter_size)
    return tgt, ref, cap


def _ref_pair_v2(rng: np.random.Generator, cfg: MixtureConfig, aligned_p: float) -> tuple[D.Spec, D.Spec, str]:
    """v2 in-context sample: concept kinds of v1 plus procedural fills and domains."""
    u = rng.random()
    edges = np.cumsum([cfg.p_glyph, cfg.p_style_copy, cfg.p_fill_family, cfg.p_domain_only])
    aligned = rng.random() < aligned_p
    if u < edges[3] and u >= edges[2]:  # domain only: another shape, same colour and background
        dom = D.random_domain(rng)
        tgt = _text_spec(rng, cfg).replace(domain=dom)
        other = D.random_spec(rng, shapes=V.KNOWN_SHAPES + ("glyph",), domain=dom)
        ref = D.concept_reference(rng, tgt, aligned=aligned, same_color=True, resize=cfg.jitter_size)
        ref = ref.replace(shape=other.shape, glyph=other.glyph, style="solid", fill=None, bg=tgt.bg)
        return tgt, ref, D.caption(tgt)
    other_shape = False
    if u < edges[0]:
        tgt = D.random_spec(rng, shapes=("glyph",))
        cap = D.caption(tgt)
    elif u < edges[1]:
        tgt = D.random_spec(rng, styles=_TEXTURES)
        cap = D.caption(tgt, style_word=V.STYLE_TOKEN)
    elif u < edges[2]:
        tgt = D.random_spec(rng, styles=("solid",)).replace(style="pattern", fill=D.random_fill(rng), size="large")
        tgt = tgt.replace(cx=float(np.clip(tgt.cx, D.RADIUS["large"] + 0.3, D.RES - D.RADIUS["large"] - 0.3)),
                          cy=float(np.clip(tgt.cy, D.RADIUS["large"] + 0.3, D.RES - D.RADIUS["large"] - 0.3)))
        cap = D.caption(tgt, style_word=V.STYLE_TOKEN)
        other_shape = rng.random() < cfg.p_fill_other_shape
    else:
        tgt = _text_spec(rng, cfg)
        word = V.SHAPE_TOKEN if rng.random() < cfg.p_rare_word else None
        cap = D.caption(tgt, shape_word=word)
    in_domain = rng.random() < cfg.p_domain
    if in_domain:
        tgt = tgt.replace(domain=D.random_domain(rng))
    same_color = in_domain or rng.random() < cfg.p_same_color
    ref = D.concept_reference(rng, tgt, aligned=aligned, same_color=same_color, resize=cfg.jitter_size)
    if in_domain:
        ref = ref.replace(bg=tgt.bg)
    if other_shape:
        ref = ref.replace(shape=str(rng.choice(V.KNOWN_SHAPES)))
    return tgt, ref, cap


@dataclass
class SubBatch:
    x0: Tensor  # [b,3,16,16]
    context: ToyContext


_V2 = MixtureConfig(
    p_ref=0.45, p_glyph=0.28, p_style_copy=0.08, p_fill_family=0.16, p_fill_other_shape=0.5,
    p_domain_only=0.14, p_domain=0.25, aligned_start=0.5, aligned_end=0.05, curriculum=(0.0, 0.35),
)

_V2C = replace(_V2, jitter_size=False, p_ref=0.6, p_encoder=0.0, p_glyph=0.4, p_style_copy=0.06,
               p_fill_family=0.14, p_domain_only=0.14, aligned_start=0.05, aligned_end=0.05)

_V2E = replace(_V2C, p_ref=0.7, p_glyph=0.4, p_style_copy=0.05, p_fill_family=0.1, p_domain_only=0.2,
               p_domain=0.5)

_V2F = replace(_V2E, aligned_start=0.0, aligned_end=0.0)

#: Named mixtures: ``v1`` (the original), ``v2`` (placement-free, fills and domains; see module
#: doc), ``v2t`` (v2 with translation-only jitter, the size kept: tests whether the size change
#: is what stops a relocating copy, docs/results/toy_world_v2.md), ``copy`` (a diagnostic,
#: not a base mixture: every sample is an unlabelled glyph with a translated reference, so the
#: whole budget goes to the relocating copy; no text-only samples), ``v2c`` (v2t
#: re-balanced for a continuation of a ``copy`` run: 60 % reference samples, none through the
#: encoder route, 40 % of them translated glyph pairs, 5 % aligned throughout; text-only,
#: fills and domains kept), ``v2d`` (v2c with a larger domain share: 36 % of each batch in
#: a procedural domain, against v2c's 21 %), ``v2e`` (v2c's glyph share and v2d's domain share
#: of reference samples, 40 % and 60 %, on 70 % reference samples: 28 % of each batch on
#: glyph pairs, 42 % in a domain, 30 % text-only), ``v2f`` (v2e with every reference
#: placement redrawn: none aligned with its target, as in ``copy``), ``v2g`` (v2f with more of each batch on glyph pairs, 36 %, and in
#: domains, 48 %; 20 % text-only), ``v2h`` (v2g re-balanced against the glyph prior: the
#: copy errors of v2g-trained models are outputs the evaluator reads as a glyph, mostly at the
#: small size, so glyph pairs fall to 24 % of each batch and every known-shape reference pair is
#: captioned with the rare word, 28 % of each batch against v2g's 10 %) and ``domain`` (a
#: diagnostic like ``copy``, for
#: the pastel row's task: v2c's 60 % reference samples, every one in a fresh procedural
#: domain with a caption that names the shape, 30 % of them domain-only pairs and the rest
#: same-shape references; text-only samples kept; no glyphs or fills).
MIXTURES: dict[str, MixtureConfig] = {
    "v1": MixtureConfig(),
    "v2": _V2,
    "v2t": replace(_V2, jitter_size=False),
    "v2c": _V2C,
    "v2d": replace(_V2C, p_glyph=0.3, p_domain_only=0.2, p_domain=0.5),
    "v2e": _V2E,
    "v2f": _V2F,
    "v2g": replace(_V2F, p_ref=0.8, p_glyph=0.45),
    "v2h": replace(_V2F, p_ref=0.8, p_glyph=0.3, p_rare_word=1.0),
    "domain": replace(_V2C, p_glyph=0.0, p_style_copy=0.0, p_fill_family=0.0, p_domain_only=0.3, p_domain=1.0,
                      p_rare_word=0.0),
    "copy": MixtureConfig(p_ref=1.0, p_encoder=0.0, p_glyph=1.0, p_style_copy=0.0, aligned_start=0.0,
                          aligned_end=0.0, jitter_size=False),
}


def pretrain_batch(seed: int, step: int, batch: int, frac: float, cfg: MixtureConfig) -> list[SubBatch]:
    """The deterministic sub-batches of training step ``step`` (see module doc)."""
    rng = np.random.default_rng([seed, 7919, step])
    n_ref = int(round(batch * cfg.p_ref))
    n_enc = int(round(n_ref * cfg.p_encoder))
    n_tok = n_ref - n_enc
    n_txt = batch - n_ref
    out: list[SubBatch] = []
    if n_txt:
        sp = [_text_spec(rng, cfg) for _ in range(n_txt)]
        out.append(SubBatch(D.render_batch(sp), ToyContext(V.tokenize([D.caption(s) for s in sp]))))
    ap = cfg.aligned_prob(frac)
    for n, route in ((n_tok, "tokens"), (n_enc, "encoder")):
        if n:
            trip = [_ref_pair(rng, cfg, ap) for _ in range(n)]
            x0 = D.render_batch([t for t, _, _ in trip])
            ref = D.render_batch([r for _, r, _ in trip])
            out.append(SubBatch(x0, ToyContext(V.tokenize([c for _, _, c in trip]), ref, route)))
    return out
