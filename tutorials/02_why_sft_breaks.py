# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · Why plain fine-tuning breaks a step-distilled model
#
# We want to teach the 4-step toy model a **new concept**: the "L" glyph, which it has never
# drawn, named by the rare token `sks` ("large red sks on black"). We have 12 target images
# with captions — a DreamBooth-style task.
#
# The obvious recipe is **supervised fine-tuning (SFT)**: keep training with the
# flow-matching loss on the targets,
#
# $$\mathcal{L}_\text{SFT} = \mathbb{E}_{\sigma,\varepsilon}\,\big\|v_\theta(x_\sigma, \sigma, c) - (\varepsilon - x^\star)\big\|^2,
#   \qquad x_\sigma = (1-\sigma)\,x^\star + \sigma\,\varepsilon .$$
#
# This tutorial runs it and looks at the result at 4 steps (how the model is used) and at 32
# steps, then at the reason: **the states SFT trains on are not the states the 4-step
# sampler visits.**
#
# SFT here trains a small adapter (a LoRA that acts only at the position of the `sks` token,
# see `toy_models/finetune/adapters.py`) — the same adapter D-OPSD trains in tutorial 4 — so
# prompts without `sks` are untouched by construction.
#
# **Fast mode.** `DOPSD_TUTORIAL_FAST=1` trains fewer steps and evaluates fewer seeds (≤ 2 min
# on 2 CPU cores); the concept may not be learned yet in fast mode. Full mode reproduces the
# figures. Figures go to `outputs/tutorials/02_why_sft_breaks/` (or `$DOPSD_TUTORIAL_OUT`).

# %%
import _tutorial as T  # tutorials/_tutorial.py: fast mode, output folder, figure helpers

import matplotlib.pyplot as plt
import torch

import dopsd_ref
from toy_models.world import vocab as V
from toy_models.models.context import text_context
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.evaluate import make_eval_prompts, evaluate_student, sample_prompts
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import run_finetune

torch.manual_seed(0)
OUT = T.out_dir("02_why_sft_breaks")
T.banner("02_why_sft_breaks")
evaluator = T.load_toy(T.EVALUATOR)

# %% [markdown]
# ## 1. The targets, and what the turbo model does with `sks` before training

# %%
cfg = FinetuneConfig(method="sft", model=str(T.weights_path(T.TURBO)), data="concept:ell", device="cpu",
                     steps=T.pick(60, 150), ckpt_every=0, eval_every=0)
targets = load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
prompts = make_eval_prompts(targets)
turbo = T.load_toy(T.TURBO)
shown = prompts.train[:T.pick(6, 8)]
fig = T.image_rows([targets.images[:len(shown)], sample_prompts(turbo, shown, seed=0, steps=4)],
                   ["targets", "turbo, 4 steps"], [c.replace(" on ", "\non ") for c in shown], size=1.25)
T.save(fig, OUT / "targets_and_before.png")

# %% [markdown]
# The model draws *something* for `sks` (a token it never saw with meaning), but not the L.
#
# ## 2. SFT
#
# `toy_models.finetune.train.run_finetune` with `method="sft"`: AdamW on the adapter,
# flow-matching loss on noised targets (`dopsd_ref.flow_matching_loss`), noise levels drawn
# half uniform, half logit-normal.

# %%
sft = run_finetune(cfg, targets=targets, model=T.load_toy(T.TURBO), progress=False, write=False)
student = sft.roles.module.eval()
print(f"SFT: {cfg.steps} steps in {sft.seconds:.0f} s; loss {sft.log[0]['loss']:.3f} → {sft.log[-1]['loss']:.3f}")

# %% [markdown]
# ## 3. The SFT model at 4 and at 32 steps
#
# Training prompts (the targets' captions) and unseen prompts (the concept with colour ×
# background combinations absent from the targets).

# %%
unseen = prompts.unseen[:len(shown)]
rows = [sample_prompts(turbo, shown, 0, 4), sample_prompts(student, shown, 0, 4), sample_prompts(student, shown, 0, 32)]
fig = T.image_rows([targets.images[:len(shown)]] + rows, ["targets", "turbo, 4 steps", "SFT, 4 steps", "SFT, 32 steps"],
                   [c.replace(" on ", "\non ") for c in shown], title="training prompts", size=1.25)
T.save(fig, OUT / "sft_samples_train_prompts.png")
rows = [sample_prompts(student, unseen, 0, 4), sample_prompts(student, unseen, 0, 32)]
fig = T.image_rows(rows, ["SFT, 4 steps", "SFT, 32 steps"], [c.replace(" on ", "\non ") for c in unseen],
                   title="unseen prompts", size=1.25)
T.save(fig, OUT / "sft_samples_unseen_prompts.png")

# %% [markdown]
# In numbers (`toy_models.finetune.evaluate.evaluate_student`, mean over noise seeds):
# **concept accuracy** = share of samples the evaluator reads as the L; **palette distance**
# = how far the concept samples' colours are from clean toy renders (blur and leftover noise
# raise it).

# %%
seeds = range(T.pick(1, 3))
metrics = {}
for name, model, steps in [("turbo, 4 steps", turbo, 4), ("SFT, 4 steps", student, 4), ("SFT, 32 steps", student, 32)]:
    metrics[name] = evaluate_student(model, prompts, evaluator, seeds, steps)
    m = metrics[name]
    print(f"{name:>15}: concept acc (train prompts) {m['concept_acc']:.2f}   (unseen) {m['unseen_acc']:.2f}   "
          f"palette distance (concept) {m['concept_palette']:.3f}")
worse = metrics["SFT, 4 steps"]["concept_palette"] > metrics["SFT, 32 steps"]["concept_palette"]
print(f"SFT samples are {'less' if worse else 'not less'} clean at 4 steps than at 32 steps "
      f"(palette distance {metrics['SFT, 4 steps']['concept_palette']:.3f} vs {metrics['SFT, 32 steps']['concept_palette']:.3f})")

# %% [markdown]
# ## 4. Why: off-policy states
#
# SFT asks the model for a velocity at $x_\sigma = (1-\sigma)x^\star + \sigma\varepsilon$ — a
# *target* image under Gaussian noise. But at inference the 4-step sampler feeds the model
# its *own* states:
#
# $$x_{\sigma_1} = \varepsilon,\qquad x_{\sigma_{k+1}} = x_{\sigma_k} + (\sigma_{k+1}-\sigma_k)\,v_\theta(x_{\sigma_k}, \sigma_k, c).$$
#
# Those are not noised targets: they carry the model's own (partly wrong) drawing, and they
# were shaped by distillation to be whatever makes four large steps work. SFT never shows
# the model these states, so nothing in its loss keeps four large steps working on them.
# Below, for the same caption and the same starting noise, the states at the 4-step grid:
# the SFT training state (a noised target) and the sampler's state.

# %%
sigmas = dopsd_ref.uniform_sigmas(4)
n = T.pick(32, 96)
idx = torch.arange(n) % len(targets)
noise = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))
ctx = text_context([targets.captions[i] for i in idx.tolist()])
visited = dopsd_ref.euler_sample(lambda x, s: student(x, s, ctx), noise, sigmas, return_states=True)  # [K+1, n, ...]
trained_on = torch.stack([dopsd_ref.noise_state(targets.images[idx], noise, float(s)) for s in sigmas])  # [K, n, ...]
def content(states, noise, sigmas):
    """The image part of a state once its starting noise is removed: (x_σ − σ·ε) / (1 − σ)."""
    return torch.stack([(x - float(s) * noise) / (1 - float(s)) for x, s in zip(states, sigmas)])


i = 0
labels = [f"σ = {float(s):.2f}" for s in sigmas[1:]]
fig = T.image_rows(
    [trained_on[1:, i], visited[1:-1, i], content(trained_on[1:], noise, sigmas[1:])[:, i],
     content(visited[1:-1], noise, sigmas[1:])[:, i]],
    ["SFT trains on\n(noised target)", "4-step sampler\nvisits", "  its image part:\nSFT", "  its image part:\nsampler"],
    labels, title=f"same noise, same caption: “{targets.captions[i]}”", size=1.4)
T.save(fig, OUT / "offpolicy_states.png")

# %% [markdown]
# At σ = 1 both are the same noise. Below 1 they part. Removing the shared starting noise
# (bottom rows, $(x_\sigma - \sigma\varepsilon)/(1-\sigma)$) shows what each state is made
# of: an SFT state always contains the exact target; the sampler's state contains what the
# model drew so far. Over many captions and noises, the distance between the two kinds of
# state at each σ of the grid (root-mean-square per pixel; the images live in [−1, 1]):

# %%
for k in range(1, len(sigmas)):
    d = (trained_on[k] - visited[k]).pow(2).flatten(1).mean(1).sqrt()
    print(f"σ = {float(sigmas[k]):.2f}: RMS distance SFT state ↔ sampler state = {d.mean():.3f} ± {d.std():.3f}")

# %% [markdown]
# Every one of those sampler states is a query the model answers at inference and that SFT
# never trained on.

# %% [markdown]
# **What to take away.** SFT trains on noised targets — states the few-step sampler does
# not visit. The few-step ability lives in how the model treats its *own*
# states; SFT neither trains nor protects it, and with many steps (small moves, closer to
# the noising path) the same model can look better than at its native 4 steps (compare the
# printed palette distances). D-OPSD trains exactly on the sampler's states; for that it
# needs someone who knows the target and can grade any state: tutorial 3.
