"""Command line: ``python -m dopsd_ref.conformance --impl package.module:function [...]``.

Exit status 0 iff every invariant passes (1 on any failure, 2 on a usage error).
"""

from __future__ import annotations

import argparse
import sys

from .ema import run_ema_conformance
from .golden import DTYPES
from .harness import CONVENTIONS
from .runner import run_conformance


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dopsd_ref.conformance",
        description="Validate a D-OPSD implementation against golden vectors and the property suite.",
    )
    ap.add_argument("--impl", help="roll-out adapter 'package.module:function' "
                    "with signature fn(student, teacher, noise, sigmas, space) -> (loss, per_step, states)")
    ap.add_argument("--convention", choices=CONVENTIONS, default="sigma",
                    help="how the models are handed to --impl: sigma (x, σ)->v; zimage (x, t=1−σ)->−v; "
                         "flux2 (x, timestep=σ)->v (default: sigma)")
    ap.add_argument("--space", choices=("x0", "velocity", "both"), default="both",
                    help="loss space(s) to test (default: both; the cross-space invariant needs both)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of models and noise (default: float32)")
    ap.add_argument("--device", default="cpu", help="device for the kit's models and noise (default: cpu)")
    ap.add_argument("--frozen-teacher", action="store_true",
                    help="hand the teacher over with requires_grad=False (default: trainable, so a missing "
                         "no_grad/detach on the teacher shows up as teacher gradients)")
    ap.add_argument("--ema", help="EMA adapter 'package.module:function' with signature ema(teacher, student, decay)")
    args = ap.parse_args(argv)
    if not args.impl and not args.ema:
        ap.error("give --impl and/or --ema")
    ok = True
    if args.impl:
        rep = run_conformance(args.impl, convention=args.convention, space=args.space, dtype=args.dtype, device=args.device,
                              frozen_teacher=args.frozen_teacher)
        print(rep.format())
        ok &= rep.passed
    if args.ema:
        if args.impl:
            print()
        rep = run_ema_conformance(args.ema, dtype=args.dtype)
        print(rep.format())
        ok &= rep.passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
