"""Deterministic procedural image–caption world.

Every image is one shape on a flat background, rendered anti-aliased at 16×16 RGB in
[−1, 1] (``x = 2·rgb − 1``). A :class:`Spec` fully determines its image:

- shape ∈ 6 known shapes, the held-out ``"ell"`` (an L glyph), or ``"glyph"`` — an
  unlabelled procedural glyph (union of bars or blobs, L-like mirrors included, the
  canonical L excluded) used to teach copying from a reference;
- color ∈ 6 colours, bg ∈ 3 backgrounds, size ∈ {small, large}, a centre position;
- style ∈ known fills (solid, checker, dotted, vstripe) or the held-out ``"hstripe"``;
- domain ∈ {"base", "pastel"} or a procedural ``"fam:…"`` domain: ``pastel`` is a
  consistent restyling of every image (pastel shape colours on dusky backgrounds), held
  out for full-fine-tuning experiments; the procedural family (hue / saturation /
  lightness / background restylings, :func:`random_domain`) carries domains in base
  training's reference pairs, and never comes near pastel (:data:`DOMAIN_HOLDOUT`);
- style ``"pattern"``: an unlabelled procedural periodic fill (:func:`random_fill`: stripes
  in four directions, checkers, dot grids), the fill analogue of the glyphs; horizontal
  period-2 stripes (the held-out ``hstripe``) are excluded in both phases.

Determinism: spec samplers take a ``numpy.random.Generator``; :func:`spec_at` builds the
generator from ``(seed, index)`` so item ``i`` of a seeded set never depends on others.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from toy_models.world import vocab as V

RES = 16
SUPERSAMPLE = 4
RADIUS = {"small": 3.2, "large": 5.2}

PALETTES: dict[str, dict[str, tuple[float, float, float]]] = {
    "base": {
        "red": (0.90, 0.10, 0.10), "green": (0.10, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
        "yellow": (0.95, 0.90, 0.10), "magenta": (0.90, 0.15, 0.85), "cyan": (0.10, 0.85, 0.90),
        "black": (0.05, 0.05, 0.05), "gray": (0.50, 0.50, 0.50), "white": (0.95, 0.95, 0.95),
    },
    "pastel": {
        "red": (0.98, 0.62, 0.62), "green": (0.62, 0.95, 0.68), "blue": (0.62, 0.72, 0.99),
        "yellow": (0.99, 0.96, 0.62), "magenta": (0.97, 0.64, 0.95), "cyan": (0.62, 0.95, 0.97),
        "black": (0.10, 0.08, 0.25), "gray": (0.30, 0.22, 0.38), "white": (0.48, 0.40, 0.58),
    },
}
DOMAINS: tuple[str, ...] = tuple(PALETTES)

Glyph = tuple[tuple[float, ...], ...]  # ("r", x0, y0, x1, y1) / ("c", cx, cy, r) as floats


@dataclass(frozen=True)
class Spec:
    """Everything that determines one image (and its caption)."""

    shape: str
    color: str
    bg: str
    size: str
    cx: float
    cy: float
    style: str = "solid"
    domain: str = "base"
    glyph: Optional[Glyph] = None  # only for shape == "glyph"
    fill: Optional[tuple[int, ...]] = None  # only for style == "pattern": (kind, period, width, phase)

    def replace(self, **kw) -> "Spec":
        return dataclasses.replace(self, **kw)


# ---------------------------------------------------------------------------- masks


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, glyph: Optional[Glyph]) -> np.ndarray:
    """Boolean inside-mask in normalised coords (u right, v down, shape radius = 1)."""
    a, b = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(a, b) <= 0.8
    if shape == "triangle":
        return (v <= 0.8) & (a <= (v + 0.95) / 1.75 * 0.95)
    if shape == "cross":
        return ((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "diamond":
        return a + b <= 1.0
    if shape == V.NOVEL_SHAPE:
        return ((u >= -0.8) & (u <= -0.25) & (v >= -0.9) & (v <= 0.9)) | (
            (u >= -0.8) & (u <= 0.8) & (v >= 0.35) & (v <= 0.9)
        )
    if shape == "glyph":
        if glyph is None:
            raise ValueError("shape 'glyph' needs glyph parameters")
        m = np.zeros(np.broadcast(u, v).shape, dtype=bool)
        for g in glyph:
            if g[0] == 0.0:  # rectangle
                _, x0, y0, x1, y1 = g
                m |= (u >= x0) & (u <= x1) & (v >= y0) & (v <= y1)
            else:  # disc
                _, gx, gy, gr = g
                m |= (u - gx) ** 2 + (v - gy) ** 2 <= gr * gr
        return m
    raise ValueError(f"unknown shape {shape!r}")


def _style_pattern(style: str, ix: np.ndarray, iy: np.ndarray, fill: Optional[tuple[int, ...]] = None) -> np.ndarray:
    """1 where the fill shows the shape colour, 0 where it shows the background."""
    if style == "pattern":
        if fill is None:
            raise ValueError("style 'pattern' needs fill parameters")
        return _fill_pattern(fill, ix, iy)
    if style == "solid":
        return np.ones(np.broadcast(ix, iy).shape)
    if style == "checker":
        return (((ix // 2) + (iy // 2)) % 2 == 0).astype(float)
    if style == "dotted":
        return 1.0 - ((ix % 3 == 1) & (iy % 3 == 1)).astype(float)
    if style == "vstripe":
        return (ix % 2 == 0).astype(float) * np.ones_like(iy)
    if style == V.NOVEL_STYLE:
        return (iy % 2 == 0).astype(float) * np.ones_like(ix)
    raise ValueError(f"unknown style {style!r}")


_SS = (np.arange(RES * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
_GX, _GY = np.meshgrid(_SS, _SS)  # [64,64] pixel coords, x right, y down
_IX, _IY = np.meshgrid(np.arange(RES), np.arange(RES))


def coverage(spec: Spec) -> np.ndarray:
    """Anti-aliased shape coverage in [0, 1], shape [16, 16]."""
    r = RADIUS[spec.size]
    m = _shape_mask(spec.shape, (_GX - spec.cx) / r, (_GY - spec.cy) / r, spec.glyph)
    return m.reshape(RES, SUPERSAMPLE, RES, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: Spec) -> np.ndarray:
    """Render a spec: float32 [3, 16, 16] in [−1, 1].

    ``pixel = bg + coverage · pattern · (colour − bg)``, then ``x = 2·pixel − 1``.
    """
    pal = domain_palette(spec.domain)
    col = np.asarray(pal[spec.color])[:, None, None]
    bg = np.asarray(pal[spec.bg])[:, None, None]
    a = coverage(spec) * _style_pattern(spec.style, _IX, _IY, spec.fill)
    img = bg + a[None] * (col - bg)
    return (2.0 * img - 1.0).astype(np.float32)


def render_batch(specs: Sequence[Spec]) -> Tensor:
    """Render many specs: float32 tensor [B, 3, 16, 16]."""
    return torch.from_numpy(np.stack([render(s) for s in specs]))


# --------------------------------------------------------------------- captions


def caption(spec: Spec, shape_word: Optional[str] = None, style_word: Optional[str] = None) -> str:
    """Caption ``[size] [color] [style] [shape] on [bg]``; style omitted when solid.

    ``shape_word``/``style_word`` override the words (e.g. with the rare tokens); glyphs and
    held-out concepts have no word of their own, so they default to the rare tokens.
    """
    if shape_word is None:
        shape_word = spec.shape if spec.shape in V.KNOWN_SHAPES else V.SHAPE_TOKEN
    if style_word is None:
        if spec.style == "solid":
            style_word = ""
        else:
            style_word = spec.style if spec.style in V.KNOWN_STYLES else V.STYLE_TOKEN
    words = [spec.size, spec.color, style_word, shape_word, "on", spec.bg]
    return " ".join(w for w in words if w)


# ------------------------------------------------------------ procedural fills

#: Fill kinds of :func:`random_fill`: stripes (vertical, horizontal, diagonal, anti-diagonal),
#: checker cells, dot grid.
FILL_KINDS = ("vstripes", "hstripes", "diag", "antidiag", "checker", "dots")


def _fill_pattern(fill: tuple[int, ...], ix: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """Binary fill [16, 16] of ``fill = (kind, period, width, phase)`` (pixel-grid anchored)."""
    kind, period, width, phase = (int(v) for v in fill)
    name = FILL_KINDS[kind]
    if name == "checker":  # cells of side `period`
        return ((((ix + phase) // period) + (iy // period)) % 2 == 0).astype(float)
    if name == "dots":  # background-coloured dot every `period` pixels
        return 1.0 - (((ix + phase) % period == 0) & ((iy + phase) % period == 0)).astype(float)
    coord = {"vstripes": ix, "hstripes": iy, "diag": ix + iy, "antidiag": ix - iy}[name]
    return (((coord + phase) % period) < width).astype(float)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def random_fill(rng: np.random.Generator) -> tuple[int, ...]:
    """An unlabelled periodic fill ``(kind, period, width, phase)``.

    Redrawn when nearly all-on/off (shape colour share outside [0.3, 0.8]) or when it looks
    like the held-out horizontal stripes (agreement > 0.85 with ``hstripe`` in either
    phase): period-2 horizontal stripes never appear, other periods and directions do.
    """
    held = _style_pattern(V.NOVEL_STYLE, _IX, _IY)
    while True:
        kind = int(rng.integers(len(FILL_KINDS)))
        period = int(rng.integers(2, 5))
        width = int(rng.integers(1, period)) if FILL_KINDS[kind] not in ("checker", "dots") else 1
        if FILL_KINDS[kind] == "checker":
            period = int(rng.integers(1, 4))
        phase = int(rng.integers(0, max(period, 2)))
        f = (kind, period, width, phase)
        pat = _fill_pattern(f, _IX, _IY)
        if not 0.3 <= pat.mean() <= 0.8:
            continue
        if max(_agreement(pat, held), _agreement(pat, 1 - held)) > 0.85:
            continue
        return f


# ------------------------------------------------------------ domain family

_FAMILY_PREFIX = "fam:"


def _hsv_adjust(rgb: tuple[float, float, float], hue: float, sat: float, light: float) -> tuple[float, ...]:
    import colorsys

    h, s, v = colorsys.rgb_to_hsv(*rgb)
    r = np.asarray(colorsys.hsv_to_rgb((h + hue) % 1.0, min(1.0, s * sat), v))
    r = r + light * (1 - r) if light >= 0 else r * (1 + light)  # towards white / black
    return tuple(float(c) for c in np.clip(r, 0.0, 1.0))


def family_palette(hue: float, sat: float, light: float, bg_lo: float, bg_hi: float,
                   tint_hue: float, tint: float) -> dict[str, tuple[float, float, float]]:
    """The palette of one procedural domain.

    Shape colours: hue rotated by ``hue`` (turns), saturation scaled by ``sat``, mixed
    towards white (``light > 0``) or black (``light < 0``). Backgrounds: the base
    backgrounds' grey level ``g ∈ {0.05, 0.5, 0.95}`` remapped linearly to
    ``[bg_lo, bg_hi]`` (inverted when ``bg_lo > bg_hi``) and tinted towards the fully
    saturated colour of ``tint_hue`` by ``tint``.
    """
    import colorsys

    base = PALETTES["base"]
    pal = {c: _hsv_adjust(base[c], hue, sat, light) for c in V.COLORS}
    tint_rgb = np.asarray(colorsys.hsv_to_rgb(tint_hue % 1.0, 1.0, 1.0))
    for b in V.BACKGROUNDS:
        g = (base[b][0] - 0.05) / 0.9
        lvl = bg_lo + (bg_hi - bg_lo) * g
        col = (1 - tint) * lvl + tint * lvl * tint_rgb / max(tint_rgb.mean(), 1e-6)
        pal[b] = tuple(float(c) for c in np.clip(col, 0.0, 1.0))
    return pal


def palette_distance_between(a: dict, b: dict) -> float:
    """Mean RGB distance between two palettes over the 6 shape colours and 3 backgrounds."""
    keys = V.COLORS + V.BACKGROUNDS
    return float(np.mean([np.linalg.norm(np.subtract(a[k], b[k])) for k in keys]))


#: A procedural domain closer than this (mean RGB distance over the palette) to the
#: held-out ``pastel`` palette is never drawn by :func:`random_domain`.
DOMAIN_HOLDOUT = 0.25


def domain_palette(domain: str) -> dict[str, tuple[float, float, float]]:
    """Palette of a named domain (``base``, ``pastel``) or of a ``"fam:…"`` domain."""
    if domain in PALETTES:
        return PALETTES[domain]
    if domain.startswith(_FAMILY_PREFIX):
        vals = tuple(float(v) for v in domain[len(_FAMILY_PREFIX):].split(","))
        if len(vals) != 7:
            raise ValueError(f"domain {domain!r}: a family domain has 7 parameters, got {len(vals)}")
        return family_palette(*vals)
    raise ValueError(f"unknown domain {domain!r}; named domains: {', '.join(PALETTES)}, or 'fam:…'")


def random_domain(rng: np.random.Generator) -> str:
    """A procedural domain name ``"fam:hue,sat,light,bg_lo,bg_hi,tint_hue,tint"``.

    Hue rotation within ±0.1 turn, saturation ×[0.4, 1], lightness in [−0.35, 0.75],
    background range endpoints in [0, 1], tint up to 0.6; redrawn while the palette is
    within :data:`DOMAIN_HOLDOUT` of pastel or has a shape colour within 0.12 of its
    background (invisible shapes). Values are rounded to 3 decimals (the name is the spec).
    """
    pastel = PALETTES["pastel"]
    while True:
        vals = (rng.uniform(-0.1, 0.1), rng.uniform(0.4, 1.0), rng.uniform(-0.35, 0.75),
                rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0), rng.uniform(0.0, 0.6))
        name = _FAMILY_PREFIX + ",".join(f"{v:.3f}" for v in vals)
        pal = domain_palette(name)
        if palette_distance_between(pal, pastel) < DOMAIN_HOLDOUT:
            continue
        contrast = min(np.linalg.norm(np.subtract(pal[c], pal[b])) for c in V.COLORS for b in V.BACKGROUNDS)
        if contrast < 0.12:
            continue
        return name


# ---------------------------------------------------------------------- samplers

_GLYPH_POS = (-0.6, 0.0, 0.6)
_ELL_REF = None


def _norm_grid(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    g = (np.arange(n) + 0.5) / n * 2.4 - 1.2
    return np.meshgrid(g, g)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def random_glyph(rng: np.random.Generator) -> Glyph:
    """An unlabelled glyph: 2–3 bars on a 3×3 lattice, or 2–3 blobs.

    Rejected (and redrawn) when it looks like the held-out L (IoU > 0.6 with the
    canonical ell) or like a known shape (IoU > 0.75): mirrored/rotated Ls stay in.
    """
    u, v = _norm_grid()
    ell = _shape_mask(V.NOVEL_SHAPE, u, v, None)
    known = [_shape_mask(s, u, v, None) for s in V.KNOWN_SHAPES]
    while True:
        parts: list[tuple[float, ...]] = []
        if rng.random() < 0.7:
            for _ in range(int(rng.integers(2, 4))):
                p = float(rng.choice(_GLYPH_POS))
                lo, hi = sorted(rng.choice([-0.9, -0.3, 0.3, 0.9], size=2, replace=False))
                w = 0.28
                if rng.random() < 0.5:  # vertical bar
                    parts.append((0.0, p - w, float(lo) - w, p + w, float(hi) + w))
                else:
                    parts.append((0.0, float(lo) - w, p - w, float(hi) + w, p + w))
        else:
            for _ in range(int(rng.integers(2, 4))):
                gx, gy = rng.uniform(-0.5, 0.5, size=2)
                parts.append((1.0, float(gx), float(gy), float(rng.uniform(0.35, 0.6))))
        g = tuple(parts)
        m = _shape_mask("glyph", u, v, g)
        if m.mean() < 0.08:
            continue
        if _iou(m, ell) > 0.6 or max(_iou(m, k) for k in known) > 0.75:
            continue
        return g


def random_placement(rng: np.random.Generator, size: str) -> tuple[float, float]:
    """Centre such that the shape stays inside the image."""
    r = RADIUS[size]
    lo, hi = r + 0.3, RES - r - 0.3
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def random_spec(
    rng: np.random.Generator,
    shapes: Sequence[str] = V.KNOWN_SHAPES,
    styles: Sequence[str] = ("solid",),
    style_probs: Optional[Sequence[float]] = None,
    domain: str = "base",
) -> Spec:
    """Draw a spec uniformly over the given shapes/styles and all colours/bgs/sizes."""
    shape = str(rng.choice(list(shapes)))
    style = str(rng.choice(list(styles), p=style_probs))
    size = str(rng.choice(V.SIZES))
    if style != "solid":
        size = "large"  # fills need room to be visible
    cx, cy = random_placement(rng, size)
    color = str(rng.choice(V.COLORS))
    bg = str(rng.choice(V.BACKGROUNDS))
    glyph = random_glyph(rng) if shape == "glyph" else None
    return Spec(shape, color, bg, size, cx, cy, style, domain, glyph)


def spec_at(seed: int, index: int, **kw) -> Spec:
    """Item ``index`` of the seeded set: independent of every other index."""
    return random_spec(np.random.default_rng([seed, index]), **kw)


def specs(seed: int, n: int, **kw) -> list[Spec]:
    """The first ``n`` items of a seeded set (see :func:`spec_at`)."""
    return [spec_at(seed, i, **kw) for i in range(n)]


def concept_reference(
    rng: np.random.Generator, target: Spec, aligned: bool, same_color: bool, resize: bool = True
) -> Spec:
    """A reference that shares the target's concept (shape/glyph and style), not its pixels.

    Background always redrawn; colour kept when ``same_color``; placement and size kept
    when ``aligned``, else redrawn (the size of a solid shape only when ``resize``; without it
    the jitter is a pure translation).
    """
    bg = str(rng.choice(V.BACKGROUNDS))
    color = target.color if same_color else str(rng.choice(V.COLORS))
    size, cx, cy = target.size, target.cx, target.cy
    if not aligned:
        size = str(rng.choice(V.SIZES)) if (resize and target.style == "solid") else target.size
        cx, cy = random_placement(rng, size)
    return target.replace(bg=bg, color=color, size=size, cx=cx, cy=cy)
