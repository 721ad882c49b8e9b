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
