"""Evaluate a fine-tuned toy student at its native few-step setting, over several seeds.

For a target set (e.g. the held-out L glyph under the rare token ``sks``) it measures:

* ``concept_acc`` — share of samples of the *training* prompts the evaluator classifies as
  the concept (shape ``ell`` / style ``hstripe`` / domain ``pastel``);
* ``unseen_acc`` — the same on *held-out* prompts that recombine the concept with
  attributes (colour × background) absent from the targets (generalization, CLIP-S analogue);
* ``known_acc`` — on prompts of known shapes, the share drawn as the named shape (prior
  knowledge, the GenEval analogue);
* ``known_fid`` — toy-FID of known-prompt samples vs renders of the same prompts;
* ``known_palette`` / ``concept_palette`` — palette distance of those samples (blur and
  noise raise it; real renders sit near its floor);
* ``concept_fid`` — toy-FID of the concept-prompt samples (train + unseen) vs renders of
  exactly those prompts (built-in sets only);
* ``concept_dino_d`` — the DINO-D analogue: mean ``1 − cos`` of evaluator features between
  the sample of each training prompt and that prompt's own target image
  (:func:`toy_models.eval.metrics.feature_distance`; lower is closer to the targets).

Every number is a mean over ``seeds`` generation seeds; per-seed values are kept so that
methods can be compared by paired differences.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import dopsd_ref
from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.world.concepts import concept_captions, concept_specs
from toy_models.models.context import ToyContext
from toy_models.finetune.targets import BUILTIN, TargetSet
from toy_models.eval.metrics import accuracy, feature_distance, palette_distance, toy_fid

#: The fine-tuning metrics reported in tables, in their order: (key of
#: :func:`evaluate_student`'s result, column label). Used by the demo and the experiment suites.
METRICS: tuple[tuple[str, str], ...] = (
    ("concept_acc", "concept acc ↑ (train prompts)"),
    ("unseen_acc", "concept acc ↑ (unseen prompts)"),
    ("known_acc", "known-concept acc ↑"),
    ("known_fid", "toy-FID ↓ (known)"),
    ("known_palette", "palette dist ↓ (known)"),
    ("concept_palette", "palette dist ↓ (concept)"),
    ("concept_fid", "toy-FID ↓ (concept)"),
)

__all__ = ["METRICS", "EvalPrompts", "make_eval_prompts", "evaluate_student", "load_evaluator", "evaluate_run", "sample_prompts"]

StudentFn = Callable[[Tensor, Tensor, ToyContext], Tensor]


@functools.lru_cache(maxsize=2)
def load_evaluator(path: str | None = None):
    """The shipped toy evaluator (classifier + toy-FID features), loaded offline, cached."""
    from toy_models.models import hub

    return hub.load_evaluator(path)


@dataclass
class EvalPrompts:
    """Prompts (and the specs they describe) for one evaluation."""

    train: list[str]
    unseen: list[str]
    known: list[str]
    known_specs: list[D.Spec]
    concept_reals: Tensor | None  # renders of the train + unseen prompts (None for user folders)
    concept: str  # the evaluator head value that counts as "the concept"
    head: str  # "shape", "style" or "domain"
    train_images: Tensor | None = None  # [N, 3, 16, 16] the target of each training prompt


def make_eval_prompts(targets: TargetSet, n_unseen: int = 12, n_known: int = 36, seed: int = 4321) -> EvalPrompts:
    """Training prompts, held-out recombinations and known-concept prompts for a target set."""
    name = targets.name if targets.name in BUILTIN else "concept:ell"
    head, concept = {
        "concept:ell": ("shape", V.NOVEL_SHAPE),
        "style:hstripe": ("style", V.NOVEL_STYLE),
        "domain:pastel": ("domain", "pastel"),
    }[name]
    concept_name = BUILTIN[name]
    seen = {(s.color, s.bg) for s in targets.specs} if targets.specs else set()
    unseen_specs: list[D.Spec] = []
    i = 0
    while len(unseen_specs) < n_unseen:
        s = concept_specs(concept_name, 1, seed + 7919 * i)[0]
        i += 1
        if (s.color, s.bg) not in seen or len(seen) >= len(V.COLORS) * len(V.BACKGROUNDS):
            unseen_specs.append(s)
    unseen = concept_captions(concept_name, unseen_specs)
    reals = torch.cat([targets.images, D.render_batch(unseen_specs)]) if targets.specs else None
    domain = "pastel" if name == "domain:pastel" else "base"
    known_specs = [D.random_spec(np.random.default_rng([seed, 1, i]), domain=domain) for i in range(n_known)]
    return EvalPrompts(list(targets.captions), unseen, [D.caption(s) for s in known_specs],
                       known_specs, reals, concept, head, targets.images)


@torch.no_grad()
def sample_prompts(student: StudentFn, prompts: Sequence[str], seed: int, steps: int = 4,
                   device: torch.device | str = "cpu") -> Tensor:
    """One K-step sample per prompt from noise seeded by ``seed`` → [N, 3, 16, 16] on CPU."""
    ctx = ToyContext(V.tokenize(list(prompts))).to(device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 3, 16, 16, generator=g).to(device)
    x = dopsd_ref.euler_sample(lambda x, s: student(x, s, ctx), noise, dopsd_ref.uniform_sigmas(steps))
    return x.clamp(-1, 1).cpu()


def evaluate_student(student: StudentFn, prompts: EvalPrompts, evaluator=None, seeds: Sequence[int] = (0, 1, 2),
                     steps: int = 4, device: torch.device | str = "cpu", per_seed: bool = False) -> dict[str, float]:
    """Metrics of a student (see module doc), averaged over ``seeds``."""
    ev = evaluator if evaluator is not None else load_evaluator()
    real_known = D.render_batch(prompts.known_specs)
    rows = []
    for seed in seeds:
        tr = sample_prompts(student, prompts.train, 1000 + seed, steps, device)
        un = sample_prompts(student, prompts.unseen, 2000 + seed, steps, device)
        kn = sample_prompts(student, prompts.known, 3000 + seed, steps, device)
        p_tr, p_un, p_kn = ev.predict(tr)[prompts.head], ev.predict(un)[prompts.head], ev.predict(kn)["shape"]
        domain = prompts.known_specs[0].domain
        rows.append({
            "concept_acc": accuracy(p_tr, [prompts.concept] * len(p_tr)),
            "unseen_acc": accuracy(p_un, [prompts.concept] * len(p_un)),
            "known_acc": accuracy(p_kn, [s.shape for s in prompts.known_specs]),
            "known_fid": toy_fid(ev, kn, real_known),
            "known_palette": palette_distance(kn, domain),
            "concept_palette": palette_distance(torch.cat([tr, un]), domain),
            "concept_fid": (toy_fid(ev, torch.cat([tr, un]), prompts.concept_reals)
                            if prompts.concept_reals is not None else float("nan")),
            "concept_dino_d": (feature_distance(ev, tr, prompts.train_images)
                               if prompts.train_images is not None else float("nan")),
            # known prompts drawn as the concept: how much of the retention loss is the new concept leaking
            "known_leak": accuracy(ev.predict(kn)[prompts.head], [prompts.concept] * len(kn)),
        })
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    if per_seed:
        out["per_seed"] = rows  # type: ignore[assignment]
    return out


def evaluate_run(run: str | Path, device: str = "cpu", seeds: int = 3, steps: int = 4) -> dict[str, float]:
    """Evaluate a finished fine-tuning run folder (see ``python -m toy_models.finetune eval``)."""
    from toy_models.finetune.targets import load_targets
    from toy_models.finetune.train import load_finetuned

    model, cfg = load_finetuned(run, device)
    targets = load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
    dev = next(model.parameters()).device
    return evaluate_student(model, make_eval_prompts(targets), seeds=range(seeds), steps=steps, device=dev)
