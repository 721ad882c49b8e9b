"""The shipped golden vectors: reproducible bit for bit, small, self-consistent."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dopsd_ref.conformance import load_golden
from dopsd_ref.conformance._io import read_safetensors, sha256_file, write_safetensors
from dopsd_ref.conformance.golden import GOLDEN_DIR, all_cases
from dopsd_ref.conformance.make_golden import MARGIN, generate, main


def test_regenerating_reproduces_shipped_files_bit_for_bit(tmp_path: Path) -> None:
    """Invariant: `python -m dopsd_ref.conformance.make_golden` run afresh writes exactly
    the shipped bytes (tensors, layout, manifest and measured tolerances)."""
    generate(tmp_path)
    shipped = sorted(p.name for p in GOLDEN_DIR.iterdir() if p.is_file())
    assert sorted(p.name for p in tmp_path.iterdir()) == shipped
    for name in shipped:
        assert (tmp_path / name).read_bytes() == (GOLDEN_DIR / name).read_bytes(), name
    assert main(["--check", "--out", str(tmp_path)]) == 0


def test_manifest_hashes_size_and_tolerances() -> None:
    """Invariant: the manifest lists every golden file with its SHA-256, the files total
    < 1 MB, and each tolerance is at least MARGIN × the error measured on the reference."""
    m = json.loads((GOLDEN_DIR / "manifest.json").read_text())
    total = 0
    for name, info in m["files"].items():
        assert sha256_file(GOLDEN_DIR / name) == info["sha256"]
        total += (GOLDEN_DIR / name).stat().st_size
    assert total < 1_000_000
    for dtype, meas in m["measured"].items():
        for q, err in meas.items():
            assert m["tolerances"][dtype][q] >= MARGIN * err * 0.95, (dtype, q)
    assert m["tolerances"]["float32"]["states"] < m["tolerances"]["bfloat16"]["states"]


def test_goldens_satisfy_the_method_identities() -> None:
    """Invariant: in the float64 goldens, states[0] is the noise, the loss is the step mean,
    the x0 loss is σ² times the velocity loss, and both spaces visit the same states."""
    g = load_golden()
    for case in all_cases():
        e = g.expected(case)
        assert torch.equal(e["states"][0], g.noise())
        assert torch.allclose(e["loss"], e["per_step"].mean(), rtol=1e-14, atol=0)
        if case.space == "x0":
            v = g.expected(type(case)(case.field, case.schedule, "velocity"))
            s2 = g.sigmas(case.schedule) ** 2
            assert torch.allclose(e["per_step"], s2 * v["per_step"], rtol=1e-12, atol=0)
            assert torch.equal(e["states"], v["states"])


def test_writer_is_deterministic_and_readable(tmp_path: Path) -> None:
    """Invariant: the safetensors writer gives identical bytes for the same tensors whatever
    the insertion order of tensors and metadata, and the safetensors library reads them back."""
    a = {"z": torch.arange(6, dtype=torch.float64).reshape(2, 3), "a": torch.tensor(1.5, dtype=torch.float64)}
    b = dict(reversed(list(a.items())))
    write_safetensors(tmp_path / "a.safetensors", a, {"x": "1", "y": "2"})
    write_safetensors(tmp_path / "b.safetensors", b, {"y": "2", "x": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    back = read_safetensors(tmp_path / "a.safetensors")
    assert set(back) == {"a", "z"} and all(torch.equal(back[k], a[k]) for k in a)


def _hand_velocity(t: dict[str, torch.Tensor], kind: str, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The golden student's σ-velocity written from the manifest formulas, on [B, 16]."""
    c = t["student.ctx"]
    if kind == "linear":
        return x @ t["student.A"].T + sigma * t["student.a"] + c @ t["student.U"].T + t["student.b"]
    h = torch.tanh(x @ t["student.W1"].T + sigma * t["student.w_sigma"] + c @ t["student.Wc"].T + t["student.b1"])
    return h @ t["student.W2"].T + t["student.b2"]


def test_golden_states_and_final_sample_follow_the_euler_recursion() -> None:
    """Invariant: in every golden case, the stored states and the stored final sample are
    the Euler recursion x_{k+1} = x_k + (σ_{k+1} − σ_k)·v(x_k, σ_k), σ_{K+1} = 0, of the
    student written out here from the field formulas and the stored weights (not via
    dopsd_ref), from the stored noise on the stored grid."""
    g = load_golden()
    for case in all_cases():
        t = g.files[case.field]
        e = g.expected(case)
        sig = g.sigmas(case.schedule).tolist() + [0.0]
        x = g.noise().reshape(g.noise().shape[0], -1)  # [B, 16]
        for k in range(len(sig) - 1):
            torch.testing.assert_close(e["states"][k].reshape(x.shape), x, rtol=0, atol=1e-13)
            x = x + (sig[k + 1] - sig[k]) * _hand_velocity(t, case.field, x, sig[k])
        torch.testing.assert_close(e["states"][-1].reshape(x.shape), x, rtol=0, atol=1e-13)
        torch.testing.assert_close(e["final_sample"].reshape(x.shape), x, rtol=0, atol=1e-13)
