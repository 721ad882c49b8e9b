"""Shared test configuration: deterministic hypothesis profiles and small torch settings."""

import os
import signal

import pytest
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


@pytest.fixture
def default_sigint():
    """Python's default SIGINT handler for the test, whatever the process inherited.

    A test runner started in the background (``nohup``, ``cmd &``) inherits SIGINT as
    *ignored*; tests that check a Ctrl-C handler is installed and then restored need a known
    starting handler. The inherited one is put back afterwards.
    """
    inherited = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
