"""Multi-seed generation at native settings and the paper's metrics with established libraries.

Generation (the real pipelines, guidance 0, the native few-step samplers)::

    python -m paper_repro.evaluate generate --backbone zimage --pretrained Tongyi-MAI/Z-Image-Turbo \
        --lora runs/zimage_turbo_dopsd_lora/lora --prompts prompts.txt --seeds 30 31 32 33 \
        --steps 8 --out eval/dopsd

Metrics (each names the weights it needs and fails with a clear message when they are absent;
nothing is downloaded unless ``--allow-download`` is given)::

    python -m paper_repro.evaluate clip  --images eval/dopsd --references data/concept   # CLIP-T, CLIP-I
    python -m paper_repro.evaluate dino  --images eval/dopsd --pairs-from eval/base      # DINO-D
    python -m paper_repro.evaluate lpips --images eval/dopsd --pairs-from eval/base      # LPIPS-D
    python -m paper_repro.evaluate fid   --images eval/dopsd --references data/anime_test
    python -m paper_repro.evaluate compare eval/dopsd/clip.json eval/base/clip.json       # paired diffs

Definitions (method notes §10): CLIP-T = cos(CLIP image, CLIP text) (the paper's CLIP-S with
OpenCLIP ViT-H-14); CLIP-I = cos(CLIP image, CLIP reference image) averaged over references;
DINO-D = 1 − cos of mean-pooled DINOv3 ViT-S/16 patch features between paired generations
(source vs rewrite prompt, same seed); LPIPS-D = LPIPS(AlexNet) between the same pairs; FID
on Inception-v3 pool features. A single-seed difference of ~1e-3 is noise: compare runs with
``compare``, which reports paired per-(prompt, seed) differences with a standard error.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MissingWeightsError",
    "CLIP_DEFAULT",
    "DINO_DEFAULT",
    "clip_scores",
    "dino_distance",
    "frechet_distance",
    "paired_difference",
    "load_clip",
    "load_dino",
    "load_lpips",
    "load_fid",
    "generate",
    "main",
]

CLIP_DEFAULT = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # OpenCLIP ViT-H-14 in transformers format
DINO_DEFAULT = "facebook/dinov3-vits16-pretrain-lvd1689m"  # DINOv3 ViT-S/16
LPIPS_WEIGHTS = "torchvision AlexNet (alexnet-owt-7be5be79.pth in $TORCH_HOME/hub/checkpoints) + lpips' linear heads"
FID_WEIGHTS = "torch-fidelity Inception-v3 (weights-inception-2015-12-05-6726825d.pth in $TORCH_HOME/hub/checkpoints)"


class MissingWeightsError(RuntimeError):
    """A metric's weights or library are not available locally (the message says which)."""


def _missing(metric: str, what: str, how: str, cause: Exception | None = None) -> MissingWeightsError:
    return MissingWeightsError(f"{metric} needs {what}, which is not available locally. {how}"
                               + (f" (cause: {type(cause).__name__}: {cause})" if cause else ""))


# -----------------------------------------------------------------------------
# Pure metric math (tested with tiny models / synthetic features)
# -----------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_scores(image_emb: Tensor, text_emb: Tensor | None = None, ref_emb: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image CLIP-T = cos(image_i, text_i) and CLIP-I = mean_j cos(image_i, reference_j).

    Args:
        image_emb: ``(N, D)`` projected CLIP image embeddings.
        text_emb: ``(N, D)`` projected text embeddings of each image's prompt.
        ref_emb: ``(M, D)`` reference-image embeddings (the concept's training images).
    """
    out: dict[str, Tensor] = {}
    im = _unit(image_emb.float())
    if text_emb is not None:
        out["clip_t"] = (im * _unit(text_emb.float())).sum(-1)
    if ref_emb is not None:
        out["clip_i"] = (im @ _unit(ref_emb.float()).T).mean(-1)
    return out


def dino_distance(feats_a: Tensor, feats_b: Tensor) -> Tensor:
    """DINO-D per pair: ``1 − cos(mean_tokens(a), mean_tokens(b))`` for ``(N, T, D)`` patch features."""
    a, b = feats_a.float().mean(1), feats_b.float().mean(1)
    return 1.0 - (_unit(a) * _unit(b)).sum(-1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``||μ1 − μ2||² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})``; the trace of the root via eigenvalues.

    ``Σ1 Σ2`` is similar to the PSD matrix ``Σ1^{1/2} Σ2 Σ1^{1/2}``, so its eigenvalues are real
    and ≥ 0 up to round-off; ``tr((Σ1 Σ2)^{1/2}) = Σ sqrt(λ_i)``.
    """
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1.astype(np.float64) @ sigma2.astype(np.float64))
    tr_sqrt = float(np.sqrt(np.clip(eig.real, 0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt)


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Mean paired difference ``a − b`` over shared keys (prompt, seed), with its standard error."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise ValueError("no shared (prompt, seed) keys between the two result files")
    d = np.array([a[k] - b[k] for k in keys], dtype=np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"n": len(d), "mean_diff": float(d.mean()), "std_err": se}


# -----------------------------------------------------------------------------
# Loading the metric networks (never silently downloading)
# -----------------------------------------------------------------------------


def _is_local(name: str) -> bool:
    """True if ``name`` is a folder or a repo id with a cached snapshot (config.json present)."""
    if Path(name).is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply "not local"
        return False


def _hf_load(cls, name: str, allow_download: bool, metric: str):
    how = (f"Fetch them on a machine with network (`huggingface-cli download {name}`), pass a local "
           "path, or rerun with --allow-download.")
    if not allow_download and not _is_local(name):
        # Checked up front: some from_pretrained paths still probe the hub with local_files_only.
        raise _missing(metric, f"the weights '{name}'", how)
    try:
        if allow_download:
            return cls.from_pretrained(name)
        import huggingface_hub.constants as hub_constants

        old = hub_constants.HF_HUB_OFFLINE
        hub_constants.HF_HUB_OFFLINE = True
        try:
            return cls.from_pretrained(name, local_files_only=True)
        finally:
            hub_constants.HF_HUB_OFFLINE = old
    except (OSError, ValueError) as exc:
        raise _missing(metric, f"the weights '{name}'", how, exc) from exc


@dataclass
class ClipModel:
    """A transformers CLIP model + processor computing projected image/text embeddings."""

    model: object
    processor: object

    @torch.no_grad()
    def images(self, images: Sequence) -> Tensor:
        inp = self.processor(images=list(images), return_tensors="pt")
        out = self.model.get_image_features(pixel_values=inp["pixel_values"].to(self.model.device))
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> Tensor:
        inp = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(**{k: v.to(self.model.device) for k, v in inp.items()})
        return out if isinstance(out, Tensor) else out.pooler_output


def load_clip(name: str = CLIP_DEFAULT, allow_download: bool = False) -> ClipModel:
    """CLIP for CLIP-T / CLIP-I (default: OpenCLIP ViT-H-14, laion2B)."""
    from transformers import CLIPModel, CLIPProcessor

    return ClipModel(_hf_load(CLIPModel, name, allow_download, "CLIP-T/CLIP-I").eval(),
                     _hf_load(CLIPProcessor, name, allow_download, "CLIP-T/CLIP-I"))


@dataclass
class DinoModel:
    """A transformers DINO backbone returning patch tokens ``(N, T, D)``."""

    model: object
    processor: object

    @torch.no_grad()
    def tokens(self, images: Sequence) -> Tensor:
        inp = self.processor(images=list(images), return_tensors="pt")
        return self.model(pixel_values=inp["pixel_values"].to(self.model.device)).last_hidden_state


def load_dino(name: str = DINO_DEFAULT, allow_download: bool = False) -> DinoModel:
    """DINOv3 ViT-S/16 for DINO-D."""
    from transformers import AutoImageProcessor, AutoModel

    return DinoModel(_hf_load(AutoModel, name, allow_download, "DINO-D").eval(),
                     _hf_load(AutoImageProcessor, name, allow_download, "DINO-D"))


def _torch_hub_file(fname: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / fname


def load_lpips(allow_download: bool = False):
    """LPIPS(AlexNet) from the ``lpips`` package (needs torchvision's AlexNet weights)."""
    try:
        import lpips  # noqa: F401
    except ImportError as exc:
        raise _missing("LPIPS-D", "the `lpips` package and " + LPIPS_WEIGHTS,
                       "pip install lpips (it needs torchvision built for your torch).", exc) from exc
    if not allow_download and not _torch_hub_file("alexnet-owt-7be5be79.pth").exists():
        raise _missing("LPIPS-D", LPIPS_WEIGHTS, f"Place the file at {_torch_hub_file('alexnet-owt-7be5be79.pth')} "
                       "or rerun with --allow-download.")
    import lpips

    return lpips.LPIPS(net="alex", verbose=False).eval()


def load_fid(allow_download: bool = False):
    """``torchmetrics`` FID (Inception-v3 pool features via torch-fidelity)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        import torch_fidelity  # noqa: F401
    except ImportError as exc:
        raise _missing("FID", "`torchmetrics` with `torch-fidelity` and " + FID_WEIGHTS,
                       "pip install torchmetrics torch-fidelity.", exc) from exc
    f = _torch_hub_file("weights-inception-2015-12-05-6726825d.pth")
    if not allow_download and not f.exists():
        raise _missing("FID", FID_WEIGHTS, f"Place the file at {f} or rerun with --allow-download.")
    return FrechetInceptionDistance(feature=2048, normalize=True)


# -----------------------------------------------------------------------------
# Generation
# -----------------------------------------------------------------------------


def _native(backbone: str, steps: int | None) -> int:
    return steps or (8 if backbone == "zimage" else 4)


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], out: Path, backbone: str, steps: int | None = None,
             height: int = 1024, width: int = 1024) -> list[dict]:
    """Generate every (prompt, seed) with the pipeline's native sampler, guidance 0.

    Writes ``out/p{i:03d}_s{seed}.png`` and ``out/index.json`` ([{file, prompt, prompt_idx, seed}]).
    """
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(int(seed))
            img = pipe(prompt=prompt, num_inference_steps=_native(backbone, steps), guidance_scale=0.0,
                       height=height, width=width, generator=g).images[0]
            name = f"p{i:03d}_s{seed}.png"
            img.save(out / name)
            index.append({"file": name, "prompt": prompt, "prompt_idx": i, "seed": int(seed)})
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


def _load_index(folder: Path) -> list[dict]:
    p = folder / "index.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} missing: generate the folder with `paper_repro.evaluate generate`")
    return json.loads(p.read_text())


def _images(folder: Path, names: Sequence[str]):
    from PIL import Image

    return [Image.open(folder / n).convert("RGB") for n in names]


def _refs(folder: Path):
    from PIL import Image

    from .data import IMAGE_EXTS

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"no reference images in {folder}")
    return [Image.open(p).convert("RGB") for p in files]


def _key(e: dict) -> str:
    return f"p{e['prompt_idx']:03d}_s{e['seed']}"


def _write(folder: Path, name: str, per_item: dict[str, dict[str, float]]) -> dict:
    metrics = sorted({m for v in per_item.values() for m in v})
    summary = {m: float(np.mean([v[m] for v in per_item.values() if m in v])) for m in metrics}
    res = {"summary": summary, "per_item": per_item}
    (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(summary))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="D-OPSD evaluation: generation and metrics")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--backbone", choices=["zimage", "flux2"], required=True)
    g.add_argument("--pretrained", required=True, help="pipeline id or folder")
    g.add_argument("--lora", default=None, help="folder written by paper_repro.train (output_dir/lora)")
    g.add_argument("--prompts", required=True, help="text file, one prompt per line")
    g.add_argument("--seeds", type=int, nargs="+", default=[30, 31, 32, 33])
    g.add_argument("--steps", type=int, default=None, help="default: 8 (Z-Image-Turbo), 4 (klein)")
    g.add_argument("--height", type=int, default=1024)
    g.add_argument("--width", type=int, default=1024)
    g.add_argument("--out", required=True)
    for name in ("clip", "dino", "lpips", "fid"):
        p = sub.add_parser(name)
        p.add_argument("--images", required=True, help="generated folder (with index.json)")
        p.add_argument("--references", default=None, help="reference images (CLIP-I, FID)")
        p.add_argument("--pairs-from", default=None, help="paired folder, same (prompt_idx, seed) keys (DINO/LPIPS)")
        p.add_argument("--model", default=None, help="weights id/path (CLIP, DINO)")
        p.add_argument("--allow-download", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)

    if args.cmd == "generate":
        from diffusers import Flux2KleinPipeline, ZImagePipeline

        cls = ZImagePipeline if args.backbone == "zimage" else Flux2KleinPipeline
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = cls.from_pretrained(args.pretrained, torch_dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        if args.lora:
            pipe.load_lora_weights(args.lora)
        pipe.to(dev)
        prompts = [l.strip() for l in Path(args.prompts).read_text().splitlines() if l.strip()]
        generate(pipe, prompts, args.seeds, Path(args.out), args.backbone, args.steps, args.height, args.width)
        return
    if args.cmd == "compare":
        a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
        res = {}
        for m in sorted(a["summary"]):
            res[m] = paired_difference({k: v[m] for k, v in a["per_item"].items() if m in v},
                                       {k: v[m] for k, v in b["per_item"].items() if m in v})
        print(json.dumps(res, indent=1))
        return

    folder = Path(args.images)
    index = _load_index(folder)
    imgs = _images(folder, [e["file"] for e in index])
    per: dict[str, dict[str, float]] = {_key(e): {} for e in index}
    if args.cmd == "clip":
        clip = load_clip(args.model or CLIP_DEFAULT, args.allow_download)
        ref = clip.images(_refs(Path(args.references))) if args.references else None
        s = clip_scores(clip.images(imgs), clip.texts([e["prompt"] for e in index]), ref)
        for j, e in enumerate(index):
            per[_key(e)] = {k: float(v[j]) for k, v in s.items()}
        _write(folder, "clip", per)
    elif args.cmd in ("dino", "lpips"):
        if not args.pairs_from:
            raise SystemExit(f"{args.cmd} needs --pairs-from (the paired generation folder)")
        other = Path(args.pairs_from)
        oidx = {_key(e): e for e in _load_index(other)}
        pairs = [(j, oidx[_key(e)]) for j, e in enumerate(index) if _key(e) in oidx]
        if not pairs:
            raise SystemExit("no (prompt_idx, seed) pairs in common")
        b_imgs = _images(other, [o["file"] for _, o in pairs])
        a_imgs = [imgs[j] for j, _ in pairs]
        if args.cmd == "dino":
            dino = load_dino(args.model or DINO_DEFAULT, args.allow_download)
            d = dino_distance(dino.tokens(a_imgs), dino.tokens(b_imgs))
            vals = {"dino_d": d}
        else:
            from .data import pil_to_tensor

            net = load_lpips(args.allow_download)
            ta = torch.stack([pil_to_tensor(i) for i in a_imgs])
            tb = torch.stack([pil_to_tensor(i.resize(a.size)) for i, a in zip(b_imgs, a_imgs)])
            with torch.no_grad():
                vals = {"lpips_d": net(ta, tb).flatten()}
        for n, (j, _) in enumerate(pairs):
            per[_key(index[j])] = {k: float(v[n]) for k, v in vals.items()}
        _write(folder, args.cmd, {k: v for k, v in per.items() if v})
    elif args.cmd == "fid":
        if not args.references:
            raise SystemExit("fid needs --references (a folder of real images)")
        fid = load_fid(args.allow_download)
        from .data import pil_to_tensor

        for batch, real in ((_refs(Path(args.references)), True), (imgs, False)):
            fid.update((torch.stack([pil_to_tensor(i.resize((299, 299))) for i in batch]) + 1) / 2, real=real)
        value = float(fid.compute())
        (folder / "fid.json").write_text(json.dumps({"summary": {"fid": value}}))
        print(json.dumps({"fid": value}))


if __name__ == "__main__":
    main()
