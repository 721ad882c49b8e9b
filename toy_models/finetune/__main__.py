"""Command line: fine-tune the toy model on your pairs, sample from the result, evaluate it.

    python -m toy_models.finetune train  --data path/to/folder --method dopsd --out runs/mine
    python -m toy_models.finetune train  --config my.json --lr 5e-4 --resume
    python -m toy_models.finetune sample --run runs/mine --prompt "large red sks on white" --n 8
    python -m toy_models.finetune eval   --run runs/mine
    python -m toy_models.finetune preflight --data path/to/folder   # does the teacher beat the student?

``train`` takes every field of :class:`toy_models.finetune.config.FinetuneConfig` as a flag
(``--help`` lists them) on top of an optional ``--config`` JSON file. It refuses a folder that
already holds a run unless ``--resume`` (continue; a new ``--lr``/``--weight_decay`` is applied
to the optimizer, other changes of the run's definition are refused) or ``--overwrite``.
Ctrl-C stops after the current step and saves a checkpoint (exit status 130).
Errors are one-line messages (exit status 2), not tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import dopsd_ref
from dopsd_ref import NonFiniteLossError
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.finetune.config import add_config_flags, config_from_args


def _train(args: argparse.Namespace) -> int:
    from toy_models.finetune.train import run_finetune

    cfg = config_from_args(args)
    if args.preflight:  # prints the verdict, warns when the teacher is not better, then trains anyway
        from toy_models.finetune.preflight import run_preflight_cli

        run_preflight_cli(cfg, args, prefix="preflight_")
    result = run_finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if result.interrupted:
        return 130
    last = result.log[-1] if result.log else {}
    print(f"trained {cfg.method} for {cfg.steps} steps in {result.seconds:.1f}s; final loss {last.get('loss', float('nan')):.5f}")
    print(f"run folder: {result.out}  (final student: {result.out / 'final'})")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from toy_models.finetune.train import load_finetuned
    from toy_models.eval.viz import save_grid

    model, cfg = load_finetuned(args.run, args.device)
    prompts = args.prompt or [f"large red {V.SHAPE_TOKEN} on white", f"small blue {V.SHAPE_TOKEN} on black"]
    dev = next(model.parameters()).device
    tokens = V.tokenize(prompts).repeat_interleave(args.n, 0)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(tokens.shape[0], 3, 16, 16, generator=g).to(dev)
    ctx = ToyContext(tokens).to(dev)
    sigmas = dopsd_ref.uniform_sigmas(args.steps)
    x = dopsd_ref.euler_sample(lambda x, s: model(x, s, ctx), noise, sigmas).clamp(-1, 1).cpu()
    out = Path(args.out or Path(args.run) / f"samples_{args.steps}step.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(x, out, nrow=args.n)
    print(f"{len(prompts)} prompt(s) × {args.n} samples at {args.steps} steps → {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from toy_models.finetune.evaluate import evaluate_run

    metrics = evaluate_run(args.run, device=args.device, seeds=args.seeds, steps=args.steps)
    print(json.dumps(metrics, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m toy_models.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune with D-OPSD or a baseline")
    add_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue from the run's newest complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--no-progress", action="store_true")
    from toy_models.finetune import preflight as pf

    pf.add_preflight_flags(t, prefix="preflight_")
    pf.add_subcommand(sub)
    s = sub.add_parser("sample", help="sample from a fine-tuned run")
    s.add_argument("--run", required=True)
    s.add_argument("--prompt", action="append", help="caption (repeatable)")
    s.add_argument("--n", type=int, default=8, help="samples per prompt")
    s.add_argument("--steps", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", help="PNG path (default: RUN/samples_Kstep.png)")
    e = sub.add_parser("eval", help="evaluate a fine-tuned run at 4 steps")
    e.add_argument("--run", required=True)
    e.add_argument("--seeds", type=int, default=3)
    e.add_argument("--steps", type=int, default=4)
    e.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        return {"train": _train, "sample": _sample, "eval": _eval, "preflight": pf.main}[args.cmd](args)
    except (ValueError, FileNotFoundError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only folder, permissions
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write or read{where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aborted: the newest complete checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
