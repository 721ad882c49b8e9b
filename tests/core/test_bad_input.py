"""Bad input: clear errors naming the problem; nothing is silently broadcast."""

import pytest
import torch

import dopsd_ref
from dopsd_ref import NonFiniteLossError, dopsd_rollout_loss, uniform_sigmas

ok = lambda x, s: x  # noqa: E731
noise = torch.randn(2, 3, 4)


def test_student_output_shape_mismatch():
    """A student whose output shape differs from its input is refused (not broadcast)."""
    with pytest.raises(ValueError, match=r"student at step 0 .* shape \(2, 1, 4\)"):
        dopsd_rollout_loss(lambda x, s: x[:, :1], ok, noise, uniform_sigmas(2))


def test_teacher_output_shape_mismatch():
    """A teacher that returns a broadcastable but different shape is refused."""
    with pytest.raises(ValueError, match="teacher at step 0"):
        dopsd_rollout_loss(ok, lambda x, s: x.mean(0, keepdim=True), noise, uniform_sigmas(2))


def test_nan_loss_names_step_and_sigma():
    """A NaN/inf loss raises NonFiniteLossError naming the first bad step and its σ."""

    def teacher(x, s):
        return torch.where(s[:, None, None] < 0.6, torch.full_like(x, float("nan")), x)

    with pytest.raises(NonFiniteLossError, match=r"step 2 \(sigma=0\.5\)"):
        dopsd_rollout_loss(ok, teacher, noise, uniform_sigmas(4))


def test_dtype_mix_is_refused():
    """A float32 model output for a float64 state is an error outside autocast."""
    with pytest.raises(TypeError, match="dtype"):
        dopsd_rollout_loss(lambda x, s: x.float(), ok, noise.double(), uniform_sigmas(2))


def test_device_mix_is_refused():
    """An output on another device than the state is an error."""
    with pytest.raises(ValueError, match="device"):
        dopsd_rollout_loss(lambda x, s: torch.empty(x.shape, device="meta"), ok, noise, uniform_sigmas(2))


def test_non_tensor_output_and_integer_noise():
    """Non-tensor outputs and integer noise are refused with the offending type named."""
    with pytest.raises(TypeError, match="returned list"):
        dopsd_rollout_loss(lambda x, s: [x], ok, noise, uniform_sigmas(2))
    with pytest.raises(TypeError, match="floating"):
        dopsd_rollout_loss(ok, ok, torch.zeros(2, 3, dtype=torch.long), uniform_sigmas(2))


def test_invalid_schedule_and_space():
    """Invalid grids and loss spaces raise ValueError."""
    with pytest.raises(ValueError, match="strictly decreasing"):
        dopsd_rollout_loss(ok, ok, noise, torch.tensor([1.0, 0.5, 0.7]))
    with pytest.raises(ValueError, match="space"):
        dopsd_rollout_loss(ok, ok, noise, uniform_sigmas(2), space="eps")  # type: ignore[arg-type]


def test_autocast_output_is_accepted_and_upcast():
    """Under autocast a bf16 output for a float32 state is accepted and the loss is float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dopsd_rollout_loss(lambda x, s: x.bfloat16(), lambda x, s: (2 * x).bfloat16(), noise, uniform_sigmas(2))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_sft_loss_shape_mismatch():
    """The flow-matching loss refuses targets and noise of different shapes."""
    with pytest.raises(ValueError, match="shape"):
        dopsd_ref.flow_matching_loss(ok, torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2) * 0.5)
