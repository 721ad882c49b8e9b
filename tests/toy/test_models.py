"""Toy DiT / text encoder / evaluator: shapes, dtypes, save→load, offline loading, reference use."""

import os
import subprocess
import sys

import pytest
import torch

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext, teacher_context, text_context
from toy_models.models.dit import ToyDiT, toy_dit_xs
from toy_models.eval.evaluator import HEADS, ToyEvaluator
from toy_models.models.sampling import sample


def _live_xs(seed: int = 0) -> ToyDiT:
    """XS model whose zero-initialised layers are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    m = toy_dit_xs().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    return m


def _batch(n=4, seed=0):
    sp = D.specs(seed, n)
    return D.render_batch(sp), [D.caption(s, shape_word=V.SHAPE_TOKEN) for s in sp]


def test_shapes_dtypes_and_zero_init():
    """Output is float32 [B, 3, 16, 16]; a fresh model outputs exactly zero (zero-init head)."""
    m = toy_dit_xs()
    x, caps = _batch(3)
    for ctx in (text_context(caps), teacher_context(caps, x), teacher_context(caps, x, "encoder")):
        v = m(torch.randn(3, 3, 16, 16), torch.rand(3), ctx)
        assert v.shape == (3, 3, 16, 16) and v.dtype == torch.float32
        assert torch.count_nonzero(v) == 0


def test_bad_inputs_raise():
    m = toy_dit_xs()
    x, caps = _batch(2)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(2, 3, 8, 8), torch.rand(2), text_context(caps))
    with pytest.raises(ValueError, match="context batch"):
        m(torch.randn(3, 3, 16, 16), torch.rand(3), text_context(caps))
    with pytest.raises(ValueError, match="ref must be"):
        ToyContext(V.tokenize(caps), torch.randn(3, 3, 16, 16))


def test_save_load_identical(tmp_path):
    """save_pretrained → from_pretrained (local folder) reproduces outputs bit for bit."""
    m = _live_xs()
    x, caps = _batch(4)
    ctx = teacher_context(caps, x)
    xt, s = torch.randn(4, 3, 16, 16), torch.rand(4)
    m.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "config.json").is_file()
    m2 = ToyDiT.from_pretrained(tmp_path / "m").eval()
    assert m2.config == m.config
    with torch.no_grad():
        assert torch.equal(m(xt, s, ctx), m2(xt, s, ctx))
        assert torch.equal(m(xt, s, ctx.text_only()), m2(xt, s, ctx.text_only()))
    e = ToyEvaluator()
    e.save_pretrained(tmp_path / "e")
    e2 = ToyEvaluator.from_pretrained(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(e.features(x), e2.features(x))
    assert set(e(x)) == set(HEADS)


def test_offline_loading(tmp_path):
    """Loading a local folder works with HF_HUB_OFFLINE=1 (no network call is attempted)."""
    _live_xs().save_pretrained(tmp_path / "m")
    code = (
        "import torch; from toy_models.models.dit import ToyDiT; "
        f"m = ToyDiT.from_pretrained(r'{tmp_path / 'm'}'); print(sum(p.numel() for p in m.parameters()))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) > 0


@pytest.mark.parametrize("route", ["tokens", "encoder"])
def test_output_depends_on_reference(route):
    """Swapping the references of a batch changes the outputs (both routes); each sample's
    output depends only on its own reference; a text-only context ignores reference data."""
    m = _live_xs()
    x, caps = _batch(4)
    xt, s = torch.randn(4, 3, 16, 16), torch.rand(4)
    with torch.no_grad():
        a = m(xt, s, teacher_context(caps, x, route))
        perm = torch.tensor([1, 0, 2, 3])
        b = m(xt, s, teacher_context(caps, x[perm], route))
        assert not torch.allclose(a[:2], b[:2])
        assert torch.allclose(a[2:], b[2:], atol=1e-5)
        t1 = m(xt, s, text_context(caps))
        t2 = m(xt, s, teacher_context(caps, x[perm]).text_only())
        assert torch.equal(t1, t2)
        assert not torch.allclose(t1, a)


def test_sampling_deterministic_and_bounded():
    """Sampling with the same seed is reproducible; results are clamped to [-1, 1]."""
    m = _live_xs()
    _, caps = _batch(5)
    a = sample(m, text_context(caps), steps=4, seed=3, batch_size=2)
    b = sample(m, text_context(caps), steps=4, seed=3)
    assert a.shape == (5, 3, 16, 16)
    assert torch.allclose(a, b, atol=1e-5)
    assert a.abs().max() <= 1


def test_context_helpers():
    x, caps = _batch(4)
    c = teacher_context(caps, x)
    assert c[1:3].batch_size == 2 and c[0].batch_size == 1
    assert c.repeat(3).batch_size == 12 and torch.equal(c.repeat(3).ref[:3], x[:1].expand(3, -1, -1, -1))
    assert ToyContext.cat([c, c]).batch_size == 8
    with pytest.raises(ValueError):
        ToyContext.cat([c, c.text_only()])
    assert c.to("cpu").has_ref and not c.text_only().has_ref


def test_deepened_model_computes_the_source_function():
    """Blocks added by load_deepened are the identity (adaLN-Zero), so a deepened model's
    velocity equals the shallower source's, for text-only and reference contexts; anything
    but depth (and the parameter-free position options) must match."""
    from toy_models.models.dit import load_deepened

    src = _live_xs(3)
    deep = toy_dit_xs(depth=src.config.depth + 2).eval()
    load_deepened(deep, src)
    x, caps = _batch(3)
    xt, s = torch.randn(3, 3, 16, 16), torch.rand(3)
    with torch.no_grad():
        for ctx in (text_context(caps), teacher_context(caps, x)):
            assert torch.equal(deep(xt, s, ctx), src(xt, s, ctx))
    with pytest.raises(ValueError, match="only depth may grow"):
        load_deepened(toy_dit_xs(hidden=32, depth=4), src)
    with pytest.raises(ValueError, match="only depth may grow"):
        load_deepened(toy_dit_xs(depth=1), src)
