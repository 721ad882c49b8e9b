"""Shared fixtures: tiny real-architecture components built from config (no downloads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")



@pytest.fixture(scope="session")
def tokenizer():
    from paper_repro.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def zimage_pipe():
    from paper_repro.tiny import tiny_zimage_pipeline

    return tiny_zimage_pipeline(seed=0)


@pytest.fixture()
def flux2_pipe():
    from paper_repro.tiny import tiny_flux2_klein_pipeline

    return tiny_flux2_klein_pipeline(seed=0)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state_one_thread(request, monkeypatch):
    """accelerate keeps a process-wide singleton; each test builds its own Accelerator.

    Tiny models run several times faster with one intra-op thread than with two contending
    threads on a shared CPU; the previous setting is restored for the rest of the suite.
    Accelerators built in CPU tests use the CPU even where CUDA exists (test_gpu.py excepted).
    """
    from accelerate.state import AcceleratorState

    if "test_gpu" not in request.node.nodeid:  # CPU tests stay on CPU on a GPU machine too
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)
