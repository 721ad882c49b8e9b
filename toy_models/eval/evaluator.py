"""Evaluator: a small CNN classifier of toy-world attributes, and its feature space.

Trained on procedural data that *includes* the held-out concepts (ell, hstripe, glyphs,
the pastel domain) — which the diffusion model never sees — so it can score them. Heads:
shape (6 known + ell + glyph), colour, background, fill style, size, domain. The 128-d
pooled penultimate features define the toy-FID space (toy_models.eval.metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import Tensor, nn

from toy_models.world import data as D
from toy_models.world import vocab as V

HEADS: dict[str, tuple[str, ...]] = {
    "shape": V.KNOWN_SHAPES + (V.NOVEL_SHAPE, "glyph"),
    "color": V.COLORS,
    "bg": V.BACKGROUNDS,
    "style": V.KNOWN_STYLES + (V.NOVEL_STYLE,),
    "size": V.SIZES,
    "domain": D.DOMAINS,
}


def labels_of(specs: list[D.Spec]) -> dict[str, Tensor]:
    """Integer labels per head [B] for a list of specs."""
    return {h: torch.tensor([names.index(getattr(s, h)) for s in specs]) for h, names in HEADS.items()}


@dataclass(frozen=True)
class EvaluatorConfig:
    width: int = 32
    feat_dim: int = 128


class ToyEvaluator(nn.Module, PyTorchModelHubMixin, library_name="dopsd-ref", tags=["dopsd-ref", "toy", "evaluator"]):
    """x [B,3,16,16] in [−1,1] → logits per head; ``features(x)`` → [B, feat_dim]."""

    def __init__(self, config: EvaluatorConfig | dict | None = None) -> None:
        super().__init__()
        if config is None:
            config = EvaluatorConfig()
        elif isinstance(config, dict):
            config = EvaluatorConfig(**config)
        self.config = config
        w, f = config.width, config.feat_dim

        def blk(i: int, o: int, s: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1), nn.GroupNorm(8, o), nn.SiLU())

        self.body = nn.Sequential(blk(3, w), blk(w, w), blk(w, 2 * w, 2), blk(2 * w, 2 * w), blk(2 * w, f, 2), blk(f, f))
        self.heads = nn.ModuleDict({h: nn.Linear(f, len(n)) for h, n in HEADS.items()})

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features [B, feat_dim] (the toy-FID space)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {h: head(f) for h, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 512) -> dict[str, list[str]]:
        """Predicted label names per head."""
        was = self.training
        self.eval()
        out: dict[str, list[str]] = {h: [] for h in HEADS}
        for i in range(0, x.shape[0], batch_size):
            logits = self(x[i : i + batch_size])
            for h, names in HEADS.items():
                out[h] += [names[j] for j in logits[h].argmax(-1).tolist()]
        self.train(was)
        return out

    @torch.no_grad()
    def embed(self, x: Tensor, batch_size: int = 512) -> Tensor:
        was = self.training
        self.eval()
        f = torch.cat([self.features(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
        self.train(was)
        return f
