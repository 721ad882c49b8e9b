"""Held-out concept sets (never in diffusion training) and their prompts.

- ``ell``: the novel shape, caption ``"<size> <color> sks on <bg>"``;
- ``hstripe``: the novel fill style on known shapes, caption ``"large <color> zwx <shape> on <bg>"``;
- ``pastel``: the domain set — every image restyled into the pastel palette, captions
  unchanged (a full-fine-tuning target).

CLI (writes a user-style folder ``images/`` + ``captions.jsonl``)::

    python -m toy_models.world.concepts --concept ell --n 12 --seed 0 --out runs/ell
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from toy_models.world import data as D
from toy_models.world import vocab as V

CONCEPTS = ("ell", "hstripe", "pastel")


def concept_specs(concept: str, n: int, seed: int) -> list[D.Spec]:
    """``n`` deterministic target specs of a held-out concept."""
    if concept == "ell":
        return D.specs(seed, n, shapes=(V.NOVEL_SHAPE,))
    if concept == "hstripe":
        return D.specs(seed, n, styles=(V.NOVEL_STYLE,))
    if concept == "pastel":
        return D.specs(seed, n, domain="pastel")
    raise ValueError(f"unknown concept {concept!r}; choose from {CONCEPTS}")


def concept_captions(concept: str, specs: Sequence[D.Spec]) -> list[str]:
    """Prompts naming the concept with its rare token (pastel: the ordinary caption)."""
    if concept == "hstripe":
        return [D.caption(s, style_word=V.STYLE_TOKEN) for s in specs]
    return [D.caption(s) for s in specs]


def prior_specs(n: int, seed: int) -> list[D.Spec]:
    """Known-concept prompts (solid known shapes) to check prior knowledge is kept."""
    return D.specs(seed, n)


def main(argv: list[str] | None = None) -> None:
    from toy_models.world.folder import write_pair_folder

    p = argparse.ArgumentParser(description="write a held-out concept as an images/ + captions.jsonl folder")
    p.add_argument("--concept", choices=CONCEPTS, required=True)
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    sp = concept_specs(a.concept, a.n, a.seed)
    write_pair_folder(a.out, D.render_batch(sp), concept_captions(a.concept, sp))
    print(f"wrote {a.n} pairs to {a.out}")


if __name__ == "__main__":
    main()
