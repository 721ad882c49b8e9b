"""Recipe 2: step distillation of the base model into a 4-step model (both context paths).

    python -m toy_models.recipes.distill --base toy_models/weights/toy-dit-base \
        --out toy_models/weights/toy-dit-turbo4

Trajectory distillation: the base model's fine Euler ODE (``--fine-steps`` uniform steps)
is cached at the coarse grid ``σ_k = 1 − k/K`` (k = 0..K). With ``--guidance w`` the ODE
follows the classifier-free-guided velocity ``v_w = v(x, σ, c⁻) + w·(v(x, σ, c) − v(x, σ, c⁻))``
(guidance distillation, as in the real turbo models, which sample without CFG); by
default the negative context ``c⁻`` is the caption with its shape word replaced by the rare
token for text-only contexts, and the same caption without the reference for reference
contexts (``--negative drop_reference``, :func:`toy_models.models.guidance.guidance_negative`).
``--negative concept_token`` keeps the reference in ``c⁻`` when the caption names every
concept (only its domain is left to the reference); its reference contexts are cached in
two groups, by caption kind (:func:`toy_models.models.guidance.guidable_batches`).
A cache is reused only with the base, guidance, negative, mixture, step counts and context
settings it was made with (:data:`CACHE_KEYS`). The student (initialised from the base)
is trained so that one Euler step from a cached state lands on the next cached state:
``L = || v_θ(x_k, σ_k, c) − (x_{k+1} − x_k) / (σ_{k+1} − σ_k) ||²``.
Contexts: text-only captions (student path) and caption + reference (teacher path, mostly
the reference-token route, some encoder route), so the 4-step model keeps both.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dopsd_ref.conventions import euler_step
from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.models.dit import ToyDiT
from toy_models.models.guidance import NEGATIVES, guidable_batches, guided_velocity
from toy_models.world.mixture import MIXTURES, MixtureConfig, _ref_pair, _text_spec
from toy_models.recipes.common import EMA, base_parser, lr_at, save_atomic, save_pretrained_atomic, setup, write_json
from toy_models.models.sampling import noise_like


#: What a cached ODE depends on (besides its contexts), with the value assumed for caches
#: written before the key was recorded (None: not checked for those).
CACHE_KEYS = {"guidance": 1.0, "negative": "drop_reference", "mixture": "v1", "base": None, "fine_steps": None,
              "steps_k": None, "seed": None, "n_text": None, "n_ref": None, "p_encoder": None, "ref_aligned": None}


def cache_contexts(seed: int, n_text: int, n_ref: int, p_encoder: float, aligned_p: float = 0.8,
                   mix: MixtureConfig = MIXTURES["v1"]) -> list[ToyContext]:
    """Text-only contexts, then reference contexts (tokens route, then encoder route) drawn
    from the base-training mixture ``mix``; a reference shares its target's placement with
    probability ``aligned_p``."""
    rng = np.random.default_rng([seed, 31337])
    sp = [_text_spec(rng, mix) for _ in range(n_text)]
    out = [ToyContext(V.tokenize([D.caption(s) for s in sp]))]
    trip = [_ref_pair(rng, mix, aligned_p=aligned_p) for _ in range(n_ref)]
    n_enc = int(round(n_ref * p_encoder))
    ref = D.render_batch([r for _, r, _ in trip])
    tok = V.tokenize([c for _, _, c in trip])
    out.append(ToyContext(tok[n_enc:], ref[n_enc:], "tokens"))
    if n_enc:
        out.append(ToyContext(tok[:n_enc], ref[:n_enc], "encoder"))
    return out


@torch.no_grad()
def cache_trajectories(model: ToyDiT, ctx: ToyContext, noise: torch.Tensor, coarse: int, fine: int,
                       batch: int = 256, desc: str = "cache", guidance: float = 1.0,
                       negative: str = "drop_reference") -> torch.Tensor:
    """States [N, coarse + 1, 3, H, W] of the fine (guided) Euler ODE at σ = 1 − k/coarse."""
    if fine % coarse:
        raise ValueError(f"fine-steps {fine} must be a multiple of {coarse}")
    model.eval()
    neg = NEGATIVES[negative]
    sig = [1 - j / fine for j in range(fine + 1)]
    every = fine // coarse
    out = []
    for i in tqdm(range(0, noise.shape[0], batch), desc=desc):
        x = noise[i : i + batch].clone()
        c = ctx[i : i + batch]
        states = [x]
        for j in range(fine):
            v = guided_velocity(model, x, torch.full((x.shape[0],), sig[j]), c, guidance, neg)
            x = euler_step(x, v, sig[j], sig[j + 1])
            if (j + 1) % every == 0:
                states.append(x)
        out.append(torch.stack(states, 1))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[1], "toy_models/weights/toy-dit-turbo4")
    p.add_argument("--base", default="toy_models/weights/toy-dit-base")
    p.add_argument("--steps-k", type=int, default=4, help="K, student sampling steps")
    p.add_argument("--fine-steps", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale w of the cached teacher ODE (1 = none)")
    p.add_argument("--negative", default="drop_reference", choices=sorted(NEGATIVES),
                   help="guidance negative c⁻ of the cached ODE (toy_models.models.guidance)")
    p.add_argument("--n-text", type=int, default=2048)
    p.add_argument("--n-ref", type=int, default=1024)
    p.add_argument("--p-encoder", type=float, default=0.15)
    p.add_argument("--ref-aligned", type=float, default=0.8, help="share of cached references placed like their target")
    p.add_argument("--mixture", default="v1", choices=sorted(MIXTURES), help="mixture the cached contexts are drawn from")
    p.add_argument("--train-steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--cache", default="runs/distill/cache.pt")
    args = p.parse_args(argv)
    setup(args)
    t0 = time.time()
    base = ToyDiT.from_pretrained(args.base).eval()
    K = args.steps_k
    cache_path = Path(args.cache)
    if cache_path.exists():
        cache = torch.load(cache_path, weights_only=True)
        for key, old_default in CACHE_KEYS.items():  # a cache written before a key was recorded: its default
            cached = cache[0].get(key, old_default)
            if cached is not None and cached != getattr(args, key):
                raise ValueError(f"{cache_path}: cached with {key} {cached!r}, --{key.replace('_', '-')} is "
                                 f"{getattr(args, key)!r}; pass another --cache")
    else:
        ctxs = cache_contexts(args.seed, args.n_text, args.n_ref, args.p_encoder, args.ref_aligned, MIXTURES[args.mixture])
        ctxs = [part for c in ctxs for part in guidable_batches(c, NEGATIVES[args.negative])]
        cache = []
        for i, c in enumerate(ctxs):
            noise = noise_like(c.batch_size, args.seed * 100 + i)
            states = cache_trajectories(base, c, noise, K, args.fine_steps, desc=f"cache[{c.route if c.has_ref else 'text'}]",
                                        guidance=args.guidance, negative=args.negative)
            cache.append({"tokens": c.tokens, "ref": c.ref, "route": c.route, "states": states,
                          **{key: getattr(args, key) for key in CACHE_KEYS}})
        save_atomic(cache, cache_path)
    t_cache = time.time() - t0

    student = ToyDiT.from_pretrained(args.base).train()
    ema = EMA(student, args.ema)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    sig = torch.tensor([1 - k / K for k in range(K + 1)])
    sizes = torch.tensor([c["states"].shape[0] for c in cache], dtype=torch.float)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.train_steps), desc="distill")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.train_steps, args.lr, 50)
        # one context group per sub-batch, sized by group share
        counts = (sizes / sizes.sum() * args.batch).round().long()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for grp, n in zip(cache, counts.tolist()):
            if n == 0:
                continue
            idx = torch.randint(grp["states"].shape[0], (n,), generator=gen)
            k = torch.randint(K, (n,), generator=gen)
            xs = grp["states"][idx, k]
            xn = grp["states"][idx, k + 1]
            s, sn = sig[k], sig[k + 1]
            target = (xn - xs) / (sn - s).view(-1, 1, 1, 1)
            ctx = ToyContext(grp["tokens"][idx], None if grp["ref"] is None else grp["ref"][idx], grp["route"])
            loss = (student(xs, s, ctx) - target).pow(2).mean(dim=(1, 2, 3)).sum() / args.batch
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema.update(student)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
    save_pretrained_atomic(ema.model, args.out)
    base_info = {}
    bj = Path(args.base) / "training.json"
    if bj.exists():
        import json
        base_info = json.loads(bj.read_text())
    write_json(Path(args.out) / "training.json", {
        "recipe": "toy_models.recipes.distill",
        "command": "python -m toy_models.recipes.distill " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "K": K, "fine_steps": args.fine_steps, "guidance": args.guidance, "negative": args.negative, "n_text": args.n_text, "n_ref": args.n_ref,
        "p_encoder": args.p_encoder, "ref_aligned": args.ref_aligned, "mixture": args.mixture, "train_steps": args.train_steps, "batch": args.batch, "lr": args.lr,
        "ema": args.ema, "base": args.base, "base_steps_done": base_info.get("steps_done"),
        "wall_clock_cache_s": round(t_cache, 1), "wall_clock_s": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
    })
    print(f"done in {time.time() - t0:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
