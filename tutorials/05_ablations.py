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
# # 5 · Ablations: teacher, loss space, K, and memory
#
# Tutorial 4 fixed every choice. Here we vary them one at a time on the same task (the L
# glyph under `sks`, prompt-gated LoRA, teacher shown the target moved to the student's layout,
# 4-step toy model), using the library's
# training loop `toy_models.finetune.train.run_finetune` — the same loop as tutorial 4,
# configured by a `FinetuneConfig`:
#
# 1. **the teacher**: live copy of the student ($\bar\theta = \theta$), frozen initial model
#    ($d = 1$), EMA with a fast and a slow decay;
# 2. **the loss space**: velocity (the paper) vs x0 (the released code);
# 3. **K**, the roll-out length;
# 4. **memory**: backward after every roll-out step vs one backward at the end.
#
# **Fast mode.** `DOPSD_TUTORIAL_FAST=1` trains each variant for only a few steps with a
# smaller batch and one evaluation seed, and skips the subprocess memory measurement (≤ 2 min
# on 2 CPU cores): it shows the mechanics, not the outcomes. Full mode (150 steps per variant,
# 3 seeds) reproduces the figures and takes tens of minutes on a laptop CPU. Figures go to
# `outputs/tutorials/05_ablations/` (or `$DOPSD_TUTORIAL_OUT`).

# %%
import warnings

import _tutorial as T  # tutorials/_tutorial.py: fast mode, output folder, figure helpers

import matplotlib.pyplot as plt
import numpy as np
import torch

import dopsd_ref
from toy_models.finetune.config import FinetuneConfig
from toy_models.finetune.evaluate import make_eval_prompts, evaluate_student
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import run_finetune

torch.manual_seed(0)
OUT = T.out_dir("05_ablations")
T.banner("05_ablations")
evaluator = T.load_toy(T.EVALUATOR)
targets = load_targets("concept:ell", 12, 1234)
prompts = make_eval_prompts(targets)
SEEDS = range(T.pick(1, 3))
BASE_CFG = FinetuneConfig(method="dopsd", model=str(T.weights_path(T.TURBO)), device="cpu", ckpt_every=0,
                          steps=T.pick(6, 150), batch_size=T.pick(4, 8), eval_every=T.pick(6, 25))


def run(label, **changes):
    """Train one variant; returns its log (loss per step + metrics at the evaluation steps)."""
    cfg = BASE_CFG.replace(**changes)

    def evaluate(roles, step):
        return evaluate_student(roles.module, prompts, evaluator, SEEDS, steps=4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dopsd_ref.LiveTeacherWarning)  # "live" warns on purpose
        res = run_finetune(cfg, targets=targets, model=T.load_toy(T.TURBO), evaluate=evaluate,
                           progress=False, write=False)
    last = [r for r in res.log if "concept_acc" in r][-1]
    print(f"{label:>22}: {res.seconds:5.1f} s | concept acc {last['concept_acc']:.2f} (train) "
          f"{last['unseen_acc']:.2f} (unseen) | palette dist (concept) {last['concept_palette']:.3f}")
    return res.log


def plot_runs(logs, title, path):
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for label, log in logs.items():
        train = [r for r in log if "loss" in r]
        ev = [r for r in log if "concept_acc" in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], alpha=0.8, label=label)
        axes[1].plot([r["step"] for r in ev], [r["concept_acc"] for r in ev], "o-", label=label)
        axes[2].plot([r["step"] for r in ev], [r["concept_palette"] for r in ev], "o-", label=label)
    for ax, t in zip(axes, ["training loss", "concept accuracy (4 steps)", "palette distance of concept samples ↓"]):
        ax.set(title=t, xlabel="optimizer step")
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    T.save(fig, path)

# %% [markdown]
# ## 1. Which teacher?
#
# The teacher's weights follow the student by $\bar\theta \leftarrow d\,\bar\theta + (1-d)\,\theta$:
#
# | teacher | d | what the notes report for the real model |
# |---|---|---|
# | live | 0 | collapses: the student chases a target that moves with it |
# | frozen | 1 | stable but slow: supervision never improves |
# | EMA, fast | 0.9 | learns fast, quality fluctuates |
# | EMA, slow | 0.999 here (0.9999 at scale) | the default |
#
# Note the loss of a **live** teacher: student and teacher are then the same weights, and
# only the contexts differ.

# %%
teacher_logs = {
    "live (d = 0)": run("live (d = 0)", teacher="live"),
    "frozen (d = 1)": run("frozen (d = 1)", teacher="frozen"),
    "EMA d = 0.9": run("EMA d = 0.9", teacher="ema", ema_decay=0.9),
    "EMA d = 0.999": run("EMA d = 0.999", teacher="ema", ema_decay=0.999),
}
plot_runs(teacher_logs, "teacher modes", OUT / "teacher_modes.png")

# %% [markdown]
# ## 2. Loss space: velocity vs x0
#
# Since $\hat x_0 = x - \sigma v$ and both roles see the same state $x$,
#
# $$\big\|\hat x_0(u_s) - \hat x_0(u_t)\big\|^2 = \sigma^2\,\|u_s - u_t\|^2 :$$
#
# the x0 loss is the velocity loss weighted by $\sigma_k^2$ — toward the early, noisy
# steps. First the identity, with the library's per-sample loss:

# %%
g = torch.Generator().manual_seed(0)
x, u_s, u_t = (torch.randn(6, 3, 16, 16, generator=g) for _ in range(3))
sig = torch.rand(6, generator=g)
l_x0 = dopsd_ref.per_sample_step_loss(u_s, u_t, x, sig, "x0")
l_v = dopsd_ref.per_sample_step_loss(u_s, u_t, x, sig, "velocity")
print(f"max |L_x0 − σ²·L_v| = {(l_x0 - sig ** 2 * l_v).abs().max().item():.1e}")
print("weight σ_k² of each roll-out step on the K = 4 grid:",
      [round(float(s) ** 2, 4) for s in dopsd_ref.uniform_sigmas(4)])

# %%
space_logs = {"x0 (released code)": teacher_logs["EMA d = 0.999"],
              "velocity (paper)": run("velocity (paper)", space="velocity")}
plot_runs(space_logs, "loss space", OUT / "loss_space.png")

# %% [markdown]
# The two losses live on different scales (left panel), so one learning rate means a
# different effective step size for each; compare the concept curves, not the losses.
#
# ## 3. Roll-out length K
#
# The student is always *used* with 4 steps. Training on K = 4 makes the roll-out exactly the
# inference sampler; K = 2 or 8 trains on a different grid's states — only approximately
# on-policy, as when the released Z-Image code trains on K = 4 for an 8-step model.

# %%
k_logs = {"K = 2": run("K = 2", rollout_steps=2), "K = 4": teacher_logs["EMA d = 0.999"],
          "K = 8": run("K = 8", rollout_steps=8)}
plot_runs(k_logs, "roll-out length K (evaluated with the 4-step sampler)", OUT / "rollout_K.png")

# %% [markdown]
# ## 4. Memory: per-step vs single backward
#
# The states are detached between roll-out steps, so $\nabla\mathcal{L} = \frac1K\sum_k \nabla\mathcal{L}_k$
# and each $\mathcal{L}_k$ can be backpropagated as soon as it is computed
# (`per_step_backward=True`): its activations are freed before the next step. The released
# code keeps all K graphs and calls backward once. First: the gradients are the same.

# %%
from toy_models.models.context import ToyContext
from toy_models.models.dit import toy_dit_xs
from toy_models.world import vocab as V

tiny = toy_dit_xs()
with torch.no_grad():                     # random weights everywhere (the output layer starts at zero)
    for p in tiny.parameters():
        p.normal_(0, 0.05)
ctx = ToyContext(V.tokenize(["large red sks on black"] * 4))
noise = torch.randn(4, 3, 16, 16, generator=g)
grads = {}
for per_step in (True, False):
    tiny.zero_grad()
    out = dopsd_ref.dopsd_rollout_loss(lambda x, s: tiny(x, s, ctx), lambda x, s: 0.5 * tiny(x, s, ctx).detach(),
                                       noise, dopsd_ref.uniform_sigmas(4), per_step_backward=per_step)
    if not per_step:
        out.loss.backward()
    grads[per_step] = torch.cat([p.grad.flatten() for p in tiny.parameters() if p.grad is not None])
print(f"max |grad(per-step) − grad(single)| = {(grads[True] - grads[False]).abs().max().item():.1e} "
      f"(gradient norm {grads[False].norm().item():.2e})")

# %% [markdown]
# Now the memory. `paper_repro.memory_plan.SavedBytesMeter` counts, exactly, the bytes
# autograd keeps alive for backward (parameters excluded) during one D-OPSD step on the toy
# DiT (random weights, batch 16, teacher = same network with a reference image):

# %%
from paper_repro.memory_plan import SavedBytesMeter
from toy_models.models.dit import toy_dit_s

toy = toy_dit_s()
with torch.no_grad():
    for p in toy.parameters():
        p.normal_(0, 0.02)
tok = V.tokenize(["large red sks on black"] * 16)
c_s, c_t = ToyContext(tok), ToyContext(tok, torch.randn(16, 3, 16, 16, generator=g))
x1 = torch.randn(16, 3, 16, 16, generator=g)
ks = [1, 2, 4, 8]
saved = {True: [], False: []}
for k in ks:
    for per_step in (True, False):
        meter = SavedBytesMeter(list(toy.parameters()))
        with meter.hooks():
            out = dopsd_ref.dopsd_rollout_loss(lambda x, s: toy(x, s, c_s), lambda x, s: toy(x, s, c_t), x1,
                                               dopsd_ref.uniform_sigmas(k), per_step_backward=per_step)
            if not per_step:
                out.loss.backward()
        toy.zero_grad(set_to_none=True)
        saved[per_step].append(meter.peak / 2**20)
for per_step, label in [(True, "per-step backward"), (False, "single backward")]:
    print(f"{label:>17}: " + ", ".join(f"K={k}: {v:.1f} MiB" for k, v in zip(ks, saved[per_step])))

# %% [markdown]
# In full mode we also measure the whole process's peak resident memory during one step, each
# case in a fresh subprocess (`toy_models.studies.bench._memory_subprocess`, the benchmark's
# measurement; about half a minute per case on a busy CPU, so fast mode skips it), including
# one SFT step for scale.

# %%
rss = {}
if not T.FAST:
    from toy_models.studies.bench import Case, _memory_subprocess

    rss = {mode: [_memory_subprocess(Case("toy", k, 16, 16), mode, "cpu") for k in ks] for mode in ("per_step", "single")}
    rss["sft"] = [_memory_subprocess(Case("toy", 4, 16, 16), "sft", "cpu")] * len(ks)
    for mode, vals in rss.items():
        print(f"{mode:>9} (RSS): " + ", ".join(f"K={k}: {v:.1f} MiB" for k, v in zip(ks, vals)))

fig, axes = plt.subplots(1, 2 if rss else 1, figsize=(11 if rss else 5.5, 3.6), squeeze=False)
ax = axes[0, 0]
ax.plot(ks, saved[True], "o-", label="per-step backward")
ax.plot(ks, saved[False], "s--", label="single backward")
ax.set(xlabel="roll-out steps K", ylabel="MiB", title="saved activations, one D-OPSD step (toy DiT, batch 16)")
ax.legend(fontsize=8)
if rss:
    ax = axes[0, 1]
    for (mode, vals), style in zip(rss.items(), ["o-", "s--", ":"]):
        ax.plot(ks, vals, style, label={"per_step": "D-OPSD, per-step backward", "single": "D-OPSD, single backward",
                                        "sft": "SFT step (no K)"}[mode])
    ax.set(xlabel="roll-out steps K", ylabel="MiB over the loaded model", title="peak resident memory of one step")
    ax.legend(fontsize=8)
fig.tight_layout()
T.save(fig, OUT / "memory.png")

# %% [markdown]
# With one backward the peak grows with K (all K graphs are alive at the end); with
# per-step backward it stays at about one student forward's worth, whatever K. At the
# scale of Z-Image-Turbo this decides whether K = 8 fits on a card (tutorial 6,
# `paper_repro.memory_plan`).
#
# **What to take away.** On the real models the paper reports (method notes §4) that a live
# teacher collapses, a frozen one learns slowly and a slow EMA works best; the curves above
# are this toy run's version of that ablation — read them, and note that with d = 0.999 and
# 150 steps the toy teacher barely leaves the initial model (tutorial 6 computes how much of
# the student's drift an EMA teacher holds). The loss space is a per-step weighting
# ($\sigma_k^2$). K should match the sampler the model is used with. Per-step backward gives
# the same gradients with memory flat in K. In fast mode every variant trains only a few
# steps: the printed outcomes then say little, the mechanics are the point.
