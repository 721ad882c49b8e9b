"""The toy's placement-free teacher context (``toy_models.finetune.reference``)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toy_models.world import data as D
from toy_models.world import vocab as V
from toy_models.models.context import ToyContext
from toy_models.finetune.reference import background, foreground_centroid, placement_matched_teacher, shift_images


def _spec(cx: float, cy: float, shape: str = "square") -> D.Spec:
    return D.Spec(shape=shape, color="red", bg="white", size="small", cx=cx, cy=cy)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.floats(6.5, 9.5), st.floats(6.5, 9.5), st.integers(-2, 2), st.integers(-2, 2))
def test_shift_moves_the_foreground_centroid_by_the_shift(cx, cy, dy, dx):
    """Translating an image by (dy, dx) moves its foreground centroid by exactly (dy, dx)
    while the shape stays inside the image; the background estimate is the bg colour."""
    img = D.render_batch([_spec(cx, cy)])
    bg = background(img)
    assert torch.allclose(bg, img[:, :, 0, 0])
    c0, ok0 = foreground_centroid(img, bg)
    c1, ok1 = foreground_centroid(shift_images(img, torch.tensor([[dy, dx]])), bg)
    assert ok0.all() and ok1.all()
    torch.testing.assert_close(c1 - c0, torch.tensor([[float(dy), float(dx)]]), atol=1e-4, rtol=0)


def test_empty_image_has_no_foreground():
    """A flat image has no foreground (and the wrapper then leaves the reference in place)."""
    flat = torch.full((1, 3, 16, 16), 0.5)
    _, ok = foreground_centroid(flat, background(flat))
    assert not ok.any()


def test_teacher_sees_the_target_moved_to_the_students_layout():
    """At any state, the wrapped teacher receives the target translated so that its
    foreground centroid lands (to the pixel) on the centroid of the student's x0 prediction;
    the caption is unchanged, the raw reference is not modified, and a student without
    foreground leaves the reference where it was."""
    target = D.render_batch([_spec(5.0, 5.0, "ell"), _spec(6.0, 10.0, "ell")])
    drawn = D.render_batch([_spec(10.0, 9.0), _spec(6.0, 10.0, "ell")])  # where the student draws
    sigma = torch.tensor([1.0, 0.5])
    x = torch.randn(2, 3, 16, 16)
    tokens = V.tokenize([f"small red {V.SHAPE_TOKEN} on white"] * 2)
    student = lambda x, s, c: (x - drawn) / s.view(-1, 1, 1, 1)  # noqa: E731  -> x0 = drawn
    seen = {}

    def teacher(x, s, c):
        seen["ctx"] = c
        return torch.zeros_like(x)

    wrapped = placement_matched_teacher(teacher, student, ToyContext(tokens))
    tctx = ToyContext(tokens, target.clone(), "tokens")
    wrapped(x, sigma, tctx)
    moved = seen["ctx"].ref
    bg = background(target)
    c_moved, _ = foreground_centroid(moved, bg)
    c_drawn, _ = foreground_centroid(drawn, bg)
    assert (c_moved - c_drawn).abs().max() <= 0.5 + 1e-4
    assert torch.equal(seen["ctx"].tokens, tokens) and torch.equal(tctx.ref, target)
    assert torch.equal(moved[1], target[1])  # already in place: no shift

    flat = torch.ones(2, 3, 16, 16)  # a white student x0: no foreground on a white background
    placement_matched_teacher(teacher, lambda x, s, c: (x - flat) / s.view(-1, 1, 1, 1), ToyContext(tokens))(x, sigma, tctx)
    assert torch.equal(seen["ctx"].ref, target)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(cx=st.floats(3.0, 12.0), cy=st.floats(3.0, 12.0), tx=st.floats(3.0, 12.0), ty=st.floats(3.0, 12.0),
       period=st.sampled_from([1, 2, 3]))
def test_moved_target_shift_is_whole_periods(cx, cy, tx, ty, period):
    """With ``period = p`` the reference is translated by a multiple of p pixels on each axis
    (grid-anchored fill patterns stay in phase), the nearest such multiple to the centroid
    offset: the moved centroid is within p/2 pixel (+ rounding of the centroids) of the student's."""
    target = D.render_batch([_spec(tx, ty, "square")])
    drawn = D.render_batch([_spec(cx, cy, "square")])
    tokens = V.tokenize(["small red square on white"])
    seen = {}

    def teacher(x, s, c):
        seen["ref"] = c.ref
        return torch.zeros_like(x)

    student = lambda x, s, c: (x - drawn) / s.view(-1, 1, 1, 1)  # noqa: E731
    wrapped = placement_matched_teacher(teacher, student, ToyContext(tokens), period=period)
    wrapped(torch.zeros(1, 3, 16, 16), torch.tensor([1.0]), ToyContext(tokens, target, "tokens"))
    bg = background(target)
    c_t, _ = foreground_centroid(target, bg)
    c_m, _ = foreground_centroid(seen["ref"], bg)
    c_d, _ = foreground_centroid(drawn, bg)
    shift = (c_m - c_t).round()
    assert torch.all(shift.remainder(period) == 0), (shift, period)
    assert (c_m - c_d).abs().max() <= period / 2 + 1e-3
