"""Toy-world metrics: concept accuracy, toy-FID, palette distance, copy IoU.

- **toy-FID**: Fréchet distance between Gaussians fitted to evaluator features,
  ``FD = ||μ₁ − μ₂||² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})``; this equals
  torchmetrics' ``FrechetInceptionDistance`` with the evaluator as custom feature extractor
  (computed here in float64 with symmetric eigendecompositions, no extra dependency).
- **palette distance**: mean over pixels of the distance (RGB in [0, 1]) to the nearest
  colour of the domain palette; it rises with both blur (edge mixtures) and noise, which a
  Laplacian sharpness ratio misses in a flat-colour world.
- **copy IoU**: IoU of the generated foreground (pixels far from the background colour)
  with the reference shape's coverage mask, for aligned copies of unlabelled glyphs.
- **feature distance** (the DINO-D analogue): ``1 − cos(f(x̂_i), f(x_i))`` between evaluator
  features of each generated sample and its own target, averaged over pairs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from toy_models.world import data as D


def _sqrtm_psd(a: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((a + a.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance between feature sets [N1, d] and [N2, d] (see module doc)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * torch.trace(cross))


def toy_fid(evaluator, fake: Tensor, real: Tensor) -> float:
    """toy-FID between generated and real images [N, 3, 16, 16] in [−1, 1]."""
    return frechet_distance(evaluator.embed(fake), evaluator.embed(real))


def palette_distance(x: Tensor, domain: str = "base") -> float:
    """Mean per-pixel distance to the nearest palette colour of ``domain``."""
    pal = torch.tensor(list(D.PALETTES[domain].values()), dtype=torch.float32)  # [P,3]
    rgb = ((x.float() + 1) / 2).permute(0, 2, 3, 1).reshape(-1, 3)  # [N·H·W,3]
    return float(torch.cdist(rgb, pal).min(dim=1).values.mean())


def accuracy(pred: Sequence[str], target: Sequence[str]) -> float:
    """Share of equal labels."""
    if len(pred) != len(target):
        raise ValueError(f"{len(pred)} predictions vs {len(target)} targets")
    return float(np.mean([p == t for p, t in zip(pred, target)]))


def foreground(x: Tensor, bgs: Sequence[str], domain: str = "base", thresh: float = 0.3) -> Tensor:
    """Bool mask [N, H, W]: pixels farther than ``thresh`` (RGB distance) from the bg colour."""
    pal = D.PALETTES[domain]
    bg = torch.tensor([pal[b] for b in bgs], dtype=torch.float32)[:, :, None, None]  # [N,3,1,1]
    rgb = (x.float() + 1) / 2
    return (rgb - bg).norm(dim=1) > thresh


def silhouette(x: Tensor, min_contrast: float = 0.12) -> Tensor:
    """A palette-free re-rendering of images [N,3,H,W] in [-1, 1]: each image's shape
    redrawn as a base blue shape on a base white background, so the evaluator's shape head
    can read images in any domain (it was trained on the base and pastel palettes only).

    With ``b`` the median of an image's border pixels and ``d(p) = ‖rgb(p) − b‖`` a pixel's
    RGB distance from it, the pixel's opacity is ``α(p) = d(p) / max(max_p d, min_contrast)``
    (the floor keeps a flat image flat; 0.12 is the least shape/background contrast a
    procedural domain may have, :func:`toy_models.world.data.random_domain`).
    """
    rgb = (x.float() + 1) / 2  # [N,3,H,W]
    border = torch.cat([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, 1:-1, 0], rgb[:, :, 1:-1, -1]], dim=2)  # [N,3,P]
    bg = border.median(dim=2).values[:, :, None, None]  # [N,3,1,1]
    d = (rgb - bg).norm(dim=1, keepdim=True)  # [N,1,H,W]
    alpha = d / d.flatten(1).max(dim=1).values.clamp_min(min_contrast)[:, None, None, None]
    pal = D.PALETTES["base"]
    fg = torch.tensor(pal["blue"])[None, :, None, None]
    white = torch.tensor(pal["white"])[None, :, None, None]
    return 2 * (alpha * fg + (1 - alpha) * white) - 1


def copy_iou(x: Tensor, specs: Sequence[D.Spec]) -> float:
    """Mean IoU of generated foreground vs the coverage (> 0.5) of the given specs' shapes."""
    fg = foreground(x, [s.bg for s in specs], specs[0].domain)
    cov = torch.from_numpy(np.stack([D.coverage(s) for s in specs])) > 0.5
    inter = (fg & cov).flatten(1).sum(1).float()
    union = (fg | cov).flatten(1).sum(1).clamp_min(1).float()
    return float((inter / union).mean())


def feature_distance(evaluator, fake: Tensor, real: Tensor) -> float:
    """Mean paired feature distance, the toy analogue of DINO-D (lower: closer to the targets).

    ``D = (1/N)·Σ_i (1 − cos(f(fake_i), f(real_i)))`` with ``f`` the evaluator's mean-pooled
    penultimate features (the toy-FID space) and ``cos(a, b) = a·b / (|a|·|b|)``; sample i is
    compared with its own target i (e.g. the sample of a training prompt with that prompt's
    target image). D is in [0, 2]: 0 for identical features, 1 for orthogonal ones.

    Args:
        evaluator: anything with ``embed(x [N, 3, H, W]) -> [N, d]``.
        fake, real: paired images [N, 3, H, W] in [−1, 1], same shape.

    Raises:
        ValueError: shapes differ, or no pairs.
    """
    if fake.shape != real.shape:
        raise ValueError(f"feature_distance pairs samples with targets: fake {tuple(fake.shape)} != real {tuple(real.shape)}")
    if fake.shape[0] == 0:
        raise ValueError("feature_distance needs at least one (sample, target) pair")
    f1, f2 = evaluator.embed(fake).double(), evaluator.embed(real).double()
    cos = torch.nn.functional.cosine_similarity(f1, f2, dim=1, eps=1e-12)
    return float((1.0 - cos).mean())
