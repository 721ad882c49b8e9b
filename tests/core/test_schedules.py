"""σ grids: every constructor returns a valid grid, and every invalid grid is refused."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dopsd_ref import schedules as S


def _valid(s: torch.Tensor) -> bool:
    return s[0].item() == 1.0 and bool((s[1:] < s[:-1]).all()) and bool((s > 0).all()) and bool((s <= 1).all())


@given(st.integers(1, 32), st.floats(0.2, 8.0), st.integers(1, 8192))
def test_constructors_return_valid_grids(k, shift, seq_len):
    """uniform, shifted and FLUX.2 empirical-mu grids start at 1, decrease strictly, stay in (0, 1]."""
    for grid in (S.uniform_sigmas(k), S.shifted_sigmas(k, shift), S.flux2_sigmas(k, seq_len)):
        assert grid.shape == (k,)
        assert _valid(grid)


def test_released_zimage_grids():
    """The Z-Image-Turbo grids are those of the released code: K = 4 is {1, 0.9, 0.75, 0.5};
    K = 8 is at full precision — σ_2 = 0.9768991 and σ_8 = 0.4732203 to 7 decimals (the
    released digits), every σ_k within float32 rounding (3e-8) of the closed form
    σ_k = 6·s_k/(1 + 5·s_k), s_k = 1 − (k − 1)·(1 − σ_min)/8, σ_min = 0.006/1.005, and every
    value exactly a float32 number (what the released scheduler holds)."""
    assert S.zimage_turbo_sigmas(4).tolist() == [1.0, 0.9, 0.75, 0.5]
    k8 = S.zimage_turbo_sigmas(8).tolist()
    assert k8 == list(S.ZIMAGE_TURBO_8)
    assert (round(k8[1], 7), round(k8[7], 7)) == (0.9768991, 0.4732203)
    sigma_min = 6 * 0.001 / (1 + 5 * 0.001)
    for k, sig in enumerate(k8):
        s = 1 - k * (1 - sigma_min) / 8
        assert abs(sig - 6 * s / (1 + 5 * s)) < 3e-8, (k, sig)
        assert torch.tensor(sig, dtype=torch.float32).item() == sig, (k, sig)
    with pytest.raises(ValueError, match="K = 4 or 8"):
        S.zimage_turbo_sigmas(6)


def test_zimage_turbo_8_is_the_schedulers_grid():
    """ZIMAGE_TURBO_8 equals, bit for bit, the first 8 σ of diffusers'
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0) after
    set_timesteps(9)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0)
    sched.set_timesteps(9)
    assert [float(v) for v in sched.sigmas[:8]] == list(S.ZIMAGE_TURBO_8)


def test_uniform_and_shift_formulas():
    """Uniform is linspace(1, 1/K, K); a shift s maps σ to sσ/(1 + (s−1)σ)."""
    assert torch.allclose(S.uniform_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64))
    s = S.shifted_sigmas(4, 3.0)
    assert math.isclose(s[2].item(), 3 * 0.5 / (1 + 2 * 0.5))


@given(st.integers(1, 32), st.floats(0.2, 8.0), st.integers(1, 8192))
def test_constructors_return_the_stated_values(k, shift, seq_len):
    """Every grid constructor returns the values its formula states, element by element:
    uniform σ_j = 1 − (j − 1)/K; shifted σ'_j = s·σ_j/(1 + (s − 1)·σ_j); FLUX.2
    σ'_j = e^mu/(e^mu + 1/σ_j − 1) with mu = flux2_empirical_mu(seq_len, K)."""
    uni = [1 - j / k for j in range(k)]
    assert S.uniform_sigmas(k).tolist() == pytest.approx(uni, rel=1e-15, abs=1e-15)
    assert S.shifted_sigmas(k, shift).tolist() == pytest.approx(
        [shift * u / (1 + (shift - 1) * u) for u in uni], rel=1e-13, abs=0)
    em = math.exp(S.flux2_empirical_mu(seq_len, k))
    assert S.flux2_sigmas(k, seq_len).tolist() == pytest.approx([em / (em + 1 / u - 1) for u in uni], rel=1e-13, abs=0)


def test_flux2_empirical_mu_values():
    """The empirical mu is the linear fit in tokens, interpolated in K between the 10- and
    200-step fits (a1 = 8.73809524e-5, b1 = 1.89833333; a2 = 0.00016927, b2 = 0.45666666),
    and the 200-step fit alone above 4300 tokens."""
    m10, m200 = 8.73809524e-05 * 4096 + 1.89833333, 0.00016927 * 4096 + 0.45666666
    assert S.flux2_empirical_mu(4096, 10) == pytest.approx(m10, rel=1e-12)
    assert S.flux2_empirical_mu(4096, 200) == pytest.approx(m200, rel=1e-12)
    assert S.flux2_empirical_mu(4096, 4) == pytest.approx(m10 + (m200 - m10) * (4 - 10) / 190, rel=1e-12)
    assert S.flux2_empirical_mu(6000, 4) == pytest.approx(0.00016927 * 6000 + 0.45666666, rel=1e-12)


@given(st.lists(st.floats(0.02, 0.98), max_size=7, unique=True))
def test_step_sizes(rest):
    """step_sizes gives the K Euler steps Δσ_k = σ_{k+1} − σ_k with the terminal σ_{K+1} = 0:
    all negative, summing to −1 (the roll-out goes from pure noise to data)."""
    grid = torch.tensor([1.0] + sorted({round(r, 6) for r in rest}, reverse=True), dtype=torch.float64)
    d = S.step_sizes(grid)
    want = [b - a for a, b in zip(grid.tolist(), grid.tolist()[1:] + [0.0])]
    assert d.shape == grid.shape and d.tolist() == pytest.approx(want, rel=0, abs=1e-15)
    assert (d < 0).all() and float(d.sum()) == pytest.approx(-1.0, abs=1e-12)
    assert S.step_sizes(torch.tensor([1.0, 0.5])).tolist() == [-0.5, -0.5]
    with pytest.raises(ValueError, match="sigmas"):
        S.step_sizes(torch.tensor([0.5, 0.25]))


def test_flux2_grid_matches_diffusers_scheduler():
    """Our FLUX.2 grid equals diffusers' FlowMatchEulerDiscreteScheduler with the empirical mu."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for seq_len, k in [(256, 4), (1024, 4), (4096, 8), (6000, 4)]:
        assert math.isclose(S.flux2_empirical_mu(seq_len, k), compute_empirical_mu(seq_len, k), rel_tol=1e-12)
        sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
        import numpy as np

        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=compute_empirical_mu(seq_len, k))
        ours = S.flux2_sigmas(k, seq_len).float()
        assert torch.allclose(ours, sched.sigmas[:-1].float(), atol=1e-6), (seq_len, k)


invalid_grids = st.one_of(
    st.just([]),
    st.just([1.0, 0.5, 0.5]),  # not strictly decreasing
    st.just([1.0, 0.3, 0.6]),
    st.just([0.9, 0.5]),  # first != 1
    st.just([1.0, float("nan")]),
    st.just([1.0, float("inf")]),
    st.just([1.0, 0.5, 0.0]),  # outside (0, 1]
    st.just([1.0, -0.2]),
    st.just([1.2, 0.5]),
    st.lists(st.floats(0.01, 0.99), min_size=1, max_size=5).map(lambda r: [0.999] + r),
    st.lists(st.floats(0.01, 0.99), min_size=2, max_size=5, unique=True).map(lambda r: [1.0] + sorted(r)),
)


@given(invalid_grids)
def test_invalid_grids_raise_clear_errors(grid):
    """Empty, non-decreasing, NaN/inf, first ≠ 1 or out-of-(0, 1] grids raise ValueError naming the problem."""
    with pytest.raises(ValueError, match="sigmas"):
        S.validate_sigmas(grid)


def test_two_dimensional_grid_is_refused():
    """A grid must be 1-D."""
    with pytest.raises(ValueError, match="1-D"):
        S.validate_sigmas(torch.ones(2, 2))
