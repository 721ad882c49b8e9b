"""Toy world v2 data: procedural domains and fills, and the v2 base-training mixture.

The held-out concepts (the L, horizontal period-2 stripes, the pastel domain) must stay out
of every base-training sample, and the v1 mixture's random stream must be unchanged (it
made the weights up to the v2 continuation).
"""

import hashlib
from dataclasses import replace

import numpy as np
from hypothesis import given, settings, strategies as st

from toy_models.world import data as D
from toy_models.world import mixture as mix
from toy_models.world import vocab as V
from toy_models.world.mixture import MIXTURES, pretrain_batch

SEEDS = st.integers(0, 2**31 - 1)
FAST = settings(max_examples=40, deadline=None, derandomize=True)
_IX, _IY = np.meshgrid(np.arange(D.RES), np.arange(D.RES))


@FAST
@given(SEEDS)
def test_random_domain_stays_away_from_pastel(seed):
    """A procedural domain is never within DOMAIN_HOLDOUT (mean RGB distance over the
    palette) of the held-out pastel palette, and its name fully determines its palette."""
    name = D.random_domain(np.random.default_rng(seed))
    pal = D.domain_palette(name)
    assert D.palette_distance_between(pal, D.PALETTES["pastel"]) >= D.DOMAIN_HOLDOUT
    assert D.domain_palette(name) == pal
    assert all(0.0 <= c <= 1.0 for rgb in pal.values() for c in rgb)


@FAST
@given(SEEDS, st.integers(0, 10_000))
def test_domain_images_use_the_domain_palette(seed, idx):
    """Every pixel of a family-domain render mixes the domain's shape colour and background
    (``pixel = bg + a·(colour − bg)`` with a ∈ [0, 1])."""
    rng = np.random.default_rng([seed, idx])
    s = D.random_spec(rng).replace(domain=D.random_domain(rng))
    pal = D.domain_palette(s.domain)
    rgb = (D.render(s) + 1) / 2  # [3,H,W]
    col, bg = np.asarray(pal[s.color])[:, None, None], np.asarray(pal[s.bg])[:, None, None]
    d = col - bg
    a = ((rgb - bg) * d).sum(0) / max((d * d).sum(), 1e-9)
    assert np.allclose(bg + a[None] * d, rgb, atol=1e-5) and a.min() >= -1e-5 and a.max() <= 1 + 1e-5


def test_bad_domain_names_the_problem():
    import pytest

    with pytest.raises(ValueError, match="unknown domain 'anime'"):
        D.domain_palette("anime")
    with pytest.raises(ValueError, match="7 parameters"):
        D.domain_palette("fam:0.1,0.2")


@FAST
@given(SEEDS)
def test_random_fill_is_never_the_heldout_stripes(seed):
    """A procedural fill agrees with horizontal period-2 stripes (either phase) on at most
    85 % of pixels, and shows the shape colour on 30–80 % of them."""
    f = D.random_fill(np.random.default_rng(seed))
    pat = D._fill_pattern(f, _IX, _IY)
    held = (_IY % 2 == 0).astype(float)
    assert max((pat == held).mean(), (pat == 1 - held).mean()) <= 0.85
    assert 0.3 <= pat.mean() <= 0.8


def test_v1_stream_unchanged():
    """The v1 mixture's batches are byte-identical to those that trained the v1 weights
    (hash computed with the code of commit 770a9a2)."""
    h = hashlib.sha256()
    for step in (0, 1, 2000, 7999):
        for sb in pretrain_batch(0, step, 32, step / 8000, MIXTURES["v1"]):
            h.update(sb.x0.numpy().tobytes())
            h.update(sb.context.tokens.numpy().tobytes())
            if sb.context.ref is not None:
                h.update(sb.context.ref.numpy().tobytes())
    assert h.hexdigest() == "775bdd68f0a5aedd258dade9eaeecdbab753267a69b6c106a878ddc7c4a1fbd2"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(SEEDS, st.floats(0.0, 1.0))
def test_v2_pairs_carry_concepts_not_heldouts(seed, frac):
    """v2 reference pairs: target and reference share a domain; in a non-base domain the
    reference shows the caption's colour and background; procedural fills are named by
    ``zwx``; no sample is the L, horizontal period-2 stripes or pastel."""
    cfg = MIXTURES["v2"]
    rng = np.random.default_rng(seed)
    for _ in range(20):
        tgt, ref, cap = mix._ref_pair(rng, cfg, cfg.aligned_prob(frac))
        for s in (tgt, ref):
            assert s.shape != V.NOVEL_SHAPE and s.style != V.NOVEL_STYLE and s.domain != "pastel"
        assert ref.domain == tgt.domain
        if tgt.domain != "base":
            assert (ref.color, ref.bg) == (tgt.color, tgt.bg)
        if tgt.style == "pattern":
            assert ref.style == "pattern" and ref.fill == tgt.fill and V.STYLE_TOKEN in cap.split()
        V.tokenize([cap])


def test_v2_curriculum_ends_mostly_jittered():
    """By the end of v2's curriculum only 5 % of references keep the target's placement."""
    cfg = MIXTURES["v2"]
    assert abs(cfg.aligned_prob(1.0) - 0.05) < 1e-12 and cfg.aligned_prob(0.0) == 0.5
    parts = pretrain_batch(3, 10, 32, 0.9, cfg)
    assert sum(sb.x0.shape[0] for sb in parts) == 32


@settings(max_examples=25, deadline=None, derandomize=True)
@given(SEEDS)
def test_v2t_jitter_is_a_translation(seed):
    """Mixture v2t differs from v2 only in its jitter: a jittered reference keeps the
    target's size (a pure translation), while v2 also redraws the size of solid shapes."""
    cfg_t, cfg = MIXTURES["v2t"], MIXTURES["v2"]
    assert replace(cfg_t, jitter_size=True) == cfg
    rng = np.random.default_rng(seed)
    for _ in range(20):
        tgt, ref, _ = mix._ref_pair(rng, cfg_t, 0.0)
        if ref.shape == tgt.shape:
            assert ref.size == tgt.size
    pairs = [mix._ref_pair(np.random.default_rng([seed, i]), cfg, 0.0) for i in range(200)]
    assert any(t.size != r.size for t, r, _ in pairs)  # v2 does change sizes


def test_v2c_is_v2t_rebalanced_towards_the_translated_copy():
    """Mixture v2c keeps v2t's kinds of sample and its translation-only jitter but puts 60 %
    of each batch on references, none on the encoder route, with 5 % aligned at every step,
    and more of the references on glyphs; text-only samples stay in every batch."""
    c, t = MIXTURES["v2c"], MIXTURES["v2t"]
    assert not c.jitter_size and c.p_encoder == 0.0 and c.p_glyph > t.p_glyph
    assert c.aligned_prob(0.0) == c.aligned_prob(1.0) == 0.05
    assert sum([c.p_glyph, c.p_style_copy, c.p_fill_family, c.p_domain_only]) < 1.0  # known shapes remain
    for step in range(3):
        parts = pretrain_batch(0, step, 40, 0.5, c)
        refs = [sb for sb in parts if sb.context.has_ref]
        assert sum(sb.x0.shape[0] for sb in parts) == 40
        assert [sb.x0.shape[0] for sb in refs] == [24] and all(sb.context.route == "tokens" for sb in refs)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(SEEDS)
def test_copy_mixture_is_all_translated_glyph_pairs(seed):
    """The diagnostic mixture ``copy``: every sample carries a reference (no text-only, no
    encoder route), its concept is an unlabelled glyph, and the reference is the same glyph
    at the same size but another position."""
    cfg = MIXTURES["copy"]
    rng = np.random.default_rng(seed)
    for _ in range(20):
        tgt, ref, _ = mix._ref_pair(rng, cfg, cfg.aligned_prob(0.5))
        assert tgt.shape == ref.shape == "glyph" and ref.glyph == tgt.glyph and ref.size == tgt.size
        assert (ref.cx, ref.cy) != (tgt.cx, tgt.cy)
    parts = pretrain_batch(seed, 0, 16, 0.5, cfg)
    assert [(sb.x0.shape[0], sb.context.has_ref, sb.context.route) for sb in parts] == [(16, True, "tokens")]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(SEEDS)
def test_domain_mixture_is_the_pastel_rows_task_in_fresh_domains(seed):
    """The diagnostic mixture ``domain``: every reference sample is in a fresh procedural
    domain (never pastel) shared by target and reference, its caption names the target's
    shape with the real word (the reference carries only the domain, as in the pastel row),
    and the reference has the target's shape or (domain-only pairs) another one; 40 % of each
    batch stays text-only."""
    cfg = MIXTURES["domain"]
    rng = np.random.default_rng(seed)
    same = other = 0
    for _ in range(40):
        tgt, ref, cap = mix._ref_pair(rng, cfg, cfg.aligned_prob(0.5))
        assert tgt.domain.startswith("fam:") and ref.domain == tgt.domain
        assert tgt.shape in V.KNOWN_SHAPES and tgt.shape in cap.split() and V.SHAPE_TOKEN not in cap.split()
        same, other = same + (ref.shape == tgt.shape), other + (ref.shape != tgt.shape)
    assert same and other
    parts = pretrain_batch(seed, 0, 20, 0.5, cfg)
    assert [(sb.x0.shape[0], sb.context.has_ref) for sb in parts] == [(8, False), (12, True)]


def test_v2d_is_v2c_with_a_larger_domain_share():
    """Mixture v2d is v2c with more of each batch in a procedural domain (36 % against 21 %),
    the room taken from glyph pairs; every other field is v2c's."""
    c, d = MIXTURES["v2c"], MIXTURES["v2d"]

    def share(m):
        return m.p_ref * (m.p_domain_only + (1 - m.p_domain_only) * m.p_domain)

    assert replace(d, p_glyph=c.p_glyph, p_domain_only=c.p_domain_only, p_domain=c.p_domain) == c
    assert abs(share(d) - 0.36) < 1e-9 and abs(share(c) - 0.213) < 1e-3
    rng = np.random.default_rng(0)
    pairs = [mix._ref_pair(rng, d, 0.05) for _ in range(400)]
    in_domain = sum(t.domain.startswith("fam:") for t, _, _ in pairs) / len(pairs)
    assert abs(in_domain - 0.6) < 0.08  # 0.36 / p_ref


def test_v2e_keeps_v2c_glyph_share_and_v2d_domain_share():
    """Mixture v2e (and v2f, the same with every reference placement redrawn) keeps v2c's
    share of reference samples on glyph pairs (40 %) and v2d's in a domain (60 %) on more
    reference samples, so 28 % of each batch holds glyph pairs (v2c 24 %) and 42 % a domain,
    the room taken from text-only samples (30 %) and fills; v2e's placement fields are v2c's.
    Drawn pairs match the configured shares."""
    c, e = MIXTURES["v2c"], MIXTURES["v2e"]
    assert abs(e.p_ref * e.p_glyph - 0.28) < 1e-9 and abs(c.p_ref * c.p_glyph - 0.24) < 1e-9
    assert abs(e.p_ref * (e.p_domain_only + (1 - e.p_domain_only) * e.p_domain) - 0.42) < 1e-9
    assert (e.aligned_start, e.aligned_end, e.jitter_size, e.p_encoder) == (c.aligned_start, c.aligned_end, False, 0.0)
    rng = np.random.default_rng(1)
    pairs = [mix._ref_pair(rng, e, 0.05) for _ in range(500)]
    glyph = sum(t.shape == "glyph" for t, _, _ in pairs) / len(pairs)
    in_domain = sum(t.domain.startswith("fam:") for t, _, _ in pairs) / len(pairs)
    assert abs(glyph - 0.4) < 0.07 and abs(in_domain - 0.6) < 0.07  # 0.28 and 0.42 over p_ref
    parts = pretrain_batch(0, 0, 20, 0.5, e)
    assert [(sb.x0.shape[0], sb.context.has_ref) for sb in parts] == [(6, False), (14, True)]
    f = MIXTURES["v2f"]  # v2e with no reference aligned with its target
    assert replace(f, aligned_start=e.aligned_start, aligned_end=e.aligned_end) == e
    assert f.aligned_prob(0.0) == f.aligned_prob(1.0) == 0.0
    g = MIXTURES["v2g"]  # v2f with 36 % glyph pairs, 48 % in a domain, 20 % text-only
    assert replace(g, p_ref=f.p_ref, p_glyph=f.p_glyph) == f
    assert abs(g.p_ref * g.p_glyph - 0.36) < 1e-9 and abs(1 - g.p_ref - 0.2) < 1e-9


def test_v2h_trades_glyph_pairs_for_rare_word_known_shape_pairs():
    """Mixture v2h is v2g with glyph pairs cut to 24 % of each batch and every known-shape
    reference pair captioned with the rare word ``sks`` (28 % of each batch against v2g's
    about 10 %), so ``sks`` + a reference stops meaning "draw a glyph". Drawn pairs match."""
    g, h = MIXTURES["v2g"], MIXTURES["v2h"]
    assert replace(h, p_glyph=g.p_glyph, p_rare_word=g.p_rare_word) == g
    known = lambda m: m.p_ref * (1 - m.p_glyph - m.p_style_copy - m.p_fill_family - m.p_domain_only)
    assert abs(h.p_ref * h.p_glyph - 0.24) < 1e-9
    assert abs(known(h) * h.p_rare_word - 0.28) < 1e-9 and abs(known(g) * g.p_rare_word - 0.096) < 1e-9
    rng = np.random.default_rng(2)
    pairs = [mix._ref_pair(rng, h, 0.0) for _ in range(600)]
    glyph = sum(t.shape == "glyph" for t, _, _ in pairs) / len(pairs)
    sks_known = sum(t.shape != "glyph" and V.SHAPE_TOKEN in c.split() for t, _, c in pairs) / len(pairs)
    assert abs(glyph - 0.3) < 0.06 and abs(sks_known - 0.35) < 0.06  # 0.24 and 0.28 over p_ref
