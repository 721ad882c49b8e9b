"""Shared test configuration: deterministic hypothesis profiles and small torch settings."""

import os

import torch
from hypothesis import HealthCheck, settings

# CI and `make test` are derandomized (same examples every run); `HYPOTHESIS_PROFILE=dev`
# explores more.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))
