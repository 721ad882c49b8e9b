"""Fine-tuning targets: a few image–caption pairs, built in or from a user folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.world.concepts import concept_captions, concept_specs

__all__ = ["TargetSet", "builtin_targets", "load_targets", "BUILTIN"]

# built-in set name -> held-out concept of toy_models.world.concepts (rare tokens name it).
BUILTIN = {"concept:ell": "ell", "style:hstripe": "hstripe", "domain:pastel": "pastel"}


@dataclass
class TargetSet:
    """N target images [N, 3, 16, 16] in [−1, 1] with their captions (and specs if built in).

    ``sources`` locates each pair for error messages (``captions.jsonl:LINE`` for a folder).
    """

    images: Tensor
    captions: list[str]
    specs: list[D.Spec] | None = None
    name: str = ""
    sources: list[str] | None = None

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
    specs = concept_specs(BUILTIN[name], n, seed)
    return TargetSet(D.render_batch(specs), concept_captions(BUILTIN[name], specs), specs, name)


def load_targets(source: str, n: int = 12, seed: int = 0) -> TargetSet:
    """A built-in set by name, or a folder of pairs (``images/`` + ``captions.jsonl``)."""
    if source in BUILTIN:
        return builtin_targets(source, n, seed)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"targets {source!r}: neither a built-in set ({sorted(BUILTIN)}) nor an existing folder"
        )
    from toy_models.world.folder import load_pair_folder

    pairs = load_pair_folder(path)
    return TargetSet(pairs.images, list(pairs.captions), None, str(path), [f"{path / s}" for s in pairs.sources])
