"""Metrics: Fréchet distance properties, palette distance, copy IoU."""

import torch
from hypothesis import given, settings, strategies as st

from toy_models.world import data as D
from toy_models.eval import metrics as M

FAST = settings(max_examples=20, deadline=None, derandomize=True)


@FAST
@given(st.integers(0, 10_000), st.floats(-3, 3))
def test_frechet_identity_symmetry_shift(seed, shift):
    """FD(f, f) = 0; FD is symmetric; shifting one set by a constant vector c adds |c|²."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(300, 6, generator=g)
    b = torch.randn(300, 6, generator=g) * 1.3
    assert abs(M.frechet_distance(a, a)) < 1e-8
    assert abs(M.frechet_distance(a, b) - M.frechet_distance(b, a)) < 1e-6
    c = torch.full((6,), shift)
    assert abs(M.frechet_distance(a, a + c) - 6 * shift**2) < 1e-5 * (1 + 6 * shift**2)


def test_frechet_matches_closed_form_gaussians():
    """For diagonal covariances FD = |Δμ|² + Σ (σ1 − σ2)²."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200_000, 2, generator=g) * torch.tensor([1.0, 2.0])
    b = torch.randn(200_000, 2, generator=g) * torch.tensor([3.0, 1.0]) + torch.tensor([1.0, 0.0])
    assert abs(M.frechet_distance(a, b) - (1 + 4 + 1)) < 0.1


def test_palette_distance_grows_with_noise_and_blur():
    """Clean renders are near the palette; noise and blur both move pixels off it."""
    x = D.render_batch(D.specs(0, 64))
    clean = M.palette_distance(x)
    noisy = M.palette_distance((x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1))
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert clean < 0.04
    assert noisy > 2 * clean and M.palette_distance(blur) > 1.5 * clean


def test_copy_iou():
    """Real renders of a glyph match their own coverage well, and a shifted glyph does not."""
    sp = D.specs(1, 32, shapes=("glyph",))
    x = D.render_batch(sp)
    assert M.copy_iou(x, sp) > 0.75
    assert M.copy_iou(torch.roll(x, 5, dims=3), sp) < 0.5


def test_toy_fid_equals_torchmetrics_fid_with_custom_features():
    """Our Fréchet distance equals torchmetrics' FrechetInceptionDistance when the same
    module is its custom feature extractor (the documented equivalence of toy-FID)."""
    import pytest

    FrechetInceptionDistance = pytest.importorskip("torchmetrics.image.fid").FrechetInceptionDistance

    class Feat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(12, 5)

        def forward(self, x):
            return self.lin(x.float().flatten(1))

    f = Feat()
    fid = FrechetInceptionDistance(feature=f, normalize=False, input_img_size=(3, 2, 2))
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(400, 3, 2, 2, generator=g), torch.randn(400, 3, 2, 2, generator=g) * 1.5 + 0.3
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        ours = M.frechet_distance(f(fake), f(real))
    assert abs(float(fid.compute()) - ours) < 1e-4 * max(1.0, ours)


class _FlatEmbed:
    """An 'evaluator' whose features are the flattened pixels (for exact expectations)."""

    @staticmethod
    def embed(x):
        return x.flatten(1)


@FAST
@given(st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_feature_distance_identity_scale_and_known_angles(seed, scale):
    """DINO-D analogue: 0 for a sample equal to its target, unchanged by rescaling a sample's
    features (cosine), 1 for orthogonal and 2 for opposite features, and each sample is
    compared with its own target (the pair order matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, 2, 2, generator=g)
    ev = _FlatEmbed()
    assert abs(M.feature_distance(ev, x, x)) < 1e-12
    assert abs(M.feature_distance(ev, scale * x, x)) < 1e-12
    assert abs(M.feature_distance(ev, -x, x) - 2.0) < 1e-12
    e = torch.zeros(2, 3, 2, 2)
    e[0, 0, 0, 0], e[1, 0, 0, 1] = 1.0, 1.0
    assert abs(M.feature_distance(ev, e, e.flip(0)) - 1.0) < 1e-12
    assert M.feature_distance(ev, x, x.roll(1, 0)) > 0.1


def test_feature_distance_rejects_unpaired_inputs():
    """Samples and targets must pair up one to one."""
    import pytest

    with pytest.raises(ValueError, match="pairs"):
        M.feature_distance(_FlatEmbed(), torch.zeros(3, 3, 2, 2), torch.zeros(4, 3, 2, 2))



@FAST
@given(st.integers(0, 10_000))
def test_silhouette_is_the_same_in_every_domain(seed):
    """``silhouette`` reads only where the shape is: a solid spec rendered in the base palette,
    the held-out pastel and two fresh procedural domains re-renders to the same image (within
    1e-4), because a pixel's distance from the background is its coverage times one
    shape/background contrast, which the normalisation divides out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    specs = [s.replace(style="solid", fill=None) for s in D.specs(seed, 16)]
    base = M.silhouette(D.render_batch(specs))
    for dom in ("pastel", D.random_domain(rng), D.random_domain(rng)):
        other = M.silhouette(D.render_batch([s.replace(domain=dom) for s in specs]))
        assert (other - base).abs().max().item() < 1e-4, dom


def test_silhouette_keeps_a_flat_image_flat():
    """An image without a shape stays empty (base white), and a faint blemish below the least
    contrast a domain may have (0.12) stays faint instead of being stretched into a shape."""
    flat = torch.full((1, 3, 16, 16), 0.3)
    white = M.silhouette(flat)
    assert (white - white[:, :, :1, :1]).abs().max().item() == 0.0
    blemish = flat.clone()
    blemish[:, :, 8, 8] += 0.04  # RGB distance 0.02·√3 ≈ 0.035 in [0, 1] units: α ≈ 0.29
    full = 2 * (torch.tensor(D.PALETTES["base"]["blue"]) - torch.tensor(D.PALETTES["base"]["white"])).abs().max()
    faint = (M.silhouette(blemish) - white).abs().max()
    assert 0.2 * full < faint < 0.4 * full
