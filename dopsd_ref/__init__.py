"""dopsd_ref — a small, exact reference implementation of D-OPSD.

D-OPSD (on-policy self-distillation) fine-tunes a step-distilled diffusion model without
breaking its few-step sampling: the student rolls out its own K-step Euler trajectory from
text alone, and an EMA teacher that also sees the target image grades every state.

Start reading at :mod:`dopsd_ref.dopsd` (the method, one function), then
:mod:`conventions`, :mod:`schedules`, :mod:`losses`, :mod:`teachers`, :mod:`train`.

Stable surface (external validators call it)::

    from dopsd_ref import dopsd_rollout_loss, ema_update_
    out = dopsd_rollout_loss(student, teacher, noise, sigmas, space="x0")
    ema_update_(teacher_params, student_params, decay)
"""

from .baselines import offpolicy_distillation_loss
from .checks import NonFiniteLossError
from .curriculum import KSchedule
from .conventions import (
    euler_step,
    expand_sigma,
    from_flux2,
    from_zimage,
    noise_from_velocity,
    noise_state,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)
from .dopsd import DOPSDOutput, dopsd_rollout_loss
from .losses import (
    dopsd_step_loss,
    flow_matching_loss,
    gaussian_kl_step,
    per_sample_step_loss,
    sample_training_sigmas,
)
from .preflight import PreflightReport, teacher_preflight
from .sampling import euler_sample
from .schedules import (
    ZIMAGE_TURBO_4,
    ZIMAGE_TURBO_8,
    flux2_empirical_mu,
    flux2_sigmas,
    shifted_sigmas,
    uniform_sigmas,
    validate_sigmas,
    zimage_turbo_sigmas,
)
from .teachers import LiveTeacherWarning, Teacher, TeacherConfig, ema_update_, make_teacher
from .train import MicroBatch, SFTMicroBatch, StepConfig, StepResult, dopsd_train_step, sft_train_step

__version__ = "0.1.0"

__all__ = [
    "DOPSDOutput",
    "KSchedule",
    "LiveTeacherWarning",
    "MicroBatch",
    "NonFiniteLossError",
    "PreflightReport",
    "SFTMicroBatch",
    "StepConfig",
    "StepResult",
    "Teacher",
    "TeacherConfig",
    "ZIMAGE_TURBO_4",
    "ZIMAGE_TURBO_8",
    "dopsd_rollout_loss",
    "dopsd_step_loss",
    "dopsd_train_step",
    "ema_update_",
    "euler_sample",
    "euler_step",
    "expand_sigma",
    "flow_matching_loss",
    "flux2_empirical_mu",
    "flux2_sigmas",
    "from_flux2",
    "from_zimage",
    "gaussian_kl_step",
    "make_teacher",
    "noise_from_velocity",
    "noise_state",
    "offpolicy_distillation_loss",
    "per_sample_step_loss",
    "sample_training_sigmas",
    "sft_train_step",
    "shifted_sigmas",
    "teacher_preflight",
    "uniform_sigmas",
    "validate_sigmas",
    "velocity_from_x0",
    "velocity_target",
    "x0_from_velocity",
    "zimage_turbo_sigmas",
]
