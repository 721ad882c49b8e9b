"""Memory/time plan for the real models, from measured tiny-model scaling and real sizes.

Two measurements, both on the tiny real-architecture Z-Image transformer on CPU:

1. **Saved-activation peak of one D-OPSD roll-out** for K = 1..8 with per-step backward vs one
   backward over all K graphs (``saved_tensors_hooks`` count the bytes autograd keeps alive;
   parameters are excluded). Per-step is flat in K, single grows ∝ K.
2. **Bytes saved per forward, per block, per token, per model-width unit** with and without
   gradient checkpointing — an architecture constant that carries over to the real model
   (same block structure; FFN width 8/3·dim in both).

The plan multiplies (2) by the real model's tokens, width and depth, adds frozen weights (bf16)
and the LoRA/AdamW state (fp32), and prints a markdown table. Parameter counts come from the
real transformer configs instantiated on the meta device (no weights). These are estimates; measured
peak memory comes from a GPU (``tests/repro/test_gpu.py`` on a medium transformer, and
``python -m paper_repro.dryrun`` at full size; see paper_repro/README.md for what ran where).

Run: ``python -m paper_repro.memory_plan``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SavedBytesMeter", "rollout_saved_peak", "bytes_per_block_token_dim", "real_param_counts", "plan", "main"]


class _Handle:
    """What autograd keeps instead of a saved activation; its death releases the bytes."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class SavedBytesMeter:
    """Peak bytes of tensors autograd saves for backward (parameters excluded, storages deduped)."""

    def __init__(self, exclude: list[Tensor]):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.live: dict[int, list] = {}  # storage ptr -> [refcount, nbytes]
        self.current = 0
        self.peak = 0

    def _pack(self, t: Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.exclude or t.device.type == "meta":
            return t
        meter = self
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [0, t.untyped_storage().nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1

        h = _Handle(t)

        def release(ptr=ptr):
            e = meter.live.get(ptr)
            if e is None:
                return
            e[0] -= 1
            if e[0] == 0:
                meter.current -= e[1]
                del meter.live[ptr]

        weakref.finalize(h, release)
        return h

    @staticmethod
    def _unpack(h):
        return h.tensor if isinstance(h, _Handle) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


def _tiny_zimage(checkpointing: bool):
    from dopsd_ref.lora import add_student_teacher_lora

    from .lora import LoraSpec, make_lora_config
    from .tiny import tiny_zimage_transformer

    tr = tiny_zimage_transformer()
    add_student_teacher_lora(tr, make_lora_config("zimage", LoraSpec(rank=4, alpha=8)))
    if checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    return tr


def rollout_saved_peak(num_steps: int, per_step: bool, latent: int = 8, checkpointing: bool = False) -> int:
    """Peak saved-activation bytes of one tiny Z-Image D-OPSD roll-out (LoRA student/teacher)."""
    from dopsd_ref import dopsd_rollout_loss
    from dopsd_ref.lora import TEACHER, use_adapter
    from dopsd_ref.schedules import uniform_sigmas

    from .adapters import ZImageVelocity

    tr = _tiny_zimage(checkpointing)
    caps = [torch.randn(16, 32, generator=torch.Generator().manual_seed(0))]
    student = ZImageVelocity(tr, caps)

    def teacher(x, s):
        with use_adapter(tr, TEACHER):
            return ZImageVelocity(tr, caps)(x, s)

    noise = torch.randn(1, 16, latent, latent, generator=torch.Generator().manual_seed(1))
    meter = SavedBytesMeter(list(tr.parameters()))
    with meter.hooks():
        out = dopsd_rollout_loss(student, teacher, noise, uniform_sigmas(num_steps).float(), per_step_backward=per_step)
        if not per_step:
            out.loss.backward()
    return meter.peak


def bytes_per_block_token_dim(checkpointing: bool, latent: int = 16) -> float:
    """Saved bytes of one student forward / (blocks · tokens · dim), tiny Z-Image, float32."""
    tr = _tiny_zimage(checkpointing)
    from .adapters import ZImageVelocity

    n_cap = 32
    caps = [torch.randn(n_cap, 32)]
    x = torch.randn(1, 16, latent, latent)
    meter = SavedBytesMeter(list(tr.parameters()))
    with meter.hooks():
        v = ZImageVelocity(tr, caps)(x, torch.ones(1) * 0.5)
    peak = meter.peak
    del v
    cfg = tr.config
    blocks = cfg.n_layers + 2 * cfg.n_refiner_layers
    tokens = (latent // 2) ** 2 + n_cap
    return peak / (blocks * tokens * cfg.dim * 4)  # in units of float32 elements


def real_param_counts() -> dict[str, int]:
    """Parameters of the real Z-Image transformer (its published config, ``configs/published``)
    and its rank-64 LoRA on the intended targets, counted on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    from .components import published_config
    from .lora import ZIMAGE_TARGETS, intended_modules

    with init_empty_weights():
        tr = ZImageTransformer2DModel.from_config(published_config("zimage_turbo_transformer"))
    total = sum(p.numel() for p in tr.parameters())
    mods = dict(tr.named_modules())
    lora = sum(64 * (mods[n].in_features + mods[n].out_features) for n in intended_modules(tr, ZIMAGE_TARGETS))
    return {"zimage_transformer": total, "zimage_lora_r64": lora, "dim": tr.config.dim,
            "blocks": tr.config.n_layers + 2 * tr.config.n_refiner_layers}


@dataclass(frozen=True)
class PlanRow:
    setting: str
    activations_gb: float
    total_gb: float


# Frozen encoders of a live Z-Image-Turbo run: Qwen3-4B text encoder, Qwen3-VL-4B teacher encoder, VAE.
ZIMAGE_ENCODER_PARAMS = 4.02e9 + 4.44e9 + 0.084e9


def plan(resolution: int = 1024, num_steps: int = 4, batch: int = 1, caption_tokens: int = 512,
         encoders: bool = True) -> list[PlanRow]:
    """Per-GPU memory estimate for Z-Image-Turbo LoRA D-OPSD (bf16 weights and activations).

    ``encoders=False``: a cached run (``paper_repro.cache``), whose GPU holds no encoder.
    """
    counts = real_param_counts()
    tokens = (resolution // 16) ** 2 + caption_tokens
    frozen_gb = (counts["zimage_transformer"] + (ZIMAGE_ENCODER_PARAMS if encoders else 0)) * 2 / 1e9
    lora_gb = 2 * counts["zimage_lora_r64"] * 4 / 1e9 + counts["zimage_lora_r64"] * 12 / 1e9  # 2 adapters + grad + Adam
    rows = []
    for ckpt in (True, False):
        per_fwd = bytes_per_block_token_dim(ckpt) * counts["blocks"] * tokens * counts["dim"] * 2 * batch / 1e9
        for strat, mult in (("per_step", 1), ("single", num_steps)):
            act = per_fwd * mult
            rows.append(PlanRow(f"{'live' if encoders else 'cached'} encoders, ckpt={'on' if ckpt else 'off'}, "
                                f"{strat} backward, K={num_steps}, batch={batch}, {resolution}px",
                                act, frozen_gb + lora_gb + act))
    return rows


def main() -> None:
    print("Tiny Z-Image, saved-activation peak of one roll-out (bytes):")
    print("| K | per_step | single |\n|---|---|---|")
    for k in (1, 2, 4, 8):
        print(f"| {k} | {rollout_saved_peak(k, True)} | {rollout_saved_peak(k, False)} |")
    c = real_param_counts()
    print(f"\nReal Z-Image transformer: {c['zimage_transformer'] / 1e9:.2f} B params; rank-64 LoRA on "
          f"q/k/v/out/w1/w2/w3: {c['zimage_lora_r64'] / 1e6:.1f} M params per adapter")
    print(f"bytes per block*token*dim (float32 units): ckpt on {bytes_per_block_token_dim(True):.2f}, "
          f"off {bytes_per_block_token_dim(False):.2f}")
    print("\n| setting | activations (GB) | total per GPU (GB) |\n|---|---|---|")
    for enc in (True, False):
        for r in plan(encoders=enc):
            print(f"| {r.setting} | {r.activations_gb:.1f} | {r.total_gb:.1f} |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
