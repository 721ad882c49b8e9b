"""The hand-off diagnostic: teacher-only and student-only ends, and input checking."""

import pytest
import torch

from toy_models.studies.handoff import handoff_accuracy
from toy_models.models.hub import load_evaluator


class _Const(torch.nn.Module):
    """Velocity ``ε − x0`` toward a fixed image: the teacher's (has a reference) or the student's."""

    def __init__(self, teacher_img, student_img):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.t, self.s = teacher_img, student_img

    def forward(self, x, sigma, ctx):
        x0 = (self.t if ctx.has_ref else self.s).expand_as(x)
        eps = (x - (1 - sigma.view(-1, 1, 1, 1)) * x0) / sigma.view(-1, 1, 1, 1)
        return eps - x0


def test_handoff_ends_are_teacher_and_student_samples():
    """A model whose teacher context always draws an L and whose student context draws a
    square: k = 0 (teacher only) scores 1, k = K (student only) scores 0, and the teacher's x̂0
    at every student state is the L."""
    from toy_models.world import data as D
    from toy_models.world.concepts import concept_specs

    ell = D.render_batch(concept_specs("ell", 1, 3))
    sq = D.render_batch(D.specs(5, 1, shapes=("square",)))
    accs, x0_acc = handoff_accuracy(_Const(ell, sq), load_evaluator(), "ell", n=8, steps=4)
    assert len(accs) == 5 and len(x0_acc) == 4
    assert accs[0] == 1.0 and accs[-1] == 0.0
    assert x0_acc == [1.0] * 4


def test_handoff_rejects_unknown_concept():
    with pytest.raises(ValueError, match="concept must be one of"):
        handoff_accuracy(_Const(None, None), load_evaluator(), "circle")
