"""Recipe 3: train the evaluator classifier on procedural data (held-out concepts included).

    python -m toy_models.recipes.train_evaluator --out toy_models/weights/toy-evaluator

Data: shapes uniform over 6 known + ell + glyph, styles uniform over all five, both
domains; augmented with Gaussian noise (std ∈ [0, 0.15]) and a random mild blur so that
imperfect generations are still classified by their concept. Loss: sum of per-head
cross-entropies.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.eval.evaluator import HEADS, EvaluatorConfig, ToyEvaluator, labels_of
from toy_models.recipes.common import base_parser, lr_at, save_pretrained_atomic, setup, write_json

ALL_SHAPES = V.KNOWN_SHAPES + (V.NOVEL_SHAPE, "glyph")
ALL_STYLES = V.KNOWN_STYLES + (V.NOVEL_STYLE,)


def eval_specs(rng: np.random.Generator, n: int) -> list[D.Spec]:
    """Evaluator training distribution: solid half the time, else any fill; 20% pastel."""
    out = []
    for _ in range(n):
        style_p = [0.5] + [0.5 / (len(ALL_STYLES) - 1)] * (len(ALL_STYLES) - 1)
        dom = "pastel" if rng.random() < 0.2 else "base"
        out.append(D.random_spec(rng, shapes=ALL_SHAPES, styles=ALL_STYLES, style_probs=style_p, domain=dom))
    return out


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    B = x.shape[0]
    blur = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=x.dtype) / 16
    xb = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), blur.expand(3, 1, 3, 3), groups=3)
    a = (torch.rand(B, 1, 1, 1, generator=gen) < 0.3).float() * torch.rand(B, 1, 1, 1, generator=gen)
    x = (1 - a) * x + a * xb
    return x + torch.randn(x.shape, generator=gen) * 0.15 * torch.rand(B, 1, 1, 1, generator=gen)


def main(argv: list[str] | None = None) -> None:
    p = base_parser(__doc__.splitlines()[1], "toy_models/weights/toy-evaluator")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    args = p.parse_args(argv)
    setup(args)
    t0 = time.time()
    model = ToyEvaluator(EvaluatorConfig()).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.steps), desc="evaluator")
    for step in bar:
        rng = np.random.default_rng([args.seed, 4241, step])
        sp = eval_specs(rng, args.batch)
        x = augment(D.render_batch(sp), gen).to(args.device)
        y = labels_of(sp)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 100, 0.02)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], y[h].to(args.device)) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    # held-out accuracy on clean renders of a separate seed, reported in training.json
    sp = eval_specs(np.random.default_rng([args.seed, 999]), 2000)
    pred = model.predict(D.render_batch(sp).to(args.device))
    acc = {h: float(np.mean([a == getattr(s, h) for a, s in zip(pred[h], sp)])) for h in HEADS}
    save_pretrained_atomic(model, args.out)
    write_json(Path(args.out) / "training.json", {
        "recipe": "toy_models.recipes.train_evaluator",
        "command": "python -m toy_models.recipes.train_evaluator " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "heldout_clean_accuracy": acc, "wall_clock_s": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
    })
    print("held-out clean accuracy:", acc)


if __name__ == "__main__":
    main()
