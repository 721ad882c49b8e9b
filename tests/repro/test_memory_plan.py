"""Activation memory of a roll-out on the real (tiny) architecture: flat in K with per-step
backward, proportional to K with one backward over all K graphs (method notes §3, "Gradient
memory"). Measured with saved-tensor hooks, so it is exact on CPU."""

from __future__ import annotations


def test_per_step_backward_memory_is_flat_in_k_and_single_grows_linearly():
    from paper_repro.memory_plan import rollout_saved_peak

    per = {k: rollout_saved_peak(k, per_step=True, latent=4) for k in (1, 3)}
    single = {k: rollout_saved_peak(k, per_step=False, latent=4) for k in (1, 3)}
    assert per[1] > 0 and per[3] == per[1]
    assert single[1] == per[1] and single[3] == 3 * single[1]


def test_real_zimage_size_and_lora_count():
    from paper_repro.memory_plan import real_param_counts

    c = real_param_counts()
    assert 6.0e9 < c["zimage_transformer"] < 6.3e9  # Z-Image is a 6B DiT
    # rank 64 x (in + out) over q/k/v/out (dim->dim) and w1/w3 (dim->10240), w2 (10240->dim), 34 blocks
    dim, hid, r = 3840, int(3840 / 3 * 8), 64
    assert c["zimage_lora_r64"] == 34 * r * (4 * 2 * dim + 3 * (dim + hid))
