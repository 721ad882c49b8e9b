"""Toy world for dopsd-ref: procedural image–caption data, a tiny DiT denoiser with text and
multimodal (reference) contexts, recipes, an evaluator, and shipped few-step weights.

Quick use::

    from toy_models import load_turbo, load_evaluator, text_context, teacher_context, sample
    model = load_turbo()                       # 4-step distilled DiT (offline, local folder)
    imgs = sample(model, text_context(["large red circle on black"] * 8), steps=4, seed=0)
"""

from toy_models.models.context import ToyContext, teacher_context, text_context
from toy_models.models.hub import load_base, load_evaluator, load_turbo, weights_available
from toy_models.models.sampling import noise_like, sample

__all__ = [
    "ToyContext", "teacher_context", "text_context", "load_base", "load_evaluator", "load_turbo",
    "weights_available", "noise_like", "sample",
]
