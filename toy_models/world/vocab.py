"""Toy-world vocabulary: the words captions are made of, and tokenization.

Captions are short word sequences, e.g. ``"small red circle on black"`` or
``"large blue checker sks on white"``. Token ids are fixed by the order of
:data:`WORDS`; id 0 is padding. Rare tokens (``sks``: "the shape of the reference",
``zwx``: "the fill style of the reference") are reserved for held-out concepts and never
carry a meaning in text-only base training.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

SIZES: tuple[str, ...] = ("small", "large")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "white")
KNOWN_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
#: Held-out shape (never rendered in diffusion training): a canonical "L" glyph.
NOVEL_SHAPE = "ell"
KNOWN_STYLES: tuple[str, ...] = ("solid", "checker", "dotted", "vstripe")
#: Held-out fill style (never rendered in diffusion training): horizontal stripes.
NOVEL_STYLE = "hstripe"
#: Rare token naming "the shape of the reference image".
SHAPE_TOKEN = "sks"
#: Rare token naming "the fill style of the reference image".
STYLE_TOKEN = "zwx"

PAD = "<pad>"
WORDS: tuple[str, ...] = (
    (PAD, "on")
    + SIZES
    + COLORS
    + BACKGROUNDS
    + KNOWN_SHAPES
    + tuple(s for s in KNOWN_STYLES if s != "solid")
    + (SHAPE_TOKEN, STYLE_TOKEN)
)
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
VOCAB_SIZE = len(WORDS)
#: Longest caption: size color style shape on bg.
MAX_TOKENS = 6


def tokenize(captions: Sequence[str], max_len: int = MAX_TOKENS) -> Tensor:
    """Turn captions into a padded id tensor.

    Args:
        captions: B caption strings of known words separated by spaces.
        max_len: padded length L.

    Returns:
        LongTensor [B, L], 0 = padding.

    Raises:
        ValueError: naming the caption and word, for an unknown word, an empty caption or a
            caption longer than ``max_len``.
    """
    out = torch.zeros(len(captions), max_len, dtype=torch.long)
    for i, cap in enumerate(captions):
        words = cap.split()
        if not words:
            raise ValueError(f"caption {i} is empty")
        if len(words) > max_len:
            raise ValueError(f"caption {i} {cap!r} has {len(words)} words, more than {max_len}")
        for j, w in enumerate(words):
            if w not in WORD_TO_ID or w == PAD:
                raise ValueError(
                    f"caption {i} {cap!r}: unknown word {w!r}; vocabulary: {', '.join(WORDS[1:])}"
                )
            out[i, j] = WORD_TO_ID[w]
    return out


def detokenize(ids: Tensor) -> list[str]:
    """Inverse of :func:`tokenize` (padding dropped)."""
    return [" ".join(WORDS[int(t)] for t in row if int(t) != 0) for row in ids]
