"""Shipped weights meet a fast smoke version of the acceptance numbers.

Thresholds are the full acceptance measurements (toy_models/weights/acceptance.json,
n = 256) minus a margin for the smaller sample here (64 prompts). Skipped only while the
weights do not exist yet.
"""

import pytest
import torch

from toy_models.world import data as D
from toy_models.world.concepts import concept_specs
from toy_models.models.hub import BASE, EVALUATOR, TURBO, weights_available, weights_path

from .smoke_rows import N, model_and_evaluator, smoke_rows

pytestmark = pytest.mark.skipif(
    not weights_available(TURBO, EVALUATOR), reason="shipped toy weights not trained yet (toy_models/README.md)"
)



@pytest.fixture(scope="module")
def models():
    return model_and_evaluator(str(weights_path(TURBO)))


@pytest.fixture(scope="module")
def rows():
    return smoke_rows(str(weights_path(TURBO)))


def test_turbo_text_only_known(rows):
    """4-step text-only samples of known prompts show the named colour, and the named shape at
    the measured rate (margin for 64 prompts)."""
    r = rows["text_only"]
    assert r["shape_acc"] >= SHAPE_MIN, r
    assert r["color_acc"] >= 0.95, r


def test_teacher_copies_heldout_student_does_not(rows):
    """With the rare token + the target as reference (the D-OPSD teacher context) the 4-step
    model draws the held-out L; text-only with the same prompt it does not."""
    teacher = rows["ell_teacher"]["acc"]
    student = rows["ell_student"]["acc"]
    assert teacher >= TEACHER_MIN, teacher
    assert student <= STUDENT_MAX, student


def test_copy_trained_shapes(rows):
    """Trained shapes are copied from an aligned reference of another colour/background."""
    r = rows["trained_aligned"]
    assert r["acc"] >= COPY_MIN, r


@pytest.mark.parametrize("concept", ["ell", "hstripe", "pastel"])
def test_evaluator_reads_the_heldout_targets(models, concept):
    """The instrument behind the raw-target rows: on clean renders of the held-out concepts'
    targets (the references the raw-target teacher is given) the evaluator names the
    prompt's shape and colour, and the concept itself, in >= 0.95 of 256 (measured: 1.00).
    A teacher's low "shape kept" on pastel is then the teacher's, not the evaluator's."""
    from toy_models.eval.evaluate import RAW_TARGET_CONCEPTS

    _, ev = models
    head, value = RAW_TARGET_CONCEPTS[concept]
    targets = concept_specs(concept, 256, 21)
    pred = ev.predict(D.render_batch(targets))
    n = len(targets)
    assert sum(a == t.shape for a, t in zip(pred["shape"], targets)) / n >= 0.95
    assert sum(a == t.color for a, t in zip(pred["color"], targets)) / n >= 0.95
    assert sum(a == value for a in pred[head]) / n >= 0.95


def test_evaluator_reads_silhouettes_in_any_domain(models):
    """The instrument behind the family-domain row and ``shape_acc_silhouette``: the evaluator
    names the shape of silhouettes of clean renders in fresh training-family domains and in
    the held-out pastel in >= 0.95 of 256 (measured: 1.00 both), although on the family
    renders themselves it reads only about half (its shape head saw base and pastel only)."""
    from toy_models.eval.evaluate import family_domain_specs
    from toy_models.eval.metrics import silhouette

    _, ev = models
    for targets in (family_domain_specs(256, 3), concept_specs("pastel", 256, 21)):
        pred = ev.predict(silhouette(D.render_batch(targets)))["shape"]
        assert sum(a == t.shape for a, t in zip(pred, targets)) / len(targets) >= 0.95


def test_sampling_64_images_at_4_steps(models):
    """Sampling 64 images at 4 steps (the code path whose speed acceptance.py reports as
    speed_64_images_4_steps_s) runs the network exactly 4 times on the whole batch at the
    uniform grid σ = 1, 3/4, 1/2, 1/4, and returns finite [64, 3, 16, 16] float32 images in
    [−1, 1] that are identical for the same seed and differ for another seed. No wall-clock
    assertion: the speed is a measured number in acceptance.json, not a test."""
    turbo, _ = models
    from toy_models.models.context import text_context
    from toy_models.models.sampling import sample

    ctx = text_context([D.caption(s) for s in D.specs(2, 64)])
    calls: list[tuple[tuple[int, ...], list[float]]] = []
    hook = turbo.register_forward_hook(lambda m, args, out: calls.append((tuple(args[0].shape), args[1].unique().tolist())))
    try:
        x = sample(turbo, ctx, steps=4, seed=0)
    finally:
        hook.remove()
    assert calls == [((64, 3, 16, 16), [s]) for s in (1.0, 0.75, 0.5, 0.25)], calls
    assert x.shape == (64, 3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.equal(sample(turbo, ctx, steps=4, seed=0), x)
    assert not torch.equal(sample(turbo, ctx, steps=4, seed=1), x)


# Thresholds: measured (acceptance.json, n = 256, seed 0) minus a margin for 64 prompts.
# turbo@4 text-only shape acc 0.957; teacher ell via exact reference 1.000; text-only
# sks -> ell 0.008; trained shapes via an aligned reference 1.000.
SHAPE_MIN = 0.85
TEACHER_MIN = 0.85
STUDENT_MAX = 0.15
COPY_MIN = 0.85


def test_cards_match_recorded_numbers():
    """Each shipped model card was generated from training.json and acceptance.json: it
    names the recipe command and seed, and reproduces the measured numbers."""
    import json

    from toy_models.recipes.cards import card
    from toy_models.models.hub import WEIGHTS_DIR

    acc_path = WEIGHTS_DIR / "acceptance.json"
    if not acc_path.exists():
        pytest.skip("acceptance.json not measured yet")
    acc = json.loads(acc_path.read_text())
    for name in (BASE, TURBO, EVALUATOR):
        folder = WEIGHTS_DIR / name
        text = (folder / "README.md").read_text()
        tr = json.loads((folder / "training.json").read_text())
        assert tr["command"] in text
        assert text == card(name, acc)


@pytest.mark.slow
def test_full_acceptance_reproduces_recorded_numbers():
    """Re-running the acceptance measurements (n = 256, seed 0, no SFT) reproduces the
    recorded text-only and teacher numbers in acceptance.json (same seeds: equal up to
    float noise; tolerance 0.03 on accuracies, 5% on toy-FID)."""
    import json

    from toy_models.recipes.acceptance import run
    from toy_models.models.hub import WEIGHTS_DIR

    rec = json.loads((WEIGHTS_DIR / "acceptance.json").read_text())
    res = run(rec["n"], rec["seed"], 0, 0.0, 0, skip_sft=True)
    for k in ("base@32", "base@4", "turbo@4"):
        assert abs(res["text_only"][k]["shape_acc"] - rec["text_only"][k]["shape_acc"]) <= 0.03
        assert abs(res["text_only"][k]["toy_fid"] - rec["text_only"][k]["toy_fid"]) <= 0.05 * rec["text_only"][k]["toy_fid"]
    for k in ("tokens/ell/exact", "tokens/trained/aligned", "text_only/ell"):
        assert abs(res["copy"]["turbo@4"][k]["acc"] - rec["copy"]["turbo@4"][k]["acc"]) <= 0.03
