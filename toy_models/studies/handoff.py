"""Hand-off diagnostic: how late can the in-context teacher still impose a concept?

The student (text only) takes the first ``k`` of the K Euler steps, the teacher (caption +
the raw target as reference) the remaining ``K − k``:

    x_{σ_{j+1}} = x_{σ_j} + (σ_{j+1} − σ_j)·v(x_{σ_j}, σ_j, c_j),   c_j = student context if j < k else teacher context

and the evaluator scores the concept in the final images. ``k = 0`` is the teacher's own
sample; ``k = K`` the untuned student's. D-OPSD's targets are the teacher's velocities *at
the student's states*; where the accuracy falls to the student's level after one or two
student steps, the teacher no longer pulls those states toward the concept, and only the
early steps' targets carry it. The second readout scores those targets directly: the
teacher's clean-image prediction ``x̂0 = x_{σ_j} − σ_j·v_teacher`` at each state ``j`` of the
student's own trajectory (what D-OPSD regresses the student's x̂0 onto, here with the raw
target; the toy fine-tuning's default teacher sees it moved, :mod:`toy_models.finetune.reference`).

    python -m toy_models.studies.handoff --concept hstripe      # the held-out fill style
    python -m toy_models.studies.handoff --concept ell          # the held-out shape
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dopsd_ref.conventions import euler_step
from toy_models.world import data as D
from toy_models.eval import metrics as M
from toy_models.world import vocab as V
from toy_models.world.concepts import concept_specs
from toy_models.models.context import ToyContext
from toy_models.eval.evaluator import ToyEvaluator
from toy_models.models.sampling import noise_like

HEADS = {"ell": "shape", "hstripe": "style"}


@torch.no_grad()
def handoff_accuracy(model: nn.Module, evaluator: ToyEvaluator, concept: str, n: int = 128, steps: int = 4,
                     seed: int = 0) -> tuple[list[float], list[float]]:
    """Concept accuracy after ``k`` student steps then ``steps − k`` teacher steps (k = 0..steps),
    and of the teacher's x̂0 at the student's states σ_j (j = 0..steps − 1)."""
    if concept not in HEADS:
        raise ValueError(f"concept must be one of {sorted(HEADS)}, got {concept!r}")
    head = HEADS[concept]
    targets = concept_specs(concept, n, seed + 12)
    word = {"style_word": V.STYLE_TOKEN} if head == "style" else {"shape_word": V.SHAPE_TOKEN}
    tok = V.tokenize([D.caption(t, **word) for t in targets])
    student, teacher = ToyContext(tok), ToyContext(tok, D.render_batch(targets), "tokens")
    sig = torch.linspace(1.0, 0.0, steps + 1)
    was_training = model.training
    model.eval()
    out, x0_acc = [], []
    score = lambda x: M.accuracy(evaluator.predict(x.clamp(-1, 1))[head], [getattr(t, head) for t in targets])  # noqa: E731
    x = noise_like(n, seed)
    for j in range(steps):  # the student's own trajectory
        s = sig[j].expand(n)
        x0_acc.append(score(x - sig[j] * model(x, s, teacher)))
        x = euler_step(x, model(x, s, student), sig[j], sig[j + 1])
    for k in range(steps + 1):
        x = noise_like(n, seed)  # [n, 3, 16, 16]
        for j in range(steps):
            x = euler_step(x, model(x, sig[j].expand(n), student if j < k else teacher), sig[j], sig[j + 1])
        out.append(score(x))
    model.train(was_training)
    return out, x0_acc


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="hstripe", choices=sorted(HEADS))
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from toy_models.models.hub import load_evaluator, load_turbo

    steps = 4
    accs, x0_acc = handoff_accuracy(load_turbo(), load_evaluator(), a.concept, a.n, steps, a.seed)
    print(f"{a.concept} (n = {a.n}, seed {a.seed}): concept accuracy after k student steps, then the teacher")
    for k, acc in enumerate(accs):
        print(f"  k = {k}: {acc:.3f}")
    print("teacher's x̂0 at the student's state σ_j (the D-OPSD target)")
    for j, acc in enumerate(x0_acc):
        print(f"  σ = {1 - j / steps:.2f}: {acc:.3f}")


if __name__ == "__main__":
    main()
