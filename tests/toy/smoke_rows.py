"""The 64-prompt smoke measurements of a 4-step toy model, measured once per model folder.

``tests/toy/test_shipped.py`` (fixed acceptance floors) and ``tests/toy/test_weights_record.py``
(agreement with the acceptance record) check the same rows of the shipped model; sampling
them once keeps the suite from drawing the same 4-step samples twice.
"""

from __future__ import annotations

import functools
import torch

from toy_models.eval.evaluate import copy_accuracy, score_prompts
from toy_models.models.dit import ToyDiT
from toy_models.models.hub import load_evaluator, load_turbo
from toy_models.world import data as D
from toy_models.world.concepts import concept_specs

N = 64


@functools.cache
def model_and_evaluator(folder: str) -> tuple[ToyDiT, torch.nn.Module]:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_turbo(folder), load_evaluator()


@functools.cache
def smoke_rows(folder: str) -> dict[str, dict]:
    """Scores at 4 steps, seed 1: ``text_only`` (known prompts, :func:`score_prompts`),
    ``trained_aligned`` (trained shapes from an aligned reference), ``ell_teacher`` / ``ell_student``
    (the L with the exact target as reference / text only, same `sks` prompts)."""
    turbo, ev = model_and_evaluator(folder)
    ell = concept_specs("ell", N, 21)
    return {
        "text_only": score_prompts(turbo, ev, D.specs(1, N), steps=4, seed=1),
        "trained_aligned": copy_accuracy(turbo, ev, D.specs(23, N), 4, "aligned", "tokens", seed=1),
        "ell_teacher": copy_accuracy(turbo, ev, ell, 4, "exact", "tokens", seed=1),
        "ell_student": copy_accuracy(turbo, ev, ell, 4, "exact", None, seed=1),
    }
