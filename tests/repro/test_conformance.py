"""The paper_repro adapters pass the dopsd_ref conformance kit.

The kit's golden velocity fields are put behind the *diffusers call signatures* (Z-Image: list of
``(C, 1, H, W)`` latents, model time, caption list, ``(list,)`` return; FLUX.2: packed tokens,
``timestep``, ids, ``(out,)`` return), then driven exactly as the training script drives the real
transformers: ``ZImageVelocity`` / ``Flux2Velocity`` inside ``dopsd_ref.dopsd_rollout_loss`` with
per-step backward. Every invariant (goldens, time/sign conventions, on-policy states, no
teacher gradient, no BPTT, ...) must PASS. The training script's LoRA EMA also passes the
kit's EMA checks.
"""

from __future__ import annotations

import torch
from torch import nn

from dopsd_ref import dopsd_rollout_loss
from dopsd_ref.conformance import run_conformance, run_ema_conformance
from paper_repro.adapters import Flux2Velocity, ZImageVelocity, flux2_pack, flux2_unpack


class _KitZImage(nn.Module):
    """Stands in for ZImageTransformer2DModel around the kit's model ``(x, t) -> −v``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_list, t, cap_feats, patch_size=2, f_patch_size=1, return_dict=False):
        assert all(xi.ndim == 4 and xi.shape[1] == 1 for xi in x_list) and len(cap_feats) == len(x_list)
        out = self.model(torch.stack([xi[:, 0] for xi in x_list]), t)
        return (list(out.unsqueeze(2).unbind(0)),)


class _KitFlux2(nn.Module):
    """Stands in for Flux2Transformer2DModel around the kit's model ``(x, timestep=σ) -> v``."""

    def __init__(self, model, h, w):
        super().__init__()
        self.model, self.h, self.w = model, h, w

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None,
                return_dict=False):
        assert img_ids.shape[1] == hidden_states.shape[1] == self.h * self.w
        x = flux2_unpack(hidden_states, self.h, self.w)
        return (flux2_pack(self.model(x, timestep)),)


def zimage_rollout(student, teacher, noise, sigmas, space):
    caps = [torch.zeros(3, 8, dtype=noise.dtype)] * noise.shape[0]
    out = dopsd_rollout_loss(ZImageVelocity(_KitZImage(student), caps), ZImageVelocity(_KitZImage(teacher), caps),
                             noise, sigmas.to(noise.dtype), space=space, per_step_backward=True)
    return out.loss, out.per_step, out.states


def flux2_rollout(student, teacher, noise, sigmas, space):
    b, c, h, w = noise.shape
    emb = torch.zeros(b, 3, 8, dtype=noise.dtype)
    s = Flux2Velocity(_KitFlux2(student, h, w), emb, h, w)
    t = Flux2Velocity(_KitFlux2(teacher, h, w), emb, h, w)
    out = dopsd_rollout_loss(s, t, flux2_pack(noise), sigmas.to(noise.dtype), space=space)
    states = torch.stack([flux2_unpack(x, h, w) for x in out.states])
    return out.loss, out.per_step, states


def test_zimage_adapter_conforms():
    run_conformance(zimage_rollout, convention="zimage").assert_passed()


def test_flux2_adapter_conforms():
    run_conformance(flux2_rollout, convention="flux2").assert_passed()


def test_training_script_lora_ema_conforms():
    """The trainer's EMA (``dopsd_ref.lora.lora_ema_update_``) seen through the kit's EMA adapter."""
    from dopsd_ref.lora import lora_ema_update_

    def ema(teacher, student, decay):
        model = nn.Module()
        model.student = nn.ParameterList(student)  # names "...student..." / "...teacher..." + "lora_"
        model.teacher = nn.ParameterList(teacher)
        renamed = nn.Module()
        renamed.lora_A = model
        lora_ema_update_(renamed, decay)

    run_ema_conformance(ema).assert_passed()
