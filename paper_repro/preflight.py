"""Teacher pre-flight on Z-Image-Turbo / FLUX.2-klein: is the teacher closer to the targets than the student?

    python -m paper_repro.preflight --config paper_repro/configs/zimage_turbo_lora.yaml
    python -m paper_repro.preflight --config paper_repro/configs/tiny_flux2.yaml --set data.root=/tmp/tiny_data
    python -m paper_repro.train --config ... --preflight        # the same check, then training

Before any training (adapters at B = 0, teacher = base weights with the multimodal context),
for every image–caption pair of the training folder and ``seeds`` noises each, the student
rolls out its K-step training grid from text alone and, at each state,
:func:`dopsd_ref.preflight.x0_distances` measures how far the teacher's and the student's
clean-latent predictions ``x̂0 = x − σ·v`` are from the target's latent

* Z-Image: ``y = (mode(VAE(image)) − shift_factor)·scaling_factor`` (the pipeline's latent space);
* FLUX.2: ``y`` = the 2x2-patchified, batch-norm-normalised, packed latent tokens of the image
  (:func:`paper_repro.adapters.flux2_encode_reference`, the state space of the roll-out).

The distances of all batches are pooled per roll-out step and judged by
:func:`dopsd_ref.preflight.preflight_verdict` (paired Student-t interval with a margin; FLUX.2's
grid depends on the bucket, so steps are matched by index). The script prints the verdict with
its numbers, writes ``output_dir/preflight.json`` and a PNG grid ``output_dir/preflight.png``
(per pair: the target, the teacher's own K-step sample, the student's sample from the same
noise), and prints a warning when the teacher is not better. Models, contexts and grids are those of
:class:`paper_repro.train.DOPSDTrainer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dopsd_ref.preflight import PreflightReport, preflight_verdict, x0_distances
from dopsd_ref.sampling import euler_sample

from .adapters import flux2_encode_reference, flux2_packed_to_pipeline_latents
from .data import pil_to_tensor
from .grids import training_grid

__all__ = ["NOT_BETTER", "ReproPreflight", "encode_targets", "decode_states", "repro_preflight",
           "run_preflight", "main"]


NOT_BETTER = ("teacher pre-flight: the teacher is not closer to the targets than the student on the student's own "
              "roll-outs; D-OPSD can only teach what the teacher carries (numbers above)")


@dataclass(frozen=True)
class ReproPreflight:
    """Pooled report over the training folder and the decoded samples of the first batch.

    Attributes:
        report: the x0-distance verdicts (per roll-out step index and overall).
        grids: one σ grid per batch measured (FLUX.2's depends on the bucket).
        images: ``(3·n, H, W, 3)`` uint8 rows of (target, teacher sample, student sample) for the
            first batch (None when nothing could be decoded).
    """

    report: PreflightReport
    grids: list[tuple[float, ...]]
    images: np.ndarray | None

    @property
    def better(self) -> bool:
        return self.report.better


def _vae_dtype(vae) -> torch.dtype:
    return next(vae.parameters()).dtype


@torch.no_grad()
def encode_targets(trainer, images: list, h: int, w: int) -> Tensor:
    """Target images (PIL, bucket size) → their clean latents in the roll-out's state space.

    Returns ``(B, C, H/8, W/8)`` (Z-Image) or ``(B, h·w, 4C)`` (FLUX.2), float32 on the device.
    """
    comps = trainer.comps
    if getattr(comps, "vae", None) is None:
        raise ValueError("the teacher pre-flight encodes the target images with the VAE, but this run loaded none "
                         "(data.cache set?): run the pre-flight without data.cache")
    pix = torch.stack([pil_to_tensor(im) for im in images]).to(trainer.device)
    if trainer.cfg.model.backbone == "zimage":
        vae = comps.vae
        z = vae.encode(pix.to(_vae_dtype(vae))).latent_dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()
    tokens, th, tw = flux2_encode_reference(comps.vae, pix)
    if (th, tw) != (h, w):
        raise ValueError(f"target latent grid {(th, tw)} differs from the roll-out's {(h, w)}")
    return tokens.float()


@torch.no_grad()
def decode_states(trainer, lat: Tensor, h: int, w: int) -> np.ndarray:
    """Clean states → ``(B, H, W, 3)`` uint8 images, decoded as the pipelines decode them."""
    vae = trainer.comps.vae
    if trainer.cfg.model.backbone == "zimage":
        lat = lat / vae.config.scaling_factor + vae.config.shift_factor
    else:
        lat = flux2_packed_to_pipeline_latents(lat, h, w, vae)
    img = vae.decode(lat.to(_vae_dtype(vae)), return_dict=False)[0]
    return ((img.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _batches(trainer, seeds: int, batch_size: int, max_pairs: int | None) -> list[list[int]]:
    """Same-bucket batches of dataset indices, each index repeated ``seeds`` times."""
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    n = len(trainer.dataset) if max_pairs is None else min(max_pairs, len(trainer.dataset))
    for i in range(n):
        by_bucket[trainer.dataset.samples[i].bucket] += [i] * seeds
    return [idx[j:j + batch_size] for _, idx in sorted(by_bucket.items()) for j in range(0, len(idx), batch_size)]


@torch.no_grad()
def repro_preflight(trainer, seeds: int = 2, batch_size: int = 4, margin: float = 0.05, confidence: float = 0.95,
                    max_pairs: int | None = None, seed: int = 0, render: bool = True) -> ReproPreflight:
    """Measure the untrained teacher against the untrained student on the training folder.

    Args:
        trainer: a freshly built :class:`paper_repro.train.DOPSDTrainer` (nothing trained yet).
        seeds: noises per image–caption pair.
        batch_size: states per model call (pairs of one bucket are batched together).
        margin, confidence: the rule of :func:`dopsd_ref.preflight.preflight_verdict`.
        max_pairs: measure only the first pairs of the folder (None: all).
        seed: noise seed.
        render: decode the first batch's target / teacher / student images.

    Raises:
        ValueError: fewer than 2 paired samples in all, or bad margin/confidence.
    """
    from .train import _seed_for

    t, m = trainer.cfg.train, trainer.cfg.model
    if seeds < 1 or batch_size < 1:
        raise ValueError(f"seeds and batch_size must be >= 1, got {seeds}, {batch_size}")
    d_s, d_t, grids = [], [], []
    images = None
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        for b, idx in enumerate(_batches(trainer, seeds, batch_size, max_pairs)):
            loaded = [trainer.dataset.load(i) for i in idx]
            pil, prompts = [x[0] for x in loaded], [x[1] for x in loaded]
            shape, h, w = trainer._latent_shape(len(idx), trainer.dataset.samples[idx[0]].bucket)
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(_seed_for(seed, b, 7))).to(trainer.device)
            sigmas = training_grid(m.backbone, t.num_rollout_steps, h * w if m.backbone == "flux2" else None,
                                   t.sigmas).to(torch.float32)
            student, teacher = trainer.velocity_fns(prompts, pil, h, w)
            target = encode_targets(trainer, pil, h, w)
            with trainer.acc.autocast():
                ds, dt, states = x0_distances(student, teacher, noise, sigmas, target)
                if render and b == 0:
                    teacher_final = euler_sample(teacher, noise, sigmas)
            d_s.append(ds)
            d_t.append(dt)
            grids.append(tuple(float(v) for v in sigmas))
            if render and b == 0:
                with trainer.acc.autocast():
                    tgt = np.stack([np.asarray(im) for im in pil])
                    images = np.concatenate([tgt, decode_states(trainer, teacher_final, h, w),
                                             decode_states(trainer, states[-1], h, w)])
    finally:
        trainer.model.train(was_training)
    if not d_s:
        raise ValueError("the training folder has no image-caption pairs to measure")
    report = preflight_verdict(torch.cat(d_s, 1), torch.cat(d_t, 1), grids[0], margin=margin, confidence=confidence)
    return ReproPreflight(report, grids, images)


def _save_grid(images: np.ndarray, path: Path) -> None:
    """Rows target / teacher / student, one column per measured sample of the first batch."""
    from PIL import Image

    n = images.shape[0] // 3
    rows = [np.concatenate(list(images[r * n:(r + 1) * n]), axis=1) for r in range(3)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def run_preflight(trainer, seeds: int = 2, batch_size: int = 4, margin: float = 0.05, confidence: float = 0.95,
                  max_pairs: int | None = None) -> ReproPreflight:
    """Measure; on the main process print the verdict, write ``preflight.json``/``.png`` and print a
    warning line to stderr when the teacher is not better.

    Every process computes the same numbers (the model calls are collective under DDP/FSDP).
    """
    res = repro_preflight(trainer, seeds, batch_size, margin, confidence, max_pairs)
    acc = trainer.acc
    if acc.is_main_process:
        out = Path(trainer.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if res.images is not None:
            _save_grid(res.images, out / "preflight.png")
        (out / "preflight.json").write_text(json.dumps({**res.report.to_dict(), "grids": res.grids}, indent=2))
        m = trainer.cfg.model
        teacher = "hybrid VLM" if m.backbone == "zimage" or m.flux2_teacher == "vlm" else "editing branch"
        acc.print(f"teacher pre-flight: {m.backbone}, {teacher} teacher, {len(trainer.dataset)} pairs, "
                  f"grid of the first batch {[round(s, 4) for s in res.grids[0]]}")
        acc.print(res.report.summary())
        acc.print(f"written: {out / 'preflight.json'}" + (f", {out / 'preflight.png'} (rows: target, teacher sample, "
                                                          "student sample)" if res.images is not None else ""))
    if not res.better and acc.is_main_process:
        print(f"warning: {NOT_BETTER}", file=sys.stderr)
    return res


def add_preflight_flags(ap: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--{prefix}seeds``, ``--{prefix}batch-size``, ``--{prefix}margin``, ``--{prefix}confidence``, ``--{prefix}max-pairs``."""
    ap.add_argument(f"--{prefix}seeds", type=int, default=2, help="noises per image-caption pair (default 2)")
    ap.add_argument(f"--{prefix}batch-size", type=int, default=4, help="states per model call (default 4)")
    ap.add_argument(f"--{prefix}margin", type=float, default=0.05, help="required relative distance reduction")
    ap.add_argument(f"--{prefix}confidence", type=float, default=0.95, help="interval level")
    ap.add_argument(f"--{prefix}max-pairs", type=int, default=None, help="measure only the first N pairs")


def preflight_from_args(trainer, args: argparse.Namespace, prefix: str = "") -> ReproPreflight:
    p = prefix.replace("-", "_")
    return run_preflight(trainer, getattr(args, f"{p}seeds"), getattr(args, f"{p}batch_size"),
                         getattr(args, f"{p}margin"), getattr(args, f"{p}confidence"), getattr(args, f"{p}max_pairs"))


def main(argv: list[str] | None = None) -> ReproPreflight:
    """CLI: ``python -m paper_repro.preflight --config CFG [--set a.b=v ...]``; exit status 3 with ``--strict``."""
    from .config import load_config
    from .train import DOPSDTrainer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="YAML/JSON run config (see paper_repro/configs)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    ap.add_argument("--strict", action="store_true", help="exit with status 3 when the teacher is not better")
    add_preflight_flags(ap)
    args = ap.parse_args(argv)
    trainer = DOPSDTrainer(load_config(args.config, args.set))
    res = preflight_from_args(trainer, args)
    if args.strict and not res.better:
        raise SystemExit(3)
    return res


if __name__ == "__main__":
    main()
