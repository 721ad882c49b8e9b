"""Generate the golden vectors and measure their float32 / bf16 tolerances.

    python -m dopsd_ref.conformance.make_golden            # rewrite dopsd_ref/conformance/golden/
    python -m dopsd_ref.conformance.make_golden --out DIR  # write elsewhere
    python -m dopsd_ref.conformance.make_golden --check    # regenerate in a temp dir, compare bytes

1. **Goldens (float64).** For each field (linear, mlp), schedule and loss space, the
   reference :func:`dopsd_ref.dopsd_rollout_loss` rolls out the golden student against the
   golden teacher; loss, per-step losses, states, final sample and ∂loss/∂θ_student are
   stored. The EMA case applies :func:`dopsd_ref.ema_update_` three times at d = 0.9 and
   once at d = 0.9999.
2. **Tolerances.** The example adapters of dopsd_ref in all three conventions run through
   the kit in float64, float32 and bfloat16 (models and noise cast to that dtype); for each
   quantity the largest relative error against the float64 goldens is multiplied by
   ``MARGIN`` and rounded *up* to 1, 2 or 5 × 10^n, with a per-dtype floor.

Everything is deterministic: inputs come from an integer LCG, files are written with a
fixed byte layout (sorted keys), and the manifest is sorted JSON. The manifest records
measured errors to two significant digits.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .. import dopsd_rollout_loss, ema_update_
from ._io import dumps_json, sha256_file, write_safetensors
from .ema import EMA_SHAPES, EMA_STEPS, apply_ema
from .harness import single_thread
from .fields import CONTEXT_DIM, DATA_SHAPE, HIDDEN_DIM, build_field, lcg_normal, make_field_tensors, make_noise, param_names
from .golden import (
    DTYPES, EMA_DECAY, EMA_SLOW_DECAY, FIELDS, GOLDEN_DIR, PROPERTY_CASE, QUANTITIES, SCHEDULES, SPACES,
    CaseId, Golden, all_cases, dtype_from_name,
)

__all__ = ["compute_goldens", "measure_errors", "tolerances_from", "generate", "main", "MARGIN", "FLOORS"]

FORMAT = "dopsd-ref-conformance/1"
MARGIN = 4.0
FLOORS: dict[str, float] = {"float64": 1e-12, "float32": 1e-6, "bfloat16": 1e-3}
EXAMPLES = {
    "sigma": "dopsd_ref.conformance.examples.sigma:rollout",
    "zimage": "dopsd_ref.conformance.examples.zimage:rollout",
    "flux2": "dopsd_ref.conformance.examples.flux2:rollout",
}
EMA_EXAMPLE = "dopsd_ref.conformance.examples.ema:ema"


def _rollout_case(t: dict[str, Tensor], case: CaseId) -> dict[str, Tensor]:
    student = build_field(case.field, t, "student")
    teacher = build_field(case.field, t, "teacher").requires_grad_(False)
    out = dopsd_rollout_loss(student, teacher, t["noise"], t[f"sigmas.{case.schedule}"], case.space)  # type: ignore[arg-type]
    out.loss.backward()
    p = case.prefix
    res = {
        f"{p}.loss": out.loss.detach().clone(),
        f"{p}.per_step": out.per_step.clone(),
        f"{p}.states": out.states.clone(),
        f"{p}.final_sample": out.states[-1].clone(),
    }
    params = dict(student.named_parameters())
    for n in param_names(case.field):
        res[f"{p}.grad.{n}"] = params[n].grad.detach().clone()
    return res


def _ema_tensors() -> dict[str, Tensor]:
    n = len(EMA_SHAPES)
    t0 = [lcg_normal(3000 + i, s) for i, s in enumerate(EMA_SHAPES)]
    out = {f"teacher0.{i}": t0[i] for i in range(n)}
    prev = t0
    for s in range(1, EMA_STEPS + 1):
        stud = [t0[i] + lcg_normal(3100 + 10 * s + i, EMA_SHAPES[i]) for i in range(n)]
        new = [p.clone() for p in prev]
        ema_update_(new, stud, EMA_DECAY)
        out.update({f"student{s}.{i}": stud[i] for i in range(n)})
        out.update({f"expected{s}.{i}": new[i] for i in range(n)})
        prev = new
    slow = [t.clone() for t in t0]
    ema_update_(slow, [out[f"student1.{i}"] for i in range(n)], EMA_SLOW_DECAY)
    out.update({f"expected_slow.{i}": slow[i] for i in range(n)})
    return out


def compute_goldens() -> dict[str, dict[str, Tensor]]:
    """All golden tensors in float64: file stem -> name -> tensor."""
    files: dict[str, dict[str, Tensor]] = {}
    for kind in FIELDS:
        t = make_field_tensors(kind)
        t["noise"] = make_noise()
        for name, (_, grid) in SCHEDULES.items():
            t[f"sigmas.{name}"] = grid().to(torch.float64)
        for case in all_cases():
            if case.field == kind:
                t.update(_rollout_case(t, case))
        files[kind] = t
    files["ema"] = _ema_tensors()
    return files


def measure_errors(golden: Golden) -> dict[str, dict[str, float]]:
    """Max relative error of the reference adapters per dtype and quantity (all conventions)."""
    from .ema import ema_golden_tensors
    from .harness import load_callable
    from .invariants import Subject, rel_err
    from .runner import golden_problem

    meas: dict[str, dict[str, float]] = {}
    for dn in DTYPES:
        td = dtype_from_name(dn)
        m = {q: 0.0 for q in (*QUANTITIES, "ema")}
        for conv, spec in EXAMPLES.items():
            subject = Subject(load_callable(spec), conv, td, torch.device("cpu"))
            for case in all_cases():
                rec = subject.run(golden_problem(golden, case))
                exp = golden.expected(case)
                m["loss"] = max(m["loss"], rel_err(rec.loss, exp["loss"]))
                m["per_step"] = max(m["per_step"], rel_err(rec.per_step, exp["per_step"]))
                m["states"] = max(m["states"], rel_err(rec.states, exp["states"]))
                m["final_sample"] = max(m["final_sample"], rel_err(rec.states[-1], exp["final_sample"]))
                m["gradients"] = max(m["gradients"], *(rel_err(rec.grads[n], exp[f"grad.{n}"]) for n in rec.grads))
        fn = load_callable(EMA_EXAMPLE)
        t0, students, expected, slow = ema_golden_tensors(golden)
        prev = t0
        for s in range(EMA_STEPS):
            new, _, _ = apply_ema(fn, prev, students[s], EMA_DECAY, td)
            m["ema"] = max(m["ema"], *(rel_err(a, b) for a, b in zip(new, expected[s])))
            prev = expected[s]
        new, _, _ = apply_ema(fn, t0, students[0], EMA_SLOW_DECAY, td)
        m["ema"] = max(m["ema"], *(rel_err(a, b) for a, b in zip(new, slow)))
        meas[dn] = m
    return meas


def nice_ceil(x: float) -> float:
    """Smallest value m·10^e ≥ x with m ∈ {1, 2, 5}, as a clean decimal float."""
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"cannot round {x!r}")
    e = math.floor(math.log10(x))
    for ee in (e - 1, e, e + 1):
        for m in (1, 2, 5):
            v = float(f"{m}e{ee}")
            if v >= x:
                return v
    return float(f"1e{e + 2}")


def tolerances_from(measured: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``nice_ceil(max(MARGIN·measured, floor))`` per dtype and quantity."""
    return {dn: {q: nice_ceil(max(MARGIN * e, FLOORS[dn])) for q, e in m.items()} for dn, m in measured.items()}


def _sig2(x: float) -> float:
    return float(f"{x:.2g}")


def generate(out_dir: Path) -> dict:
    """Write ``linear/mlp/ema.safetensors`` and ``manifest.json`` into ``out_dir``; return the manifest."""
    with single_thread():  # small tensors; also keeps every reduction single-threaded
        return _generate(out_dir)


def _generate(out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = compute_goldens()
    meta = {"format": FORMAT}
    for stem, tensors in files.items():
        write_safetensors(out_dir / f"{stem}.safetensors", tensors, meta)
    provisional = Golden(root=out_dir, manifest={}, files=files)
    measured = measure_errors(provisional)
    manifest = {
        "format": FORMAT,
        "generator": "python -m dopsd_ref.conformance.make_golden",
        "files": {f"{stem}.safetensors": {"sha256": sha256_file(out_dir / f"{stem}.safetensors")} for stem in files},
        "fields": {
            "data_shape": list(DATA_SHAPE),
            "context_dim": CONTEXT_DIM,
            "hidden_dim": HIDDEN_DIM,
            "linear": {"formula": "v = x·Aᵀ + σ·a + c·Uᵀ + b (x flattened to [B, 16])", "params": param_names("linear")},
            "mlp": {"formula": "v = W2·tanh(W1·x + σ·w_sigma + Wc·c + b1) + b2", "params": param_names("mlp")},
            "teacher": "student weights + 0.25 × fixed perturbation; different context c",
        },
        "schedules": {n: {"description": d, "sigmas": [float(s) for s in files["linear"][f"sigmas.{n}"]]}
                      for n, (d, _) in SCHEDULES.items()},
        "spaces": list(SPACES),
        "cases": [str(c) for c in all_cases()],
        "property_case": "/".join(PROPERTY_CASE),
        "ema": {"decay": EMA_DECAY, "slow_decay": EMA_SLOW_DECAY, "steps": EMA_STEPS,
                "shapes": [list(s) for s in EMA_SHAPES]},
        "error_metric": "max|a - b| / max|b| (absolute if b == 0), a = implementation cast to float64, b = golden",
        "tolerance_rule": f"nice_ceil(max({MARGIN} * measured, floor)), floors {FLOORS}; "
                          "measured = max over dopsd_ref's sigma/zimage/flux2 adapters and all cases",
        "measured": {dn: {q: _sig2(e) for q, e in m.items()} for dn, m in measured.items()},
        "tolerances": tolerances_from(measured),
    }
    (out_dir / "manifest.json").write_text(dumps_json(manifest))
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dopsd_ref.conformance.make_golden", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=GOLDEN_DIR, help="output directory (default: the shipped goldens)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out byte for byte")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            generate(Path(tmp))
            names = sorted(p.name for p in Path(tmp).iterdir())
            bad = [n for n in names if not (args.out / n).is_file() or (args.out / n).read_bytes() != (Path(tmp) / n).read_bytes()]
        if bad:
            print(f"golden vectors differ from a fresh regeneration: {bad}", file=sys.stderr)
            return 1
        print(f"golden vectors in {args.out} reproduce bit for bit ({len(names)} files)")
        return 0
    manifest = generate(args.out)
    print(f"wrote {len(manifest['files'])} golden files + manifest.json to {args.out}")
    for dn, tol in manifest["tolerances"].items():
        print(f"  {dn:9s} " + "  ".join(f"{q}={v:g}" for q, v in sorted(tol.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
