"""Teacher pre-flight on the toy: does the in-context teacher beat the student before any training?

    python -m toy_models.finetune preflight --data concept:ell                       # tokens route
    python -m toy_models.finetune preflight --data concept:ell --teacher_route encoder
    python -m toy_models.finetune train --data concept:ell --preflight              # check, then train

Two readings, both on the training prompts, ``seeds`` noises per target:

1. :func:`dopsd_ref.teacher_preflight` — on the student's own K-step roll-outs, the x0
   distance to the target of the teacher's and of the student's prediction at each step,
   with the paired margin rule and verdict described there. The teacher is wired exactly as
   training wires it (``teacher_route``, ``teacher_ref``): with the default ``teacher_ref="moved"``
   the teacher is shown the target moved to the student's layout at each state, and that moved
   target is what both predictions are compared with (placement is not the concept);
2. concept accuracy of the teacher's own K-step samples (caption + raw target) vs the
   student's samples from the same noise, scored by the toy evaluator (built-in sets only),
   with the same paired interval on the per-sample errors (margin 0).

It also writes a PNG grid: the targets in the first row, then for each seed a row of teacher
samples above a row of student samples.

Measured on the shipped weights (12 targets × 4 seeds, the commands above): tokens route,
x0 distance per step −46%, +68%, +26%, +6.5% (σ = 1, .75, .5, .25; positive = teacher closer),
overall +17.7% → "teacher better", samples 1.00 vs 0.00; encoder route, overall +1.0% → "not
better", samples 0.06 vs 0.00. The first row is negative although the teacher carries the L: at
σ = 1 the student's x0 is the MSE-optimal blur over its prompt's images, and a teacher that
commits to a sharp glyph is farther in MSE; the verdict uses the overall row.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import dopsd_ref
from dopsd_ref.preflight import PairedComparison, PreflightReport, paired_comparison
from toy_models.models.context import ToyContext
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.reference import placement_matched_teacher
from toy_models.finetune.targets import BUILTIN, TargetSet, load_targets

__all__ = ["TeacherNotBetterWarning", "ToyPreflight", "toy_preflight", "add_preflight_flags", "warn_if_not_better",
           "run_preflight_cli"]

# built-in set -> (evaluator head, label that counts as the concept)
CONCEPT_LABEL = {"concept:ell": ("shape", "ell"), "style:hstripe": ("style", "hstripe"), "domain:pastel": ("domain", "pastel")}


NOT_BETTER = ("teacher pre-flight: the teacher is not closer to the target than the student on the student's own "
              "roll-outs; D-OPSD can only teach what the teacher carries (numbers above)")


class TeacherNotBetterWarning(UserWarning):
    """The pre-flight found the teacher no closer to the target than the student."""


@dataclass(frozen=True)
class ToyPreflight:
    """Result of :func:`toy_preflight`.

    Attributes:
        x0: the model-agnostic x0-distance report (per step and overall verdicts).
        teacher_acc / student_acc: concept accuracy of teacher / student samples (None for
            user folders, which have no evaluator label).
        accuracy: paired comparison of the per-sample errors (1 − correct), margin 0.
        teacher_samples / student_samples: [B, 3, H, W] in [−1, 1], B = targets × seeds,
            sample i belongs to target i // seeds.
        targets: the target images [N, 3, H, W].
        seeds: noises per target.
    """

    x0: PreflightReport
    teacher_acc: float | None
    student_acc: float | None
    accuracy: PairedComparison | None
    teacher_samples: Tensor
    student_samples: Tensor
    targets: Tensor
    seeds: int

    @property
    def better(self) -> bool:
        """The verdict: the x0 rule overall (the concept accuracy is reported alongside)."""
        return self.x0.better

    def summary(self) -> str:
        lines = [self.x0.summary()]
        if self.accuracy is not None:
            a = self.accuracy
            lines.append(f"concept accuracy of samples: teacher {self.teacher_acc:.3f}, student {self.student_acc:.3f} "
                         f"(n = {a.n}; paired error difference {a.diff_mean:+.3f}, "
                         f"interval [{a.diff_low:+.3f}, {a.diff_high:+.3f}]: "
                         f"{'teacher better' if a.better else 'teacher not better'})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"verdict": self.x0.verdict, "x0": self.x0.to_dict(), "teacher_acc": self.teacher_acc,
               "student_acc": self.student_acc}
        out["accuracy"] = dict(self.accuracy.__dict__) if self.accuracy is not None else None
        return out

    def grid(self) -> Tensor:
        """[N + 2·seeds, ...] tiles: targets, then per seed a teacher row and a student row."""
        n = self.targets.shape[0]
        rows = [self.targets.clamp(-1, 1)]
        for s in range(self.seeds):
            rows += [self.teacher_samples[s::self.seeds][:n], self.student_samples[s::self.seeds][:n]]
        return torch.cat(rows)


def _moved_target(teacher_ref_period: int, module, sctx: ToyContext, tctx: ToyContext):
    """The target as the "moved" teacher is shown it at state x: reuses the training wrapper."""
    shown: list[Tensor] = []

    def record(x: Tensor, s: Tensor, c: ToyContext) -> Tensor:
        shown.append(c.ref)
        return torch.zeros_like(x)

    wrapper = placement_matched_teacher(record, module, sctx, period=teacher_ref_period)

    def target(k: int, x: Tensor, s: Tensor) -> Tensor:
        shown.clear()
        wrapper(x, s, tctx)
        return shown[0].to(x)

    return target


@torch.no_grad()
def toy_preflight(cfg: FinetuneConfig, *, targets: TargetSet | None = None, model=None, seeds: int = 4,
                  margin: float = 0.05, confidence: float = 0.95, evaluator=None, seed: int = 0) -> ToyPreflight:
    """Run the pre-flight for the run ``cfg`` describes (its model, targets, teacher wiring, K).

    Args:
        cfg: the fine-tuning config (``data``, ``model``, ``teacher_route``, ``teacher_ref``,
            ``rollout_steps``, ``scope``, ... are used as training would use them).
        targets / model: overrides, as for :func:`toy_models.finetune.train.run_finetune`
            (the model is wrapped with fresh adapters, i.e. the untrained student and teacher).
        seeds: noises per target (the paired samples are targets × seeds, ≥ 2 in all).
        margin, confidence: the rule of :func:`dopsd_ref.teacher_preflight`.
        evaluator: the toy evaluator (default: the shipped one) for the concept accuracy.
        seed: noise seed.
    """
    from toy_models.finetune.train import _contexts, build_roles, load_model, resolve_device

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    device = resolve_device(cfg.device)
    targets = targets if targets is not None else load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
    model = (model if model is not None else load_model(cfg.model, device)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dopsd_ref.LiveTeacherWarning)
        roles = build_roles(model, cfg)
    roles.module.eval()
    idx = torch.arange(len(targets)).repeat_interleave(seeds)  # [B]
    sctx, tctx = _contexts(targets, idx, cfg.teacher_route, device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(idx), *targets.images.shape[1:], generator=g).to(device)
    sigmas = dopsd_ref.uniform_sigmas(cfg.rollout_steps)
    student = lambda x, s: roles.module(x, s, sctx)  # noqa: E731
    if cfg.teacher_ref == "moved":
        moved = placement_matched_teacher(roles.teacher, roles.module, sctx, period=cfg.teacher_ref_period)
        teacher = lambda x, s: moved(x, s, tctx)  # noqa: E731
        target = _moved_target(cfg.teacher_ref_period, roles.module, sctx, tctx)
    else:
        teacher = lambda x, s: roles.teacher(x, s, tctx)  # noqa: E731
        target = targets.images[idx].to(device)
    report = dopsd_ref.teacher_preflight(student, teacher, noise, sigmas, target, margin=margin, confidence=confidence)

    # The teacher's own samples (raw target, as for sft_teacher) and the student's, same noise.
    t_samples = dopsd_ref.euler_sample(lambda x, s: roles.teacher(x, s, tctx), noise, sigmas).clamp(-1, 1).cpu()
    s_samples = report.states[-1].clamp(-1, 1).cpu()
    t_acc = s_acc = acc = None
    if targets.name in CONCEPT_LABEL:
        from toy_models.finetune.evaluate import load_evaluator

        ev = evaluator if evaluator is not None else load_evaluator()
        head, label = CONCEPT_LABEL[targets.name]
        ok_t = torch.tensor([p == label for p in ev.predict(t_samples)[head]], dtype=torch.float64)
        ok_s = torch.tensor([p == label for p in ev.predict(s_samples)[head]], dtype=torch.float64)
        t_acc, s_acc = float(ok_t.mean()), float(ok_s.mean())
        acc = paired_comparison(1.0 - ok_s, 1.0 - ok_t, margin=0.0, confidence=confidence)
    return ToyPreflight(report, t_acc, s_acc, acc, t_samples, s_samples, targets.images.cpu(), seeds)


def warn_if_not_better(result: ToyPreflight | PreflightReport) -> bool:
    """Issue a :class:`TeacherNotBetterWarning` when the verdict is "not better"; returns the verdict."""
    if not result.better:
        warnings.warn(NOT_BETTER, TeacherNotBetterWarning, stacklevel=2)
    return result.better


def add_preflight_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--{prefix}seeds``, ``--{prefix}margin``, ``--{prefix}confidence``; with ``prefix="preflight_"``
    (the ``train`` subcommand) also the switch ``--preflight``."""
    if prefix:
        parser.add_argument("--preflight", action="store_true",
                            help="run the teacher pre-flight first; warn when the teacher is not better")
    parser.add_argument(f"--{prefix}seeds", type=int, default=4, help="noises per target (default 4)")
    parser.add_argument(f"--{prefix}margin", type=float, default=0.05,
                        help="required relative x0-distance reduction (default 0.05)")
    parser.add_argument(f"--{prefix}confidence", type=float, default=0.95, help="interval level (default 0.95)")


def run_preflight_cli(cfg: FinetuneConfig, args: argparse.Namespace, prefix: str = "",
                      out: str | Path | None = None) -> ToyPreflight:
    """Run, print the verdict with numbers, write ``preflight.png`` / ``preflight.json``, warn if not better."""
    from toy_models.eval.viz import save_grid

    res = toy_preflight(cfg, seeds=getattr(args, f"{prefix}seeds"), margin=getattr(args, f"{prefix}margin"),
                        confidence=getattr(args, f"{prefix}confidence"))
    folder = Path(out if out is not None else cfg.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_grid(res.grid(), folder / "preflight.png", nrow=res.targets.shape[0])
    (folder / "preflight.json").write_text(json.dumps({"config": cfg.to_dict(), **res.to_dict()}, indent=2))
    print(f"teacher pre-flight: {cfg.data}, teacher route {cfg.teacher_route!r}, reference {cfg.teacher_ref!r}, "
          f"K = {cfg.rollout_steps}")
    print(res.summary())
    print(f"grid (targets; then per seed teacher row, student row): {folder / 'preflight.png'}")
    if not res.better:
        print(f"warning: {NOT_BETTER}", file=sys.stderr)
    return res


def main(args: argparse.Namespace) -> int:
    """``python -m toy_models.finetune preflight`` (flags: every config field + the pre-flight's)."""
    from toy_models.finetune.config import config_from_args

    cfg = config_from_args(args)
    res = run_preflight_cli(cfg, args, out=args.out_dir)
    return 0 if res.better or not args.strict else 3


def add_subcommand(sub) -> None:
    """Register the ``preflight`` subcommand on the finetune CLI's subparsers."""
    from toy_models.finetune.config import add_config_flags

    p = sub.add_parser("preflight", help="does the teacher beat the student before training?")
    add_config_flags(p)
    add_preflight_flags(p)
    p.add_argument("--out_dir", default=None, help="folder for preflight.png/.json (default: the config's out)")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when the teacher is not better")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m toy_models.finetune preflight ...")
