"""The benchmark's memory probe, and the memory property of per-step backward it measures."""

from toy_models.bench import Case, _memory_subprocess


def test_per_step_backward_memory_is_flat_in_k():
    """With per-step backward, the peak activation memory of a K = 8 roll-out stays close to
    that of one step, while a single backward over all K graphs holds several times more
    (measured in fresh subprocesses; generous margins)."""
    case = Case("toy", 8, 32, 16)
    per_step = _memory_subprocess(case, "per_step", "cpu")
    single = _memory_subprocess(case, "single", "cpu")
    one = _memory_subprocess(Case("toy", 1, 32, 16), "per_step", "cpu")
    assert per_step < 1.5 * one
    assert single > 3.0 * per_step
