"""2-D rotary positions (``ToyDiTConfig.rope``): what makes them a *relative* position code."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from toy_models.models.dit import ToyDiT, toy_dit_xs
from toy_models.models.context import teacher_context
from toy_models.models.layers import Attention, apply_rope, rope_2d, rope_angles
from toy_models.world import data as D
from toy_models.world import vocab as V

coord = st.integers(-12, 12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(py=coord, px=coord, ry=coord, rx=coord, sy=coord, sx=coord, seed=st.integers(0, 2**16))
def test_rope_score_depends_only_on_relative_position(py, px, ry, rx, sy, sx, seed):
    """A query at p and a key at r score the same as at p + s and r + s, for any shift s:
    ⟨R(p)q, R(r)k⟩ = ⟨q, R(r − p)k⟩."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(p, r):
        cq, sq = rope_angles(torch.tensor([p[0]]), torch.tensor([p[1]]), 16)
        ck, sk = rope_angles(torch.tensor([r[0]]), torch.tensor([r[1]]), 16)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    a = score((py, px), (ry, rx))
    b = score((py + sy, px + sx), (ry + sy, rx + sx))
    assert torch.allclose(a, b, atol=1e-4), (a, b)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(y=coord, x=coord, seed=st.integers(0, 2**16))
def test_rope_is_a_rotation(y, x, seed):
    """RoPE preserves each token's norm, and position (0, 0) is the identity."""
    v = torch.randn(1, 1, 1, 32, generator=torch.Generator().manual_seed(seed))
    c, s = rope_angles(torch.tensor([y]), torch.tensor([x]), 32)
    assert torch.allclose(apply_rope(v, c, s).norm(), v.norm(), rtol=1e-5)
    c0, s0 = rope_angles(torch.tensor([0]), torch.tensor([0]), 32)
    assert torch.equal(apply_rope(v, c0, s0), v)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(sy=st.integers(-5, 5), sx=st.integers(-5, 5), seed=st.integers(0, 2**16))
def test_rope_attention_is_invariant_to_a_common_shift(sy, sx, seed):
    """Self-attention with RoPE sees token *offsets* only: moving every token by the same s
    leaves its output unchanged (token features fixed)."""
    torch.manual_seed(seed)
    attn = Attention(32, 4)
    x = torch.randn(2, 12, 32)
    ys, xs = torch.randint(0, 6, (12,)), torch.randint(0, 6, (12,))
    a = attn(x, rope=rope_angles(ys, xs, 8))
    b = attn(x, rope=rope_angles(ys + sy, xs + sx, 8))
    assert torch.allclose(a, b, atol=1e-4)
    if (sy, sx) == (0, 0):
        return
    # the positions do matter: swapping two tokens' positions changes the output
    ys2 = ys.clone(); ys2[0], ys2[1] = ys[1] + 1, ys[0] + 3
    assert not torch.allclose(a, attn(x, rope=rope_angles(ys2, xs, 8)), atol=1e-4)


def test_rope_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(4, 4, 6)
    attn = Attention(16, 2)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(1, 3, 16), kv=torch.randn(1, 5, 16), rope=rope_2d(1, 3, 8))


def test_rope_model_loads_v1_weights_and_uses_the_reference_offset():
    """A rope model has the same parameters as a v1 model (a v1 folder loads into it), its
    output differs from the same weights without RoPE, and rope=False is the v1 default."""
    assert ToyDiT().config.rope is False
    torch.manual_seed(0)
    m0 = toy_dit_xs().eval()
    with torch.no_grad():
        for p in m0.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    m1 = toy_dit_xs(rope=True).eval()
    m1.load_state_dict(m0.state_dict())
    sp = D.specs(0, 2)
    x = D.render_batch(sp)
    ctx = teacher_context([D.caption(s, shape_word=V.SHAPE_TOKEN) for s in sp], x)
    xt, sig = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        assert not torch.allclose(m0(xt, sig, ctx), m1(xt, sig, ctx), atol=1e-5)
