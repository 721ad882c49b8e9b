"""Fine-tuning methods and options of the toy runner: SFT on teacher samples, DreamBooth prior
preservation, the ungated LoRA scope, the reconstruction loss and the K curriculum.

All on a tiny randomly initialised toy DiT (no shipped weights needed).
"""

import pytest
import torch
from finetune_fixtures import probe_random_student, tiny_model

import dopsd_ref
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.finetune.adapters import add_local_adapters
from toy_models.finetune.config import load_config
from toy_models.finetune.targets import load_targets
from toy_models.finetune.train import RARE_IDS, build_roles, load_model, prior_samples, run_finetune, teacher_samples


def _cfg(model_dir, **kw):
    base = dict(model=str(model_dir), steps=2, batch_size=2, num_targets=3, ckpt_every=0, lr=1e-2, device="cpu",
                prior_images=4)
    base.update(kw)
    return load_config(None, **base)


def _run(cfg, **kw):
    return run_finetune(cfg, progress=False, write=False, **kw)


def _state(res):
    return {k: v.clone() for k, v in res.roles.student_state().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_on_teacher_samples_is_sft_on_the_initial_teachers_samples(tiny_model_dir):
    """method 'sft_teacher' trains exactly like SFT whose targets are the initial teacher's
    K-step samples (text + target image context), four per target, with the targets' captions."""
    cfg = _cfg(tiny_model_dir, method="sft_teacher", steps=3)
    targets = load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
    torch.manual_seed(cfg.seed)  # the LoRA A initialisation, as run_finetune does
    roles = build_roles(load_model(cfg.model, torch.device("cpu")), cfg)
    pool = teacher_samples(roles, targets, cfg, per_target=4, device=torch.device("cpu"))
    assert len(pool) == 4 * len(targets) and pool.captions[:4] == [targets.captions[0]] * 4
    # the pool is the teacher's own sample: Euler from seeded noise with the teacher context
    tctx = ToyContext(V.tokenize(pool.captions), targets.images.repeat_interleave(4, 0), cfg.teacher_route)
    noise = torch.randn(len(pool), 3, 16, 16, generator=torch.Generator().manual_seed(cfg.seed + 99))
    with torch.no_grad():
        direct = dopsd_ref.euler_sample(lambda x, s: roles.teacher(x, s, tctx), noise, dopsd_ref.uniform_sigmas(4))
    assert torch.equal(pool.images, direct.clamp(-1, 1))
    assert not torch.equal(pool.images, targets.images.repeat_interleave(4, 0))
    a = _run(cfg, targets=targets)
    b = _run(cfg.replace(method="sft"), targets=pool)
    assert _equal(_state(a), _state(b))


def test_prior_samples_are_the_base_models_known_prompt_samples(tiny_model_dir):
    """DreamBooth's prior pairs are the untrained model's own 4-step samples of known-shape
    prompts (no rare token), drawn from their own seed (identical on every call, i.e. on resume)
    and from prompts other than the evaluation's known prompts."""
    from toy_models.finetune.evaluate import make_eval_prompts

    cfg = _cfg(tiny_model_dir, method="dreambooth", prior_images=6)
    base = load_model(cfg.model, torch.device("cpu")).eval()
    roles = build_roles(load_model(cfg.model, torch.device("cpu")), cfg)
    p1, p2 = prior_samples(roles, cfg, torch.device("cpu")), prior_samples(roles, cfg, torch.device("cpu"))
    assert len(p1) == 6 and torch.equal(p1.images, p2.images)
    assert all(not ({V.SHAPE_TOKEN, V.STYLE_TOKEN} & set(c.split())) for c in p1.captions)
    assert all(s.shape in V.KNOWN_SHAPES for s in p1.specs)
    ctx = ToyContext(V.tokenize(p1.captions))
    noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(cfg.seed + 199))
    with torch.no_grad():
        direct = dopsd_ref.euler_sample(lambda x, s: base(x, s, ctx), noise, dopsd_ref.uniform_sigmas(4)).clamp(-1, 1)
    torch.testing.assert_close(p1.images, direct, rtol=0, atol=1e-6)
    known = set(make_eval_prompts(load_targets(cfg.data, cfg.num_targets, cfg.data_seed)).known)
    assert len(set(p1.captions) - known) > 0


@pytest.mark.parametrize("scope", ["lora", "full"])
def test_dreambooth_without_prior_weight_is_sft_for_one_step(tiny_model_dir, scope):
    """With prior_weight = 0 the first DreamBooth step is the SFT step on the same batch
    (the prior term contributes nothing), bit for bit."""
    a = _run(_cfg(tiny_model_dir, method="dreambooth", prior_weight=0.0, steps=1, scope=scope))
    b = _run(_cfg(tiny_model_dir, method="sft", steps=1, scope=scope))
    assert _equal(_state(a), _state(b))
    assert "prior_loss" in a.log[-1] and "prior_loss" not in b.log[-1]


def test_dreambooth_gradient_adds_the_weighted_prior_gradient(tiny_model_dir):
    """The DreamBooth gradient is ∇L_FM(targets) + w·∇L_FM(prior pairs): measured on one step
    with SGD(lr = 1) and no clipping, the update is minus that sum (w = 0 and w = 2.5 runs)."""
    from toy_models.finetune import train as T

    def one_step(w):
        cfg = _cfg(tiny_model_dir, method="dreambooth", prior_weight=w, steps=1, scope="lora", max_grad_norm=1e9)
        targets = load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
        torch.manual_seed(0)  # the LoRA A initialisation
        roles = build_roles(load_model(cfg.model, torch.device("cpu")), cfg)
        prior = prior_samples(roles, cfg, torch.device("cpu"))
        before = [p.detach().clone() for p in roles.params]
        opt = torch.optim.SGD(roles.params, lr=1.0)
        step_cfg = dopsd_ref.StepConfig(max_grad_norm=None)
        row = T.train_one_step(cfg, roles, opt, step_cfg, dopsd_ref.uniform_sigmas(4), targets,
                               torch.Generator().manual_seed(0), torch.device("cpu"), 0, None, prior=prior)
        return [b - p.detach() for b, p in zip(before, roles.params)], row

    g0, r0 = one_step(0.0)
    g1, r1 = one_step(1.0)
    g25, r25 = one_step(2.5)
    for a, b, c in zip(g0, g1, g25):  # prior gradient = g1 − g0; g(2.5) = g0 + 2.5·(g1 − g0)
        torch.testing.assert_close(c, a + 2.5 * (b - a), rtol=1e-4, atol=1e-6)
    assert r25["loss"] == pytest.approx(r0["loss"] + 2.5 * r0["prior_loss"], rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(g0, g1))


def test_ungated_lora_changes_every_prompt():
    """scope='lora' adapts the same attention + MLP layers as the prompt-gated scope but with no
    gate: nonzero adapter weights change prompts without a rare token too (retention has to
    be measured); the teacher adapter at its initial B = 0 still equals the base."""
    base = tiny_model()
    lora = add_local_adapters(tiny_model(), RARE_IDS, rank=2, scope="lora")
    gated = add_local_adapters(tiny_model(), RARE_IDS, rank=2, scope="prompt_gated")
    names = lambda m: {n.replace("lora", "") for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(lora) == names(gated)
    out = probe_random_student(lora, base)
    diff = out.student_gap()
    assert torch.allclose(out.teacher, out.base, atol=1e-6)
    assert diff[0] > 1e-4 and diff[1] > 1e-4


def test_constant_rollout_schedule_is_the_fixed_k_run(tiny_model_dir):
    """rollout_schedule '0:K' trains bit-identically to the fixed rollout_steps = K run."""
    a = _run(_cfg(tiny_model_dir, rollout_steps=3))
    b = _run(_cfg(tiny_model_dir, rollout_schedule="0:3"))
    assert _equal(_state(a), _state(b))


def test_rollout_schedule_sets_k_per_step(tiny_model_dir):
    """With '0:2,3:4' the 1-based optimizer steps 1–2 roll out K = 2 steps and steps 3–4 K = 4
    (the logged per-step losses have that length)."""
    res = _run(_cfg(tiny_model_dir, rollout_schedule="0:2,3:4", steps=4))
    assert [len(r["per_step"]) for r in res.log] == [2, 2, 4, 4]


def test_reconstruction_weight_in_the_runner(tiny_model_dir):
    """recon_weight = 0 (default) is the plain D-OPSD run; a positive weight logs the
    reconstruction loss, adds λ times it to the logged loss and changes the update."""
    plain = _run(_cfg(tiny_model_dir, steps=1))
    zero = _run(_cfg(tiny_model_dir, steps=1, recon_weight=0.0))
    on = _run(_cfg(tiny_model_dir, steps=1, recon_weight=0.5))
    assert _equal(_state(plain), _state(zero)) and "recon_loss" not in zero.log[-1]
    row = on.log[-1]
    assert row["recon_loss"] > 0 and row["loss"] == pytest.approx(plain.log[-1]["loss"] + 0.5 * row["recon_loss"], rel=1e-5)
    assert not _equal(_state(plain), _state(on))


def test_option_fields_are_validated():
    """Bad option values are refused naming the field: λ < 0, λ > 0 for a method other than
    D-OPSD, a malformed or non-zero-start schedule, a schedule with skipped steps, no prior pairs."""
    for kw, field in [({"recon_weight": -1.0}, "recon_weight"), ({"recon_weight": 1.0, "method": "sft"}, "recon_weight"),
                      ({"rollout_schedule": "0:2,x"}, "rollout_schedule"), ({"rollout_schedule": "5:2"}, "rollout_schedule"),
                      ({"rollout_schedule": "0:2,9:4", "skip_first_steps": 1}, "rollout_schedule"),
                      ({"prior_images": 0}, "prior_images"), ({"prior_weight": float("nan")}, "prior_weight"),
                      ({"scope": "everything"}, "scope")]:
        with pytest.raises(ValueError, match=field):
            load_config(None, **kw)


def test_dopsd_prior_step_averages_the_target_and_the_text_only_prior_rollout_gradients(tiny_model_dir):
    """method 'dopsd_prior' (on-policy prior preservation) takes one step on
    L = ½ (L_D-OPSD(targets) + L_D-OPSD(prior prompts)): measured with SGD(lr = 1) and no
    clipping, its update is the mean of the plain D-OPSD update on the same target batch and the
    update of a D-OPSD step on the prior micro-batch alone, where the student rolls out from the
    next noise draw on known-shape prompts and the EMA teacher sees the same text only (no image)."""
    from toy_models.finetune import train as T

    cpu = torch.device("cpu")

    def one_step(method, micro=None):
        cfg = _cfg(tiny_model_dir, method=method, steps=1, scope="lora", max_grad_norm=1e9, prior_images=5)
        targets = load_targets(cfg.data, cfg.num_targets, cfg.data_seed)
        torch.manual_seed(0)  # the LoRA A initialisation
        roles = build_roles(load_model(cfg.model, cpu), cfg)
        with torch.no_grad():  # a nonzero adapter, so the teacher and the student differ
            for n, p in roles.module.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
        prior = prior_samples(roles, cfg, cpu)
        before = [p.detach().clone() for p in roles.params]
        opt = torch.optim.SGD(roles.params, lr=1.0)
        step_cfg = dopsd_ref.StepConfig(max_grad_norm=None)
        if micro is None:
            T.train_one_step(cfg, roles, opt, step_cfg, dopsd_ref.uniform_sigmas(4), targets,
                             torch.Generator().manual_seed(0), cpu, 0, None, prior=prior)
        else:  # the prior micro-batch alone, drawn from the generator after the target batch
            gen = torch.Generator().manual_seed(0)
            torch.randint(len(targets), (cfg.batch_size,), generator=gen)
            torch.randn(cfg.batch_size, 3, 16, 16, generator=gen)
            pidx = torch.randint(len(prior), (cfg.batch_size,), generator=gen)
            pnoise = torch.randn(cfg.batch_size, 3, 16, 16, generator=gen)
            pctx = ToyContext(V.tokenize([prior.captions[i] for i in pidx.tolist()]))
            dopsd_ref.dopsd_train_step(roles.module, roles.teacher, [dopsd_ref.MicroBatch(pnoise, pctx, pctx)],
                                       dopsd_ref.uniform_sigmas(4), opt, roles.params, step_cfg, step=1)
        return [b - p.detach() for b, p in zip(before, roles.params)]

    both, target, prior_only = one_step("dopsd_prior"), one_step("dopsd"), one_step("dopsd", micro="prior")
    for a, t, p in zip(both, target, prior_only):
        torch.testing.assert_close(a, 0.5 * (t + p), rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(t, p) for t, p in zip(target, prior_only))
    with pytest.raises(ValueError, match="prior_weight"):
        _cfg(tiny_model_dir, method="dopsd_prior", prior_weight=2.0)
