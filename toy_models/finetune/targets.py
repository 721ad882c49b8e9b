"""Fine-tuning targets: a few image–caption pairs, built in or from a user folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from toy_models import data as D
from toy_models import vocab as V

__all__ = ["TargetSet", "builtin_targets", "load_targets", "BUILTIN"]

# name -> (spec sampler kwargs, caption overrides); rare tokens name the held-out concept.
BUILTIN = {
    "concept:ell": (dict(shapes=(V.NOVEL_SHAPE,)), dict(shape_word=V.SHAPE_TOKEN)),
    "style:hstripe": (dict(styles=(V.NOVEL_STYLE,)), dict(style_word=V.STYLE_TOKEN)),
    "domain:pastel": (dict(domain="pastel"), {}),
}


@dataclass
class TargetSet:
    """N target images [N, 3, 16, 16] in [−1, 1] with their captions (and specs if built in)."""

    images: Tensor
    captions: list[str]
    specs: list[D.Spec] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"target images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"{self.images.shape[0]} target images but {len(self.captions)} captions")
        V.tokenize(self.captions)  # every caption must be in the vocabulary (error names it)

    def __len__(self) -> int:
        return self.images.shape[0]


def builtin_targets(name: str, n: int, seed: int) -> TargetSet:
    """``n`` deterministic targets of a built-in set (see :data:`BUILTIN`)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in target set {name!r}; known: {sorted(BUILTIN)}")
    spec_kw, cap_kw = BUILTIN[name]
    specs = [D.random_spec(np.random.default_rng([seed, i]), **spec_kw) for i in range(n)]
    return TargetSet(D.render_batch(specs), [D.caption(s, **cap_kw) for s in specs], specs, name)


def load_targets(source: str, n: int = 12, seed: int = 0) -> TargetSet:
    """A built-in set by name, or a folder of pairs (``images/`` + ``captions.jsonl``)."""
    if source in BUILTIN:
        return builtin_targets(source, n, seed)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"targets {source!r}: neither a built-in set ({sorted(BUILTIN)}) nor an existing folder"
        )
    from toy_models.folder import load_pairs

    images, captions = load_pairs(path)
    return TargetSet(torch.as_tensor(images), list(captions), None, str(path))
