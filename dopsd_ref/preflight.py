"""Teacher pre-flight: is the in-context teacher closer to the target than the student, before training?

D-OPSD can only teach what its teacher carries: the student regresses its clean-image
prediction onto the teacher's at the student's own states. Where the teacher, given the
target, predicts nothing closer to the target than the text-only student does, training has
no signal (or a wrong one). This check measures that on the states training will visit::

    x_1 = ε_b ~ N(0, I)                                  one roll-out per sample b
    for k = 1..K:                                        the student's own Euler roll-out
        u_s = v_θ(x, σ_k, c_s),   u_t = v_θ̄(x, σ_k, c_t)         (no grad)
        x̂0_s = x − σ_k·u_s,      x̂0_t = x − σ_k·u_t             (x0 = x − σ·v)
        d_s[k, b] = mean((x̂0_s − y_k)²),   d_t[k, b] = mean((x̂0_t − y_k)²)
        x = x + (σ_{k+1} − σ_k)·u_s

``y_k`` is the target (or the target as the teacher is shown it at that state, e.g. moved to
the student's layout; see ``target``). The **margin rule**, paired over the B samples: at a
step, with margin m and confidence level 1 − α,

    Δ_b = (1 − m)·d_s[k, b] − d_t[k, b]
    teacher better  ⇔  mean_b Δ_b − t_{1−α/2, B−1}·sd_b(Δ_b)/√B > 0

i.e. the lower end of the two-sided (1 − α) Student-t interval of the mean paired difference
is above zero: the teacher's x0 is, with that confidence, more than a fraction m closer to the
target than the student's. **Overall** the same rule is applied to the per-sample step means
``D_s[b] = mean_k d_s[k, b]`` and ``D_t[b] = mean_k d_t[k, b]`` (high-noise steps, where the
distances are largest, weigh most — as in the x0-space loss). The states and the grid are
those of :func:`dopsd_ref.sampling.euler_sample` and :func:`dopsd_ref.dopsd_rollout_loss`.

Reading a per-step row: near σ = 1 the student's x̂0 is close to the MSE-optimal mean of the
images its prompt allows, so a teacher that commits to one sharp image can be farther in MSE
there even when it carries the target's concept; the overall verdict pools the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .checks import check_state, check_velocity
from .conventions import VelocityFn, euler_step, x0_from_velocity
from .sampling import sigma_batch
from .schedules import validate_sigmas

__all__ = [
    "PairedComparison",
    "PreflightReport",
    "paired_comparison",
    "preflight_verdict",
    "student_t_quantile",
    "teacher_preflight",
    "x0_distances",
]

# target(step k, state x [B, ...], σ [B]) -> the target the teacher is shown at that state [B, ...].
TargetFn = Callable[[int, Tensor, Tensor], Tensor]


def student_t_quantile(p: float, dof: int) -> float:
    """Quantile ``t_{p, ν}`` of Student's t distribution (Cornish–Fisher expansion in 1/ν).

    ``t ≈ z + g1(z)/ν + g2(z)/ν² + g3(z)/ν³ + g4(z)/ν⁴`` with ``z = Φ⁻¹(p)`` (Abramowitz &
    Stegun 26.7.5). Against tabulated values at p = 0.975: off by 4e-3 at ν = 3, under 1e-3
    for ν ≥ 4, under 1e-4 for ν ≥ 10; exact as ν → ∞. For ν = 1, 2 the exact closed forms
    are used.

    Raises:
        ValueError: p outside (0, 1) or ν < 1.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p!r}")
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof!r}")
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        q = 4.0 * p * (1.0 - p)
        return (2.0 * p - 1.0) * math.sqrt(2.0 / q)
    z = float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    v = float(dof)
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


@dataclass(frozen=True)
class PairedComparison:
    """Teacher vs student distance over paired samples at one step (or overall).

    Attributes:
        student: mean_b d_s[b].
        teacher: mean_b d_t[b].
        gain: 1 − teacher / student, the relative reduction of the distance (> 0: teacher closer).
        diff_mean / diff_low / diff_high: mean of Δ_b = (1 − m)·d_s[b] − d_t[b] and its
            two-sided confidence interval.
        n: number of paired samples B.
        better: ``diff_low > 0`` (the margin rule of the module doc).
    """

    student: float
    teacher: float
    gain: float
    diff_mean: float
    diff_low: float
    diff_high: float
    n: int
    better: bool


def paired_comparison(d_student: Tensor, d_teacher: Tensor, margin: float = 0.05,
                      confidence: float = 0.95) -> PairedComparison:
    """The margin rule on paired per-sample distances ``d_student``, ``d_teacher`` [B].

    ``Δ_b = (1 − margin)·d_s[b] − d_t[b]``; better iff the lower end of the two-sided
    ``confidence`` Student-t interval of mean_b Δ_b is > 0.

    Raises:
        ValueError: shapes differ, fewer than 2 samples, non-finite distances, margin outside
            [0, 1) or confidence outside (0, 1).
    """
    if d_student.shape != d_teacher.shape or d_student.ndim != 1:
        raise ValueError(f"paired distances must both be [B], got {tuple(d_student.shape)} and {tuple(d_teacher.shape)}")
    n = d_student.shape[0]
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 samples, got {n}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    ds, dt = d_student.double(), d_teacher.double()
    if not (torch.isfinite(ds).all() and torch.isfinite(dt).all()):
        raise ValueError("distances contain NaN or inf")
    delta = (1.0 - margin) * ds - dt  # [B]
    mean = float(delta.mean())
    half = student_t_quantile(0.5 + confidence / 2, n - 1) * float(delta.std(unbiased=True)) / math.sqrt(n)
    s, t = float(ds.mean()), float(dt.mean())
    return PairedComparison(student=s, teacher=t, gain=1.0 - t / s if s > 0 else 0.0, diff_mean=mean,
                            diff_low=mean - half, diff_high=mean + half, n=n, better=mean - half > 0.0)


@dataclass(frozen=True)
class PreflightReport:
    """Result of :func:`teacher_preflight`.

    Attributes:
        sigmas: [K] the grid (σ_k of each step).
        steps: one :class:`PairedComparison` per roll-out step.
        overall: the comparison of the per-sample step means.
        margin, confidence: the rule's parameters.
        d_student / d_teacher: [K, B] per-step, per-sample x0 distances to the target.
        states: [K + 1, B, ...] the student's roll-out (``states[K]`` = its samples); None
            when the report pools batches of different shapes.
    """

    sigmas: tuple[float, ...]
    steps: tuple[PairedComparison, ...]
    overall: PairedComparison
    margin: float
    confidence: float
    d_student: Tensor
    d_teacher: Tensor
    states: Tensor | None = None

    @property
    def better(self) -> bool:
        """The overall verdict: the teacher is closer to the target than the student."""
        return self.overall.better

    @property
    def verdict(self) -> str:
        return "teacher better" if self.better else "teacher not better"

    def summary(self) -> str:
        """A printable table: per step and overall, distances, relative gain, interval, verdict."""
        lines = [f"x0 distance to the target on the student's roll-out (n = {self.overall.n} samples; "
                 f"rule: lower end of the {self.confidence:.0%} interval of (1 − {self.margin:g})·d_student − "
                 "d_teacher > 0)",
                 f"{'step':>4} {'sigma':>7} {'student':>10} {'teacher':>10} {'gain':>7}   interval of the paired diff"]
        rows = [(str(k), f"{s:7.4f}", c) for k, (s, c) in enumerate(zip(self.sigmas, self.steps))]
        rows.append(("all", f"{'':7}", self.overall))
        for k, s, c in rows:
            lines.append(f"{k:>4} {s} {c.student:10.4g} {c.teacher:10.4g} {c.gain:+7.1%}   "
                         f"[{c.diff_low:+.3g}, {c.diff_high:+.3g}]  {'teacher better' if c.better else 'not better'}")
        lines.append(f"verdict: {self.verdict}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready numbers (no tensors)."""
        as_dict = lambda c: dict(c.__dict__)  # noqa: E731
        return {"verdict": self.verdict, "better": self.better, "margin": self.margin, "confidence": self.confidence,
                "sigmas": list(self.sigmas), "steps": [as_dict(c) for c in self.steps], "overall": as_dict(self.overall)}


def _distance(x0: Tensor, target: Tensor, k: int) -> Tensor:
    if target.shape != x0.shape:
        raise ValueError(f"target at step {k} has shape {tuple(target.shape)}, expected the state's {tuple(x0.shape)}")
    return (x0 - target.to(x0)).pow(2).flatten(1).mean(1)  # [B]


@torch.no_grad()
def x0_distances(
    student: VelocityFn,
    teacher: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    target: Tensor | TargetFn,
) -> tuple[Tensor, Tensor, Tensor]:
    """The per-step, per-sample x0 distances of the module doc, on the student's own roll-out.

    Args: as :func:`teacher_preflight` (any B ≥ 1, so that batches can be pooled).

    Returns:
        ``(d_student [K, B], d_teacher [K, B], states [K + 1, B, ...])``, distances in float64 on CPU.
    """
    check_state(noise)
    sig = validate_sigmas(sigmas).to(device=noise.device, dtype=noise.dtype)
    sig_next = torch.cat([sig[1:], sig.new_zeros(1)])
    x = noise
    states, d_s, d_t = [x], [], []
    for k in range(sig.shape[0]):
        s = sigma_batch(sig[k], x)  # [B]
        u_s = check_velocity(student(x, s), x, role="student", step=k, sigma=sig[k])
        u_t = check_velocity(teacher(x, s), x, role="teacher", step=k, sigma=sig[k])
        y = target(k, x, s) if callable(target) else target
        d_s.append(_distance(x0_from_velocity(x, s, u_s), y, k))
        d_t.append(_distance(x0_from_velocity(x, s, u_t), y, k))
        x = euler_step(x, u_s, sig[k], sig_next[k])
        states.append(x)
    return torch.stack(d_s).double().cpu(), torch.stack(d_t).double().cpu(), torch.stack(states)


def preflight_verdict(d_student: Tensor, d_teacher: Tensor, sigmas: Sequence[float] | Tensor, *, margin: float = 0.05,
                      confidence: float = 0.95, states: Tensor | None = None) -> PreflightReport:
    """The margin rule of the module doc on distances [K, B] (e.g. pooled from several batches).

    Raises:
        ValueError: shapes differ or do not match the grid, B < 2, or an invalid margin/confidence.
    """
    sig = tuple(float(v) for v in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas))
    if d_student.shape != d_teacher.shape or d_student.ndim != 2 or d_student.shape[0] != len(sig):
        raise ValueError(f"distances must both be [K={len(sig)}, B], got {tuple(d_student.shape)} and "
                         f"{tuple(d_teacher.shape)}")
    if d_student.shape[1] < 2:
        raise ValueError(f"the pre-flight compares paired samples: it needs B >= 2, got {d_student.shape[1]}")
    steps = tuple(paired_comparison(d_student[k], d_teacher[k], margin, confidence) for k in range(len(sig)))
    overall = paired_comparison(d_student.mean(0), d_teacher.mean(0), margin, confidence)
    return PreflightReport(sigmas=sig, steps=steps, overall=overall, margin=margin, confidence=confidence,
                           d_student=d_student, d_teacher=d_teacher, states=states)


def teacher_preflight(
    student: VelocityFn,
    teacher: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    target: Tensor | TargetFn,
    *,
    margin: float = 0.05,
    confidence: float = 0.95,
) -> PreflightReport:
    """Compare the teacher's and the student's x0 predictions on the student's own roll-out.

    Args:
        student: ``(x [B, ...], σ [B]) -> v``, text context bound (what inference runs).
        teacher: same signature, multimodal context bound (what training's teacher sees).
        noise: [B, ...] the start states at σ = 1 (one per paired sample; B ≥ 2).
        sigmas: the roll-out grid, as for :func:`dopsd_ref.dopsd_rollout_loss`.
        target: [B, ...] the clean target of each sample, in the state's space; or a callable
            ``(k, x, σ) -> [B, ...]`` giving the target for the state of step k.
        margin: m of the rule (module doc): the teacher must be more than this fraction closer.
        confidence: level of the two-sided Student-t interval.

    Returns:
        A :class:`PreflightReport` (per-step and overall verdicts, the distances, the states).

    Raises:
        ValueError / TypeError: an invalid grid, state, model output or target shape, or
            an invalid margin/confidence (checked before any model call).
    """
    check_state(noise)
    if noise.shape[0] < 2:
        raise ValueError(f"the pre-flight compares paired samples: noise needs B >= 2, got {noise.shape[0]}")
    paired_comparison(torch.zeros(2), torch.zeros(2), margin, confidence)  # validates margin and confidence early
    d_s, d_t, states = x0_distances(student, teacher, noise, sigmas, target)
    return preflight_verdict(d_s, d_t, validate_sigmas(sigmas), margin=margin, confidence=confidence, states=states)
