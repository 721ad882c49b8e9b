"""Recipes run end to end at tiny sizes and write loadable HF-style folders."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.models.guidance import (NEGATIVES, GuidedDenoiser, drop_shape_word, guidance_negative, guided_velocity,
                                        concept_token_negative, guidable_batches, keep_reference_negative,
                                        split_by_caption_kind)

from toy_models.models.dit import TOY_DIT_SIZES, ToyDiT
from toy_models.eval.evaluator import ToyEvaluator
from toy_models.recipes import distill, pretrain, train_evaluator
from toy_models.recipes.common import save_atomic, save_pretrained_atomic


def test_pretrain_then_distill_tiny(tmp_path, monkeypatch):
    """pretrain (XS, 3 steps) → folder with config/safetensors/training.json; distill from it
    (tiny cache) → a loadable 4-step folder; rerunning pretrain with the same seed gives
    identical weights."""
    base = tmp_path / "base"
    args = ["--size", "XS", "--steps", "3", "--batch", "8", "--ckpt-every", "100", "--threads", "1",
            "--out", str(base), "--state", str(tmp_path / "st.pt")]
    pretrain.main(args)
    tr = json.loads((base / "training.json").read_text())
    assert tr["steps_done"] == 3 and tr["seed"] == 0 and "wall_clock_s" in tr
    m1 = ToyDiT.from_pretrained(base)
    pretrain.main(args[:-2] + ["--state", str(tmp_path / "st2.pt")] + ["--out", str(tmp_path / "base2")])
    m2 = ToyDiT.from_pretrained(tmp_path / "base2")
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    out = tmp_path / "turbo"
    distill.main(["--base", str(base), "--out", str(out), "--n-text", "8", "--n-ref", "8", "--fine-steps", "4",
                  "--train-steps", "2", "--batch", "8", "--cache", str(tmp_path / "cache.pt"), "--threads", "1"])
    assert json.loads((out / "training.json").read_text())["K"] == 4
    assert ToyDiT.from_pretrained(out).config == m1.config
    # guidance distillation: a cache made without guidance is refused, naming the file
    g_args = ["--base", str(base), "--out", str(tmp_path / "turbo-g"), "--n-text", "8", "--n-ref", "8", "--fine-steps", "4",
              "--train-steps", "2", "--batch", "8", "--threads", "1", "--guidance", "2"]
    with pytest.raises(ValueError, match="cache.pt.*guidance 1.0"):
        distill.main(g_args + ["--cache", str(tmp_path / "cache.pt")])
    distill.main(g_args + ["--cache", str(tmp_path / "cache-g.pt")])
    assert json.loads((tmp_path / "turbo-g" / "training.json").read_text())["guidance"] == 2.0
    # the concept-token negative: a cache made under another negative is refused; its own
    # cache holds the reference contexts in groups that each hold one caption kind
    with pytest.raises(ValueError, match="cache-g.pt.*negative 'drop_reference'"):
        distill.main(g_args + ["--negative", "concept_token", "--cache", str(tmp_path / "cache-g.pt")])
    ct_args = g_args + ["--negative", "concept_token", "--mixture", "v2e", "--ref-aligned", "0.05",
                        "--cache", str(tmp_path / "cache-ct.pt")]
    used = []
    real_guided = distill.guided_velocity

    def spy(model, x, sigma, ctx, scale, negative):
        used.append(negative)
        return real_guided(model, x, sigma, ctx, scale, negative)

    monkeypatch.setattr(distill, "guided_velocity", spy)
    distill.main(ct_args)
    assert used and set(used) == {concept_token_negative}  # the negative reaches the guided ODE
    cache = torch.load(tmp_path / "cache-ct.pt", weights_only=True)
    assert {g["negative"] for g in cache} == {"concept_token"}
    assert sum(g["states"].shape[0] for g in cache if g["ref"] is not None) == 8
    tokens_groups = [g for g in cache if g["ref"] is not None and g["route"] == "tokens"]
    assert len(tokens_groups) == 2  # this draw holds both caption kinds: the split is exercised
    for g in cache[1:]:
        concept_token_negative(ToyContext(g["tokens"], g["ref"], g["route"]))  # raises on a mixed group
    assert json.loads((tmp_path / "turbo-g" / "training.json").read_text())["negative"] == "concept_token"
    # a cache is tied to the base (and the context settings) that made it
    for flag, value, key in (("--base", str(tmp_path / "base2"), "base"), ("--n-ref", "16", "n_ref")):
        other = ct_args + [flag, value]
        with pytest.raises(ValueError, match=f"cache-ct.pt: cached with {key} .*--{flag[2:]} is"):
            distill.main(other)


def test_pretrain_continuation_with_rope_and_extra_blocks(tmp_path):
    """``--init F --rope --extra-blocks 2`` continues F in a deeper RoPE model (depth = F's + 2), records both
    in training.json and config."""
    base = tmp_path / "base"
    common = ["--size", "XS", "--steps", "2", "--batch", "8", "--ckpt-every", "100", "--threads", "1"]
    pretrain.main(common + ["--out", str(base), "--state", str(tmp_path / "st.pt")])
    grown = tmp_path / "grown"
    pretrain.main(common + ["--out", str(grown), "--state", str(tmp_path / "st2.pt"), "--init", str(base),
                            "--mixture", "v2t", "--rope", "--extra-blocks", "2"])
    tr = json.loads((grown / "training.json").read_text())
    m = ToyDiT.from_pretrained(grown)
    assert tr["rope"] and tr["depth"] == m.config.depth == ToyDiT.from_pretrained(base).config.depth + 2
    assert m.config.rope
    # continuing the deeper model keeps its depth (read from the --init folder, not --size)
    again = tmp_path / "again"
    pretrain.main(common + ["--out", str(again), "--state", str(tmp_path / "st3.pt"), "--init", str(grown),
                            "--mixture", "v2t", "--rope", "--extra-blocks", "1"])
    assert ToyDiT.from_pretrained(again).config.depth == m.config.depth + 1

def test_refused_pretrain_writes_nothing(tmp_path, monkeypatch):
    """A refused command line (``--extra-blocks`` without ``--init``) exits before any file or
    folder is made (no log under ``runs/``)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        pretrain.main(["--size", "XS", "--steps", "2", "--threads", "1", "--out", "x", "--extra-blocks", "1"])
    assert list(tmp_path.iterdir()) == []


def _crash_after_partial_write(*args, **kwargs):
    """Stands in for a writer that dies half-way: some bytes reach the file, then an error."""
    f = args[1] if len(args) > 1 else kwargs.get("f")
    if hasattr(f, "write"):
        f.write(b"partial")
    raise KeyboardInterrupt


def test_recipe_saves_survive_a_crash_mid_write(tmp_path, monkeypatch):
    """The recipes' resume state and model folders are replaced atomically: a writer that
    dies half-way leaves the previous state.pt and model files whole and loadable, the other
    files of the folder untouched, and no temporary file behind."""
    state = tmp_path / "run" / "state.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, state)
    model_a = TOY_DIT_SIZES["XS"]()
    save_pretrained_atomic(model_a, tmp_path / "run")
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    assert {"state.pt", "config.json", "model.safetensors"} <= set(before)

    monkeypatch.setattr(torch, "save", _crash_after_partial_write)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2, "w": torch.zeros(3)}, state)
    monkeypatch.undo()
    model_b = TOY_DIT_SIZES["XS"]()

    def dies(folder, *a, **k):  # one file written, then the crash
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(model_b, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(model_b, tmp_path / "run")

    after = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    assert after == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["run"]
    assert torch.load(state, weights_only=True)["step"] == 1
    loaded = ToyDiT.from_pretrained(tmp_path / "run")
    for (k, a), b in zip(model_a.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_guidance_negative_replaces_only_the_shape_word(seed, n):
    """Text-only c⁻ is the caption with its known shape word replaced by ``sks`` and every
    other token unchanged; a reference context's c⁻ is the same caption with no reference."""
    specs = D.specs(seed, n)
    tok = V.tokenize([D.caption(s) for s in specs])
    neg = guidance_negative(ToyContext(tok))
    assert not neg.has_ref
    assert torch.equal(neg.tokens, V.tokenize([D.caption(s, shape_word=V.SHAPE_TOKEN) for s in specs]))
    ref = D.render_batch(specs)
    neg_ref = guidance_negative(ToyContext(tok, ref, "tokens"))
    assert not neg_ref.has_ref and torch.equal(neg_ref.tokens, tok)


def test_guided_velocity_is_the_cfg_combination():
    """``v_w = v(c⁻) + w·(v(c) − v(c⁻))``: w = 1 is the plain velocity, w = 0 the negative's,
    and v_w is affine in w."""
    torch.manual_seed(0)
    model = TOY_DIT_SIZES["XS"]().eval()
    with torch.no_grad():  # leave the zero-initialised output layer
        for q in model.parameters():
            q.add_(0.05 * torch.randn_like(q))
    specs = D.specs(3, 4)
    ctx = ToyContext(V.tokenize([D.caption(s) for s in specs]))
    x = torch.randn(4, 3, 16, 16)
    sig = torch.full((4,), 0.6)
    with torch.no_grad():
        v1 = guided_velocity(model, x, sig, ctx, 1.0)
        v0 = guided_velocity(model, x, sig, ctx, 0.0)
        v3 = guided_velocity(model, x, sig, ctx, 3.0)
        torch.testing.assert_close(v1, model(x, sig, ctx))
        torch.testing.assert_close(v0, model(x, sig, guidance_negative(ctx)))
        torch.testing.assert_close(v3, v0 + 3.0 * (v1 - v0))
        assert not torch.allclose(v1, v0)
        torch.testing.assert_close(GuidedDenoiser(model, 3.0)(x, sig, ctx), v3)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_drop_shape_word_removes_only_the_shape_word(seed, n):
    """The sweep's alternative c⁻ is the caption with the shape word deleted (not replaced)."""
    specs = D.specs(seed, n)
    tok = V.tokenize([D.caption(s) for s in specs])
    got = V.detokenize(drop_shape_word(ToyContext(tok)).tokens)
    assert got == [" ".join(w for w in D.caption(s).split() if w not in V.KNOWN_SHAPES) for s in specs]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6))
def test_keep_reference_negative_keeps_the_domain(seed, n):
    """The domain-keeping c⁻: a reference context whose captions name their shapes keeps its
    reference and route, with only the shape words replaced by ``sks``; text-only contexts,
    and reference contexts whose caption already says ``sks``, get :func:`guidance_negative`."""
    specs = D.specs(seed, n)
    tok = V.tokenize([D.caption(s) for s in specs])
    ref = D.render_batch([s.replace(domain="pastel") for s in specs])
    neg = keep_reference_negative(ToyContext(tok, ref, "tokens"))
    assert neg.route == "tokens" and torch.equal(neg.ref, ref)
    assert torch.equal(neg.tokens, V.tokenize([D.caption(s, shape_word=V.SHAPE_TOKEN) for s in specs]))
    for ctx in (ToyContext(tok), ToyContext(neg.tokens, ref, "tokens")):
        want = guidance_negative(ctx)
        got = keep_reference_negative(ctx)
        assert got.has_ref == want.has_ref and torch.equal(got.tokens, want.tokens)
    assert NEGATIVES["drop_reference"] is guidance_negative and NEGATIVES["keep_reference"] is keep_reference_negative


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6))
def test_concept_token_negative_follows_what_the_caption_defers(seed, n):
    """The concept-token c⁻: captions with ``sks`` or ``zwx`` (the concept is the reference's)
    drop the reference; captions that name everything keep it with the shape word replaced
    by ``sks``; text-only contexts get the plain negative; a reference batch mixing both kinds
    is refused, naming the rows."""
    specs = D.specs(seed, n)
    ref = D.render_batch(specs)
    named = ToyContext(V.tokenize([D.caption(s) for s in specs]), ref, "tokens")
    for word in ("shape_word", "style_word"):
        rare = ToyContext(V.tokenize([D.caption(s, **{word: V.SHAPE_TOKEN if word == "shape_word" else V.STYLE_TOKEN})
                                      for s in specs]), ref, "tokens")
        got = concept_token_negative(rare)
        assert not got.has_ref and torch.equal(got.tokens, rare.tokens)
    got, want = concept_token_negative(named), keep_reference_negative(named)
    assert got.has_ref and torch.equal(got.tokens, want.tokens) and torch.equal(got.ref, ref)
    text = ToyContext(named.tokens)
    assert torch.equal(concept_token_negative(text).tokens, guidance_negative(text).tokens)
    mixed = V.tokenize([D.caption(specs[0], shape_word=V.SHAPE_TOKEN)] + [D.caption(s) for s in specs[1:]])
    with pytest.raises(ValueError, match=r"rows \[0\] of"):
        concept_token_negative(ToyContext(mixed, ref, "tokens"))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 8), kinds=st.lists(st.booleans(), min_size=8, max_size=8))
def test_split_by_caption_kind_partitions_rows_for_the_concept_token_negative(seed, n, kinds):
    """Splitting a reference batch by caption kind keeps every row exactly once (rare-token
    rows first, in order), leaves no empty part, and gives parts the concept-token c⁻
    accepts; a text-only batch stays whole."""
    specs = D.specs(seed, n)
    caps = [D.caption(s, shape_word=V.SHAPE_TOKEN) if k else D.caption(s) for s, k in zip(specs, kinds)]
    ctx = ToyContext(V.tokenize(caps), D.render_batch(specs), "tokens")
    parts = split_by_caption_kind(ctx)
    order = [i for i in range(n) if kinds[i]] + [i for i in range(n) if not kinds[i]]
    assert all(p.batch_size for p in parts) and len(parts) == len({kinds[i] for i in range(n)})
    joined = ToyContext.cat(parts)
    assert torch.equal(joined.tokens, ctx.tokens[order]) and torch.equal(joined.ref, ctx.ref[order])
    for part in parts:
        concept_token_negative(part)
    text = ToyContext(ctx.tokens)
    assert split_by_caption_kind(text) == [text]
    # what the distillation caches: split only for the negative that needs it
    assert [p.batch_size for p in guidable_batches(ctx, concept_token_negative)] == [p.batch_size for p in parts]
    assert guidable_batches(ctx, guidance_negative) == [ctx] == guidable_batches(ctx, keep_reference_negative)


def test_train_evaluator_tiny(tmp_path):
    train_evaluator.main(["--steps", "2", "--batch", "8", "--out", str(tmp_path / "ev"), "--threads", "1"])
    assert "heldout_clean_accuracy" in json.loads((tmp_path / "ev" / "training.json").read_text())
    ToyEvaluator.from_pretrained(tmp_path / "ev")


def test_guidance_sweep_cli_smoke(tmp_path, capsys):
    """``python -m toy_models.models.guidance`` runs on the shipped base at a tiny size and writes one
    row per (negative, scale) for text-only prompts and one per scale for reference copying."""
    from toy_models.models import guidance

    out = tmp_path / "sweep.json"
    guidance.main(["--n", "8", "--steps", "2", "--scales", "1", "2", "--threads", "1", "--out", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["context"], r["negative"], r["w"]) for r in rows] == [
        ("text-only", "rare token", 1.0), ("text-only", "rare token", 2.0), ("text-only", "shape word dropped", 2.0),
        ("aligned reference", "no reference", 1.0), ("aligned reference", "no reference", 2.0)]
    assert "| text-only | rare token | 2.0 |" in capsys.readouterr().out


def test_pretrain_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """Killed after its step-2 checkpoint and restarted with ``--resume``, pretrain ends with
    bit-identical weights to a run that was never interrupted (data, noise and lr depend only
    on (seed, step); model, EMA, optimizer and step come back from state.pt)."""
    common = ["--size", "XS", "--steps", "4", "--batch", "8", "--threads", "1", "--mixture", "v2t"]
    pretrain.main(common + ["--ckpt-every", "100", "--out", str(tmp_path / "a"), "--state", str(tmp_path / "a.pt")])

    real = pretrain.pretrain_batch

    def killed_at_step_2(seed, step, *a):
        if step == 2:
            raise KeyboardInterrupt
        return real(seed, step, *a)
    monkeypatch.setattr(pretrain, "pretrain_batch", killed_at_step_2)
    b = common + ["--ckpt-every", "2", "--out", str(tmp_path / "b"), "--state", str(tmp_path / "b.pt")]
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(b)
    monkeypatch.undo()
    pretrain.main(b + ["--resume"])
    sa = ToyDiT.from_pretrained(tmp_path / "a").state_dict()
    sb = ToyDiT.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4


def test_acceptance_refuses_cards_for_candidate_weights(tmp_path):
    """Model cards and the default results file describe the shipped weights, so acceptance
    on candidate folders (``--base``/``--turbo``) refuses ``--write-cards`` and a missing
    ``--out`` before measuring anything; the shipped record is left untouched."""
    from toy_models.recipes import acceptance
    from toy_models.models.hub import WEIGHTS_DIR

    before = (WEIGHTS_DIR / "acceptance.json").read_bytes()
    for flag in ("--base", "--turbo"):
        with pytest.raises(SystemExit, match="--write-cards describes the shipped weights"):
            acceptance.main([flag, str(tmp_path / "cand"), "--write-cards", "--out", str(tmp_path / "a.json")])
        with pytest.raises(SystemExit, match="pass --out"):
            acceptance.main([flag, str(tmp_path / "cand")])
    assert not (tmp_path / "a.json").exists()
    assert (WEIGHTS_DIR / "acceptance.json").read_bytes() == before


def test_card_lists_the_runs_a_continuation_started_from(tmp_path, monkeypatch):
    """A continued base (``--init``) records its parent's training.json (nested); its card
    lists every ancestor's command and wall-clock, latest first, so the chain of one-line
    commands that made the weights can be re-run from the card alone."""
    from toy_models.recipes import cards

    root = {"command": "python -m toy_models.recipes.pretrain --seed 0", "wall_clock_s": 10.0}
    mid = {"command": "python -m toy_models.recipes.pretrain --mixture copy --init A", "wall_clock_s": 20.0,
           "init_training": root}
    top = {"command": "python -m toy_models.recipes.pretrain --mixture v2f --init B", "wall_clock_s": 30.0,
           "init_training": mid, "seed": 3}
    folder = tmp_path / cards.BASE
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps(top))
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(cards, "WEIGHTS_DIR", tmp_path)
    text = cards.card(cards.BASE, {})
    assert cards._lineage(top) == [mid, root] and cards._lineage(root) == []
    i1, i2 = text.index("1. `" + mid["command"] + "` (20.0 s)"), text.index("2. `" + root["command"] + "` (10.0 s)")
    assert text.index(top["command"]) < i1 < i2
