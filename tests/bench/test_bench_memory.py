"""The benchmark's memory probe, and the memory property of per-step backward it measures."""

from toy_models.studies.bench import Case, _memory_subprocess


def test_per_step_backward_memory_is_flat_in_k():
    """With per-step backward, the peak activation memory of a K = 4 roll-out stays close to
    that of a single step, while one backward over all K graphs holds several times more
    (measured in fresh subprocesses; generous margins)."""
    per_step = _memory_subprocess(Case("toy", 4, 16, 16), "per_step", "cpu")
    single = _memory_subprocess(Case("toy", 4, 16, 16), "single", "cpu")
    one = _memory_subprocess(Case("toy", 1, 16, 16), "per_step", "cpu")
    assert per_step < 1.5 * one
    assert single > 2.0 * per_step
