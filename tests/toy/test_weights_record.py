"""Every committed 4-step toy model reproduces its acceptance record on a smaller sample.

The models are the shipped ``toy_models/weights/toy-dit-turbo4`` (record:
``toy_models/weights/acceptance.json``) and, while one exists, the toy world v2 candidate
``toy_models/weights/v2-candidate/toy-dit-turbo4`` (record: ``v2-candidate/acceptance.json``;
the output of ``toy_models/recipes/v2_chain.sh``, kept so that shipping it does not need the
2-hour chain again). Each check re-measures one acceptance row on 64 prompts with another
seed than the record's (n = 256, seed 0) and asks for the recorded value within ±0.12, about
2 binomial standard errors at 64 prompts and p = 0.5. The record says whether a row meets
its acceptance target (``checks``); this module says that the weights in the repo are the
ones the record measured, in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toy_models.eval.evaluate import raw_target_teacher
from toy_models.models.hub import EVALUATOR, TURBO, WEIGHTS_DIR, weights_available

from .smoke_rows import N, model_and_evaluator, smoke_rows

TOL = 0.12
MODELS = {"shipped": (WEIGHTS_DIR / TURBO, WEIGHTS_DIR / "acceptance.json"),
          "v2-candidate": (WEIGHTS_DIR / "v2-candidate" / TURBO, WEIGHTS_DIR / "v2-candidate" / "acceptance.json")}
PRESENT = [k for k, (m, r) in MODELS.items() if (m / "model.safetensors").is_file() and r.is_file()]

pytestmark = pytest.mark.skipif(not (PRESENT and weights_available(EVALUATOR)), reason="no toy weights with a record")


@pytest.fixture(scope="module", params=PRESENT)
def setup(request):
    folder, record = MODELS[request.param]
    return str(folder), json.loads(Path(record).read_text())


@pytest.mark.parametrize("concept", ["ell", "hstripe", "pastel"])
def test_raw_target_teacher_matches_its_record(setup, concept):
    """Given the RAW target as its reference, the 4-step teacher draws the held-out concept,
    keeps the prompt's shape, and places the sample relative to the target (IoU with the
    target's mask minus IoU with a shifted mask: about 0.6 for a placement copy, about 0 for
    a placement that follows the noise) as recorded."""
    folder, rec = setup
    r = raw_target_teacher(*model_and_evaluator(folder), concept, N, 4, seed=1)
    want = rec["raw_teacher"]["turbo@4"][concept]
    for k in ("acc", "shape_acc"):
        assert abs(r[k] - want[k]) <= TOL, (k, r, want)
    excess, want_excess = r["iou_target"] - r["iou_shifted"], want["iou_target"] - want["iou_shifted"]
    assert abs(excess - want_excess) <= TOL, (excess, want_excess)


def test_text_only_and_copy_rows_match_their_record(setup):
    """Text-only 4-step samples show the named shape, the teacher copies trained shapes from
    an aligned reference and the L from the exact target, and the text-only student does not
    draw the L for `sks`, each as recorded."""
    folder, rec = setup
    rows, copy = smoke_rows(folder), rec["copy"]["turbo@4"]
    measured = {
        "text-only shape": (rows["text_only"]["shape_acc"], rec["text_only"]["turbo@4"]["shape_acc"]),
        "trained, aligned": (rows["trained_aligned"]["acc"], copy["tokens/trained/aligned"]["acc"]),
        "ell, exact": (rows["ell_teacher"]["acc"], copy["tokens/ell/exact"]["acc"]),
        "ell, text only": (rows["ell_student"]["acc"], copy["text_only/ell"]["acc"]),
    }
    for name, (got, want) in measured.items():
        assert abs(got - want) <= TOL, (name, got, want, measured)
