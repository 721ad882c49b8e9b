"""The σ-convention and exact conversions to the Z-Image and FLUX.2 conventions."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dopsd_ref import conventions as C

shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5))
sig = st.floats(1e-3, 1.0)


def _tensors(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64), torch.randn(*shape, generator=g, dtype=torch.float64)


@given(shapes, st.integers(0, 2**16), st.lists(sig, min_size=4, max_size=4))
def test_zimage_round_trip_float64(shape, seed, sigmas):
    """Z-Image conversions are exact inverses in float64: σ → t = 1−σ → σ, and v → out = −v → v;
    each direction is pinned: t = 1 − σ, σ = 1 − t, out = −v, v = −out."""
    v, _ = _tensors(shape, seed)
    s = torch.tensor(sigmas[: shape[0]] + [0.5] * max(0, shape[0] - 4), dtype=torch.float64)[: shape[0]]
    assert torch.equal(C.sigma_from_zimage_time(C.zimage_time_from_sigma(s)), 1.0 - (1.0 - s))
    assert torch.allclose(C.sigma_from_zimage_time(C.zimage_time_from_sigma(s)), s, atol=1e-15, rtol=0)
    assert torch.equal(C.velocity_from_zimage_output(C.zimage_output_from_velocity(v)), v)
    # each direction pinned on its own (a pair of mutually inverse wrong maps also round-trips)
    assert torch.equal(C.zimage_time_from_sigma(s), 1.0 - s) and torch.equal(C.sigma_from_zimage_time(s), 1.0 - s)
    assert torch.equal(C.zimage_output_from_velocity(v), -v) and torch.equal(C.velocity_from_zimage_output(v), -v)
    assert C.zimage_time_from_sigma(torch.tensor([1.0, 0.25])).tolist() == [0.0, 0.75]  # σ = 1 is t = 0 (noise)


@given(shapes, st.integers(0, 2**16))
def test_flux2_round_trip_float64(shape, seed):
    """FLUX.2 conversions are the identity: timestep = σ and output = v, both ways, exactly;
    each direction is pinned on its own."""
    v, _ = _tensors(shape, seed)
    s = torch.rand(shape[0], dtype=torch.float64)
    assert torch.equal(C.sigma_from_flux2_timestep(C.flux2_timestep_from_sigma(s)), s)
    assert torch.equal(C.velocity_from_flux2_output(C.flux2_output_from_velocity(v)), v)
    assert torch.equal(C.flux2_timestep_from_sigma(s), s) and torch.equal(C.sigma_from_flux2_timestep(s), s)
    assert torch.equal(C.flux2_output_from_velocity(v), v) and torch.equal(C.velocity_from_flux2_output(v), v)


@given(shapes, st.integers(0, 2**16))
def test_wrapped_models_agree_across_conventions(shape, seed):
    """A σ-velocity field written in Z-Image convention (t = 1−σ, out = −v) or FLUX.2
    convention (timestep = σ, out = v) and wrapped back gives the same velocity."""
    x, _ = _tensors(shape, seed)
    s = torch.rand(shape[0], dtype=torch.float64).clamp_min(1e-3)

    def field(x, sigma):  # some σ-convention velocity
        return torch.sin(x) * C.expand_sigma(sigma, x) + x

    zimage_model = lambda x, t: -field(x, 1.0 - t)  # noqa: E731  what a Z-Image net would output
    flux2_model = lambda x, ts: field(x, ts)  # noqa: E731
    assert torch.allclose(C.from_zimage(zimage_model)(x, s), field(x, s), atol=1e-15, rtol=0)
    assert torch.equal(C.from_flux2(flux2_model)(x, s), field(x, s))


@given(shapes, st.integers(0, 2**16), sig)
def test_x0_velocity_noise_round_trips(shape, seed, s):
    """On the straight path x_σ = (1−σ)x0 + σε with v = ε − x0 (both pinned), x0 = x − σv,
    ε = x + (1−σ)v and v = (x − x0)/σ recover x0, ε and v in float64."""
    x0, eps = _tensors(shape, seed)
    x = C.noise_state(x0, eps, s)
    v = C.velocity_target(x0, eps)
    # the path and its velocity pinned on their own: x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0
    assert torch.allclose(x, (1 - s) * x0 + s * eps, atol=1e-15, rtol=0) and torch.equal(v, eps - x0)
    assert torch.allclose(C.x0_from_velocity(x, s, v), x0, atol=1e-12)
    assert torch.allclose(C.noise_from_velocity(x, s, v), eps, atol=1e-12)
    assert torch.allclose(C.velocity_from_x0(x, s, x0), v, atol=1e-9 / s)


@given(shapes, st.integers(0, 2**16), sig, st.floats(0.0, 1.0))
def test_euler_with_true_velocity_stays_on_straight_path(shape, seed, s, frac):
    """On the straight path x_σ = (1−σ)x0 + σε, one Euler step with the true velocity ε − x0
    from σ to any σ' lands exactly on x_σ'; in particular σ' = 0 lands on x0."""
    x0, eps = _tensors(shape, seed)
    x = C.noise_state(x0, eps, s)
    v = C.velocity_target(x0, eps)
    assert torch.allclose(C.euler_step(x, v, s, 0.0), x0, atol=1e-12)
    s_next = s * frac
    assert torch.allclose(C.euler_step(x, v, s, s_next), C.noise_state(x0, eps, s_next), atol=1e-12)


def test_expand_sigma_rejects_wrong_batch():
    """A per-sample σ whose length is not the batch size is an error, never broadcast."""
    with pytest.raises(ValueError, match="shape"):
        C.expand_sigma(torch.ones(3), torch.zeros(2, 4))
