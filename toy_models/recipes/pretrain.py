"""Recipe 1: base flow-matching pre-training of the toy DiT with the in-context mixture.

    python -m toy_models.recipes.pretrain --steps 9000 --out toy_models/weights/toy-dit-base
    # v2: continue v1's weights on the placement-free mixture with fills and domains
    python -m toy_models.recipes.pretrain --mixture v2 --init <v1 folder> --steps 6000 --lr 3e-4 ...

Loss per sample: ``|| v_θ(x_σ, σ, c) − (ε − x0) ||²`` with ``x_σ = (1 − σ)·x0 + σ·ε``; the
batch mixes text-only, reference-token and encoder-route contexts (toy_models.world.mixture).
The EMA weights are written (HF folder) every ``--ckpt-every`` steps and at the end;
``training.json`` in the folder records command, config, seed, steps and wall-clock.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from toy_models.models.dit import TOY_DIT_CONFIGS, TOY_DIT_SIZES, ToyDiT, load_deepened
from toy_models.world.mixture import MIXTURES, pretrain_batch
from toy_models.recipes.common import (EMA, JsonLog, base_parser, fm_loss_sum, lr_at, save_atomic, save_pretrained_atomic,
                                       setup, write_json)


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[1], "toy_models/weights/toy-dit-base")
    p.add_argument("--size", default="S", choices=sorted(TOY_DIT_SIZES))
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--ckpt-every", type=int, default=1000)
    p.add_argument("--state", default=None, help="resumable state file (default runs/<out name>/state.pt)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop early (and checkpoint) after this wall-clock")
    p.add_argument("--history", default="", help="free-text note on how this run was resumed/extended (recorded)")
    p.add_argument("--late-from", type=int, default=0, help="from this step on, use --late-p-ref (0 = never)")
    p.add_argument("--late-p-ref", type=float, default=0.3, help="share of reference samples in the late phase")
    p.add_argument("--jitter-from", type=int, default=0,
                   help="from this step on, references are aligned with probability --jitter-aligned (0 = never): "
                        "the teacher should carry the concept, not the target's placement")
    p.add_argument("--jitter-aligned", type=float, default=0.0, help="aligned share of references after --jitter-from")
    p.add_argument("--mixture", default="v1", choices=sorted(MIXTURES), help="base-training mixture (toy_models.world.mixture)")
    p.add_argument("--no-ref-pos", action="store_true",
                   help="reference tokens without 2-D positions (ToyDiTConfig.ref_pos=False): a position-free set")
    p.add_argument("--rope", action="store_true",
                   help="2-D rotary positions in the joint self-attention (ToyDiTConfig.rope): relative ref↔latent offsets")
    p.add_argument("--extra-blocks", type=int, default=0,
                   help="transformer blocks added after the --init model's (identity at start, adaLN-Zero)")
    p.add_argument("--init", default="", help="start from this model folder's weights (a continuation, e.g. v2 from v1)")
    args = p.parse_args(argv)
    setup(args)
    out = Path(args.out)
    state_path = Path(args.state or f"runs/{out.name}/state.pt")
    mix = MIXTURES[args.mixture]
    late_mix = dataclasses.replace(mix, p_ref=args.late_p_ref)
    if args.extra_blocks and not args.init:
        p.error("--extra-blocks needs --init (the model to deepen)")
    source = ToyDiT.from_pretrained(args.init).to(args.device) if args.init else None
    depth = (source.config.depth if source else TOY_DIT_CONFIGS[args.size].depth) + args.extra_blocks
    model = TOY_DIT_SIZES[args.size](ref_pos=not args.no_ref_pos, rope=args.rope, depth=depth).to(args.device)
    if source is not None:
        load_deepened(model, source)
    log = JsonLog(state_path.parent / "log.jsonl")
    ema = EMA(model, args.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start, wall0 = 0, 0.0
    if args.resume and state_path.exists():
        st = torch.load(state_path, map_location=args.device, weights_only=True)
        model.load_state_dict(st["model"]); ema.model.load_state_dict(st["ema"]); opt.load_state_dict(st["opt"])
        ema.updates, start, wall0 = st["ema_updates"], st["step"], st["wall_s"]
    n_params = sum(q.numel() for q in model.parameters())
    init_json = Path(args.init) / "training.json" if args.init else None
    init_training = json.loads(init_json.read_text()) if init_json and init_json.exists() else None
    t0 = time.time() - wall0

    def checkpoint(step: int) -> None:
        wall = time.time() - t0
        save_pretrained_atomic(ema.model, out)
        write_json(out / "training.json", {
            "recipe": "toy_models.recipes.pretrain",
            "command": "python -m toy_models.recipes.pretrain " + shlex.join(sys.argv[1:] if argv is None else argv),
            "seed": args.seed, "size": args.size, "steps_done": step, "steps_planned": args.steps,
            "batch": args.batch, "lr": args.lr, "ema": args.ema, "params": n_params,
            "ref_pos": not args.no_ref_pos, "rope": args.rope, "depth": depth, "mixture_name": args.mixture, "init": args.init, "init_training": init_training,
            "mixture": dataclasses.asdict(mix), "wall_clock_s": round(wall, 1),
            "history": args.history, "late_from": args.late_from, "late_mixture": dataclasses.asdict(late_mix) if args.late_from else None,
            "jitter_from": args.jitter_from, "jitter_aligned": args.jitter_aligned,
            "threads": torch.get_num_threads(),
        })
        save_atomic({"model": model.state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
                     "ema_updates": ema.updates, "step": step, "wall_s": wall}, state_path)

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    bar = tqdm(range(start, args.steps), desc="pretrain", initial=start, total=args.steps)
    run = 0.0
    for step in bar:
        gen.manual_seed(args.seed * 1_000_003 + step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        cur = late_mix if args.late_from and step >= args.late_from else mix
        if args.jitter_from and step >= args.jitter_from:
            cur = dataclasses.replace(cur, aligned_start=args.jitter_aligned, aligned_end=args.jitter_aligned)
        parts = pretrain_batch(args.seed, step, args.batch, step / args.steps, cur)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for sb in parts:
            loss = fm_loss_sum(model, sb.x0.to(args.device), sb.context.to(args.device), gen) / args.batch
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        run = total if step == start else 0.98 * run + 0.02 * total
        bar.set_postfix(loss=f"{run:.4f}")
        if step % 100 == 0:
            log.write(step=step, loss=total, loss_avg=run, wall_s=round(time.time() - t0, 1))
        if (step + 1) % args.ckpt_every == 0:
            checkpoint(step + 1)
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            checkpoint(step + 1)
            print(f"stopping at step {step + 1}: --max-minutes reached")
            return
    checkpoint(args.steps)
    print(f"done: {args.steps} steps in {time.time() - t0:.0f} s -> {out}")


if __name__ == "__main__":
    main()
