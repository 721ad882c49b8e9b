"""The off-policy objectives (SFT flow matching, off-policy distillation) and the σ samplers."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from core_fixtures import make_field, sigma_grids

import dopsd_ref
from dopsd_ref import conventions as C
from dopsd_ref.losses import dopsd_step_loss, flow_matching_loss, sample_training_sigmas

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6))


def _pair(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)


@given(shapes, st.integers(0, 2**16), st.lists(st.floats(1e-3, 1.0), min_size=4, max_size=4))
def test_flow_matching_loss_pins_the_target(shape, seed, sig):
    """The SFT loss queries the model at x_σ = (1 − σ)·x0 + σ·ε with the per-sample σ, and
    its target is the straight-path velocity ε − x0: a model returning ε − x0 there has loss
    exactly 0, one returning x0 − ε has loss 4·mean((ε − x0)²) > 0."""
    x0, eps = _pair(shape, seed)
    sigma = torch.tensor(sig[: shape[0]] + [0.5] * max(0, shape[0] - 4), dtype=torch.float64)[: shape[0]]
    seen = []

    def model(sign):
        def f(x, s):
            seen.append((x.clone(), s.clone()))
            return sign * (eps - x0)
        return f

    assert flow_matching_loss(model(1.0), x0, eps, sigma).item() == 0.0
    wrong = flow_matching_loss(model(-1.0), x0, eps, sigma)
    assert wrong.item() > 0
    torch.testing.assert_close(wrong, 4 * (eps - x0).pow(2).mean(), rtol=1e-12, atol=0)
    for x, s in seen:
        assert torch.equal(s, sigma)
        torch.testing.assert_close(x, (1 - sigma[:, None]) * x0 + sigma[:, None] * eps, rtol=0, atol=1e-15)


@given(st.sampled_from(["linear", "mlp"]), shapes, st.integers(0, 2**16), sigma_grids(),
       st.sampled_from(["x0", "velocity"]))
def test_offpolicy_distillation_queries_noised_targets(kind, shape, seed, sigmas, space):
    """Off-policy distillation queries student and teacher exactly at
    noise_state(x0, ε, σ_k) with σ_k per sample, once per grid level, and its loss is the
    mean over k of dopsd_step_loss at those states."""
    b, d = shape
    student, teacher = make_field(kind, d, seed), make_field(kind, d, seed + 1)
    x0, eps = _pair(shape, seed + 2)
    calls = {"student": [], "teacher": []}

    def spy(role, model):
        def f(x, s):
            calls[role].append((x.detach().clone(), s.clone()))
            return model(x, s)
        return f

    loss = dopsd_ref.offpolicy_distillation_loss(spy("student", student), spy("teacher", teacher), x0, eps, sigmas,
                                                 space=space)
    per_k = []
    for role in ("student", "teacher"):
        assert len(calls[role]) == len(sigmas)
    for k, sk in enumerate(sigmas):
        xk = C.noise_state(x0, eps, sk)
        sb = torch.full((b,), float(sk), dtype=torch.float64)
        for role in ("student", "teacher"):
            x, s = calls[role][k]
            assert torch.equal(x, xk), (role, k)
            assert torch.equal(s, sb), (role, k)
        with torch.no_grad():
            per_k.append(dopsd_step_loss(student(xk, sb), teacher(xk, sb), xk, sb, space))
    torch.testing.assert_close(loss.detach(), torch.stack(per_k).mean(), rtol=1e-12, atol=0)


def _ecdf_ok(samples: torch.Tensor, cdf, qs=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)) -> list[str]:
    """Points where the empirical CDF is more than 5 standard errors from ``cdf``."""
    n = samples.numel()
    bad = []
    for q in qs:
        p = cdf(q)
        emp = float((samples <= q).double().mean())
        if abs(emp - p) > 5 * math.sqrt(p * (1 - p) / n):
            bad.append(f"F({q}) = {emp:.4f}, want {p:.4f}")
    return bad


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _logit(q: float) -> float:
    return math.log(q / (1 - q))


CDFS = {
    "uniform": lambda q: q,  # σ ~ U(0, 1)
    "logit_normal": lambda q: _phi(_logit(q)),  # σ = sigmoid(n), n ~ N(0, 1)
    "mixed": lambda q: 0.5 * q + 0.5 * _phi(_logit(q)),  # each sample one of the two, p = 1/2
}


@pytest.mark.parametrize("kind", sorted(CDFS))
def test_training_sigma_distributions(kind):
    """sample_training_sigmas draws σ with the stated distribution: its empirical CDF on
    200 000 seeded samples is within 5 standard errors of U(0, 1), of sigmoid(N(0, 1)), or of
    their equal mixture at 7 quantiles; all values lie in [eps, 1 − eps]."""
    s = sample_training_sigmas(200_000, torch.Generator().manual_seed(0), kind=kind, dtype=torch.float64)
    assert s.shape == (200_000,) and s.dtype == torch.float64
    assert float(s.min()) >= 1e-4 and float(s.max()) <= 1 - 1e-4
    assert not _ecdf_ok(s, CDFS[kind]), _ecdf_ok(s, CDFS[kind])


def test_training_sigmas_clamp_seed_dtype_and_bad_kind():
    """eps clamps into [eps, 1 − eps] (values below eps become exactly eps, in the stated
    proportion), the same generator seed gives the same draw, dtype is honoured, and an
    unknown kind is refused by name."""
    s = sample_training_sigmas(100_000, torch.Generator().manual_seed(1), kind="uniform", eps=0.2, dtype=torch.float64)
    assert float(s.min()) == 0.2 and float(s.max()) == 0.8
    frac = float((s == 0.2).double().mean())
    assert abs(frac - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 1e5)
    a = sample_training_sigmas(16, torch.Generator().manual_seed(3))
    b = sample_training_sigmas(16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.float32
    with pytest.raises(ValueError, match="kind"):
        sample_training_sigmas(4, kind="cosine")  # type: ignore[arg-type]
