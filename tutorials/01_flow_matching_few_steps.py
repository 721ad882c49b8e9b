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
# # 1 · Flow matching and few-step sampling
#
# D-OPSD fine-tunes *step-distilled* ("turbo") text-to-image models: models that draw an
# image in a handful of Euler steps. Before the method, this tutorial builds the three ideas
# it rests on, on the toy world of `toy_models` (16×16 images of one coloured shape):
#
# 1. the **σ-convention**: how a noisy image, a velocity and a clean-image prediction relate;
# 2. **Euler sampling**: what a K-step sampler does;
# 3. **step distillation**: a model trained to make its own few large steps work.
#
# It uses the shipped toy weights `toy_models/weights/toy-dit-base` (flow matching,
# best at ≥ 32 steps), `toy-dit-turbo4` (distilled to 4 steps) and `toy-evaluator`
# (a classifier that reads shape, colour, …).
#
# **Fast mode.** `DOPSD_TUTORIAL_FAST=1` uses fewer prompts and seeds (≤ 2 min on 2 CPU
# cores); full mode reproduces the figures. Figures go to
# `outputs/tutorials/01_flow_matching_few_steps/` (or `$DOPSD_TUTORIAL_OUT`).

# %%
import _tutorial as T  # tutorials/_tutorial.py: fast mode, output folder, figure helpers

import matplotlib.pyplot as plt
import numpy as np
import torch

import dopsd_ref
from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import text_context
from toy_models.finetune.evaluate import sample_prompts
from toy_models.eval.metrics import accuracy, palette_distance

torch.manual_seed(0)
OUT = T.out_dir("01_flow_matching_few_steps")
T.banner("01_flow_matching_few_steps")
base, turbo, evaluator = T.load_toy(T.BASE), T.load_toy(T.TURBO), T.load_toy(T.EVALUATOR)

# %% [markdown]
# ## 1. The σ-convention
#
# A noise level σ ∈ [0, 1] indexes a straight path from a clean image $x_0$ (σ = 0) to
# Gaussian noise $\varepsilon$ (σ = 1):
#
# $$x_\sigma = (1-\sigma)\,x_0 + \sigma\,\varepsilon .$$
#
# Along that path the state moves with constant **velocity**
# $v = \mathrm{d}x_\sigma/\mathrm{d}\sigma = \varepsilon - x_0$. A flow-matching model
# $v_\theta(x_\sigma, \sigma, c)$ is trained to predict it from the noisy state and the caption
# $c$ (the loss is `dopsd_ref.flow_matching_loss`):
#
# $$\mathcal{L}_\text{FM} = \mathbb{E}\,\big\|v_\theta(x_\sigma,\sigma,c) - (\varepsilon - x_0)\big\|^2 .$$
#
# Since the path is straight, any velocity also implies a **clean-image prediction**
# $\hat x_0 = x_\sigma - \sigma\,v$ (`dopsd_ref.x0_from_velocity`). Here is one toy image along
# its path (`dopsd_ref.noise_state`):

# %%
spec = D.random_spec(np.random.default_rng(3))
x0 = D.render_batch([spec])
eps = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
levels = [0.0, 0.25, 0.5, 0.75, 1.0]
path = torch.cat([dopsd_ref.noise_state(x0, eps, s) for s in levels])
fig = T.image_rows([path], [D.caption(spec)], [f"σ = {s}" for s in levels], title="$x_\\sigma = (1-\\sigma)x_0 + \\sigma\\varepsilon$")
T.save(fig, OUT / "noise_path.png")

v = dopsd_ref.velocity_target(x0, eps)
x_half = dopsd_ref.noise_state(x0, eps, 0.5)
err = (dopsd_ref.x0_from_velocity(x_half, 0.5, v) - x0).abs().max().item()
print(f"x0 recovered from (x_σ, σ, v) with max error {err:.1e}")

# %% [markdown]
# ## 2. Euler sampling on a σ grid
#
# To generate, start from noise at σ = 1 and integrate the velocity field down to σ = 0 on a
# grid $1 = \sigma_1 > \sigma_2 > \dots > \sigma_K > 0$ (then 0):
#
# $$x_{\sigma_{k+1}} = x_{\sigma_k} + (\sigma_{k+1} - \sigma_k)\; v_\theta(x_{\sigma_k}, \sigma_k, c).$$
#
# That is all `dopsd_ref.euler_sample` does; K is the number of network evaluations (NFE).
# The toy uses the uniform grid:

# %%
for k in (4, 32):
    g = dopsd_ref.uniform_sigmas(k)
    print(f"K = {k:>2}: σ = {[round(float(s), 3) for s in g[:6]]}{' …' if k > 6 else ''} → 0")

# %% [markdown]
# One Euler step moves the state *in a straight line* toward the current clean-image
# prediction. For a flow-matching model trained with the squared loss, the prediction at
# σ = 1 is the **average** of all images that fit the caption — a blur — and a large step
# commits to part of that blur. Many small steps let the prediction sharpen as the state
# becomes more specific. A step-distilled model is trained so that each of its few large
# steps lands where the base model's many small steps would have.
#
# Real turbo models are also *guidance-distilled*: the many small steps they imitate follow
# the classifier-free-guided velocity $v(c^-) + w\,(v(c) - v(c^-))$, so the turbo model
# draws what the caption names more reliably than its base does without guidance, and is
# sampled without guidance itself. The toy's 4-step model is made the same way (w = 3;
# `toy_models/models/guidance.py`, recipe in `toy_models/README.md`).
#
# ## 3. Base model at 32 and 4 steps, turbo model at 4 steps
#
# Same prompts, same starting noise, three samplers.

# %%
n_prompts = T.pick(6, 12)
prompt_specs = [D.random_spec(np.random.default_rng([7, i])) for i in range(n_prompts)]
prompts = [D.caption(s) for s in prompt_specs]
rows = {
    "base, 32 steps": sample_prompts(base, prompts, seed=0, steps=32),
    "base, 4 steps": sample_prompts(base, prompts, seed=0, steps=4),
    "turbo, 4 steps": sample_prompts(turbo, prompts, seed=0, steps=4),
}
fig = T.image_rows([D.render_batch(prompt_specs)] + list(rows.values()), ["render of the caption"] + list(rows),
                   [p.replace(" on ", "\non ") for p in prompts], size=1.25)
T.save(fig, OUT / "samples_base_vs_turbo.png")

# %% [markdown]
# The evaluator turns the pictures into numbers: the share of samples drawn as the shape the
# caption names, and the **palette distance** (how far pixel colours are from the toy
# world's clean palette; blur and leftover noise raise it, clean renders sit near its floor).
# Means over several noise seeds:

# %%
seeds = range(T.pick(2, 6))
results = {}
for name, model, steps in [("base, 32 steps", base, 32), ("base, 4 steps", base, 4), ("turbo, 4 steps", turbo, 4)]:
    accs, pals = [], []
    for seed in seeds:
        x = sample_prompts(model, prompts, seed=100 + seed, steps=steps)
        accs.append(accuracy(evaluator.predict(x)["shape"], [s.shape for s in prompt_specs]))
        pals.append(palette_distance(x))
    results[name] = (float(np.mean(accs)), float(np.mean(pals)))
    print(f"{name:>15}: shape accuracy {results[name][0]:.2f}   palette distance {results[name][1]:.3f}")
print(f"{'renders':>15}: palette distance {palette_distance(D.render_batch(prompt_specs)):.3f}")

# Which of the two 4-step samplers comes closer to the base model's 32 steps, by these numbers?

# %%
gap_base4 = results["base, 4 steps"][1] - results["base, 32 steps"][1]
gap_turbo4 = results["turbo, 4 steps"][1] - results["base, 32 steps"][1]
print(f"palette distance above base-32: base at 4 steps {gap_base4:+.3f}, turbo at 4 steps {gap_turbo4:+.3f} "
      f"→ {'turbo' if gap_turbo4 < gap_base4 else 'base'} is closer")

# %% [markdown]
# The toy world is simple (one flat shape per image), so even the base model does
# reasonably at 4 steps here; the turbo model's higher shape accuracy comes mostly from the
# guidance it was distilled from. On real images a base model at 4 steps is a blur, and that
# gap is what turbo models are for. What matters for D-OPSD is the
# mechanism, which the toy has: the few-step model is tuned to its own 4-step trajectory.
#
# ## 4. Inside the 4-step sampler
#
# At every state $x_{\sigma_k}$ we ask the model for its velocity and convert it to the
# clean-image prediction $\hat x_0 = x_{\sigma_k} - \sigma_k v$. At σ = 1 the prediction is
# the blurred average of everything the caption allows; each step commits to part of it
# and the next prediction is sharper.

# %%
def x0_along(model, prompt, steps=4, seed=0):
    """States of the K-step sampler and the model's x0 prediction at each of them."""
    ctx = text_context([prompt])
    fn = lambda x, s: model(x, s, ctx)  # noqa: E731  (bind the caption: the library's (x, σ) protocol)
    noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    sigmas = dopsd_ref.uniform_sigmas(steps)
    states = dopsd_ref.euler_sample(fn, noise, sigmas, return_states=True)[:, 0]
    with torch.no_grad():
        x0s = torch.cat([dopsd_ref.x0_from_velocity(states[k:k + 1], float(s), fn(states[k:k + 1], s.float().reshape(1)))
                         for k, s in enumerate(sigmas)])
    return states, x0s


prompt = prompts[0]
sig_labels = [f"σ = {float(s):.2f}" for s in dopsd_ref.uniform_sigmas(4)] + ["σ = 0"]
sb, xb = x0_along(base, prompt)
st, xt = x0_along(turbo, prompt)
fig = T.image_rows([sb, xb, st, xt], ["base: state", "base: x̂0", "turbo: state", "turbo: x̂0"], sig_labels,
                   title=f"inside the 4-step sampler — “{prompt}”", size=1.3)
T.save(fig, OUT / "x0_along_rollout.png")

# %% [markdown]
# The palette distance of the *first* prediction $\hat x_0(x_{\sigma=1})$ over all prompts
# (lower = closer to a clean image), for both models:

# %%
for name, model in [("base", base), ("turbo", turbo)]:
    first = torch.cat([x0_along(model, p)[1][:1] for p in prompts])
    print(f"{name:>5}: palette distance of x̂0 at σ = 1: {palette_distance(first):.3f}")

# %% [markdown]
# **What to take away.** A state, a velocity and a clean-image prediction are three views of
# one thing ($\hat x_0 = x_\sigma - \sigma v$). A sampler is a sequence of states; a
# step-distilled model is trained to make *its own* few large steps work, i.e. to handle the
# states its own 4-step sampler visits. Tutorial 2 shows what plain fine-tuning does to that.
