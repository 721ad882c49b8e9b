"""A placement-free teacher context for the toy: the target, moved to where the student draws.

D-OPSD's teacher should carry the target's *concept*, not a copy of its pixels
(``method-notes``: a teacher that sees the full target degenerates). A real teacher context
— a VLM's tokens of the target image — does not pin the layout. The toy's reference-token
route does: it was trained mostly on aligned pairs, so with the raw target as reference the
teacher draws the concept *at the target's position*, whatever the student's state says.
A text-only student cannot know that position, so at σ = 1 its regression target becomes
the average over the targets' placements (a blob) and the concept is barely learned
(measured: 0.64 vs 0.97 concept accuracy, see the README's main-job section).

The toy therefore shows the teacher the target translated to the student's current layout::

    x̂0_s = x_σ − σ·v_θ(x_σ, σ, c_s)                      # no grad: where the student draws
    δ     = p·round((centroid(x̂0_s) − centroid(y)) / p)   # [B, 2] pixels, whole fill periods
    c_t   = (caption, roll(y, δ))                          # concept of y, placement of x̂0_s

Centroids are of the foreground: pixels farther than ``threshold`` (RGB distance in [−1, 1]
units) from the background colour, estimated as the median of the four corners. The toy's
fill patterns are anchored to the pixel grid (stripes repeat every 2 pixels): an odd shift
puts horizontal stripes into their never-seen opposite phase, and the teacher stops drawing
them (its x̂0 at σ = 1 shows the held-out stripes in 0.91 of 64 samples with the raw target,
0.44 after a nearest-pixel move). For a fill concept the shift is therefore rounded to whole
periods ``p`` (``period=2``); for shapes the nearest pixel (``p = 1``) is needed — rounding to
2 pixels lowered the L's concept accuracy 0.97 → 0.53, while the stripes went 0.06 → 0.81
(``python -m toy_models.finetune train [--data style:hstripe] --teacher_ref_period 2``,
150 steps, then ``eval --seeds 3``). This costs one extra no-grad student forward per roll-out step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import Tensor

from toy_models.models.context import ToyContext

ContextModel = Callable[[Tensor, Tensor, ToyContext], Tensor]

__all__ = ["background", "foreground_centroid", "shift_images", "placement_matched_teacher"]


def background(images: Tensor) -> Tensor:
    """Background colour [B, 3] of images [B, 3, H, W]: the median of the four corner pixels."""
    corners = torch.stack([images[..., 0, 0], images[..., 0, -1], images[..., -1, 0], images[..., -1, -1]], 0)
    return corners.median(0).values


def foreground_centroid(images: Tensor, bg: Tensor, threshold: float = 0.3) -> tuple[Tensor, Tensor]:
    """Centroid (y, x) [B, 2] of the foreground, weighted by the distance above ``threshold``
    from the background colour ``bg`` [B, 3]; and a mask [B] of images that have any foreground."""
    w = ((images - bg[:, :, None, None]).norm(dim=1) - threshold).clamp_min(0)  # [B, H, W]
    H, W = images.shape[-2:]
    ys = torch.arange(H, dtype=images.dtype, device=images.device)[None, :, None]
    xs = torch.arange(W, dtype=images.dtype, device=images.device)[None, None, :]
    total = w.sum((1, 2))  # [B]
    safe = total.clamp_min(1e-6)
    centroid = torch.stack([(w * ys).sum((1, 2)) / safe, (w * xs).sum((1, 2)) / safe], 1)
    return centroid, total > 1e-6


def shift_images(images: Tensor, shifts: Tensor) -> Tensor:
    """Translate each image [B, 3, H, W] circularly by its integer (dy, dx) in ``shifts`` [B, 2]."""
    if shifts.shape != (images.shape[0], 2):
        raise ValueError(f"shifts must be [{images.shape[0]}, 2], got {tuple(shifts.shape)}")
    return torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(-2, -1))
                        for img, (dy, dx) in zip(images, shifts.tolist())])


def placement_matched_teacher(teacher: ContextModel, student: ContextModel, student_context: ToyContext,
                              threshold: float = 0.3, period: int = 1) -> ContextModel:
    """Wrap ``teacher`` so that, at each state, its reference is moved to the student's layout.

    Args:
        teacher: the teacher role ``(x, σ, context) -> v`` (no grad is taken through it).
        student: the student role; queried without grad for its x0 prediction.
        student_context: the student's (text-only) context for the same batch.
        threshold: foreground threshold (RGB distance) for the centroids.
        period: shifts are rounded to multiples of this many pixels (keeps grid-anchored
            fill patterns in phase; 1 = nearest pixel).

    Returns:
        ``(x, σ, teacher_context) -> v``: the teacher on ``teacher_context`` with its ``ref``
        translated so that the reference's foreground centroid lands on the centroid of the
        student's x0 prediction (unchanged where either has no foreground).
    """

    def call(x: Tensor, sigma: Tensor, context: ToyContext) -> Tensor:
        if context.ref is None:
            raise ValueError("placement_matched_teacher needs a teacher context with a reference image")
        with torch.no_grad():
            x0 = x - sigma.view(-1, 1, 1, 1) * student(x, sigma, student_context)  # [B, 3, H, W]
            ref = context.ref.to(x.dtype)
            bg = background(ref)
            c_student, ok_s = foreground_centroid(x0, bg, threshold)
            c_ref, ok_r = foreground_centroid(ref, bg, threshold)
            shift = ((c_student - c_ref) / period).round().long() * period * (ok_s & ok_r).long()[:, None]  # [B, 2]
            moved = shift_images(ref, shift.cpu())
        return teacher(x, sigma, dataclasses.replace(context, ref=moved))

    return call
