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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from toy_models import data as D
from toy_models import vocab as V
from toy_models.context import ToyContext


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
    ref = D.concept_reference(rng, tgt, aligned=rng.random() < aligned_p, same_color=rng.random() < cfg.p_same_color)
    return tgt, ref, cap


@dataclass
class SubBatch:
    x0: Tensor  # [b,3,16,16]
    context: ToyContext


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
