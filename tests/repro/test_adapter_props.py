"""Property tests of the FLUX.2 packing helpers against the pipeline's own static methods, and of
the adapters' conventions on the real (tiny) transformers.

* patchify/pack/ids equal ``Flux2KleinPipeline``'s, and unpack∘pack, unpatchify∘patchify are the
  identity for any shape;
* the Z-Image adapter is exactly ``−transformer(x, 1 − σ)`` per sample, and batching ragged
  captions gives the same velocities as one sample at a time;
* the adapters reject wrongly shaped inputs with messages naming the expected shape.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from paper_repro.adapters import (
    Flux2Velocity,
    ZImageVelocity,
    flux2_latent_ids,
    flux2_pack,
    flux2_patchify,
    flux2_reference_ids,
    flux2_text_ids,
    flux2_unpack,
    flux2_unpatchify,
)


@given(b=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 99))
def test_flux2_packing_equals_pipeline_and_round_trips(b, c, h, w, seed):
    from diffusers import Flux2KleinPipeline as P

    x = torch.randn(b, c, 2 * h, 2 * w, generator=torch.Generator().manual_seed(seed))
    p = flux2_patchify(x)
    assert torch.equal(p, P._patchify_latents(x))
    assert torch.equal(flux2_unpatchify(p), x) and torch.equal(P._unpatchify_latents(p), x)
    tok = flux2_pack(p)
    assert torch.equal(tok, P._pack_latents(p))
    assert torch.equal(flux2_unpack(tok, h, w), p)
    ids = flux2_latent_ids(h, w)
    assert torch.equal(ids, P._prepare_latent_ids(p)[0])
    assert torch.equal(P._unpack_latents_with_ids(tok, ids.unsqueeze(0).expand(b, -1, -1), h, w), p)
    assert torch.equal(flux2_text_ids(7), P._prepare_text_ids(torch.zeros(1, 7, 3))[0])
    refs = [torch.zeros(1, 4, h, w), torch.zeros(1, 4, w, h)]
    assert torch.equal(flux2_reference_ids([(h, w), (w, h)]), P._prepare_image_ids(refs)[0])


def test_zimage_adapter_is_negated_output_at_one_minus_sigma_and_batch_consistent():
    from paper_repro.tiny import tiny_zimage_transformer

    tr = tiny_zimage_transformer()
    g = torch.Generator().manual_seed(0)
    caps = [torch.randn(5, 32, generator=g), torch.randn(40, 32, generator=g)]  # 40 > 32: two pad blocks
    x = torch.randn(2, 16, 4, 6, generator=g)
    sigma = torch.tensor([0.9, 0.3])
    v = ZImageVelocity(tr, caps)(x, sigma)
    with torch.no_grad():
        for i in range(2):
            out = tr([x[i, :, None]], torch.tensor([1.0 - sigma[i].item()]), [caps[i]], return_dict=False)[0][0]
            torch.testing.assert_close(v[i], -out[:, 0], atol=1e-5, rtol=1e-5)
            single = ZImageVelocity(tr, [caps[i]])(x[i:i + 1], sigma[i:i + 1])
            torch.testing.assert_close(v[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_flux2_adapter_is_output_at_sigma():
    from paper_repro.tiny import tiny_flux2_transformer

    tr = tiny_flux2_transformer(joint_attention_dim=16)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 5, 16, generator=g)
    x = torch.randn(2, 6, 4, generator=g)  # 2x3 token grid
    sigma = torch.tensor([0.7, 0.7])
    v = Flux2Velocity(tr, emb, 2, 3)(x, sigma)
    with torch.no_grad():
        out = tr(hidden_states=x, encoder_hidden_states=emb, timestep=sigma, img_ids=flux2_latent_ids(2, 3)[None],
                 txt_ids=flux2_text_ids(5)[None], return_dict=False)[0]
    torch.testing.assert_close(v, out)


def test_adapters_reject_bad_shapes():
    from paper_repro.tiny import tiny_flux2_transformer, tiny_zimage_transformer

    z = ZImageVelocity(tiny_zimage_transformer(), [torch.randn(3, 32)])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        z(torch.randn(1, 16, 4), torch.ones(1))
    with pytest.raises(ValueError, match="sigma must have shape"):
        z(torch.randn(1, 16, 4, 4), torch.ones(2))
    with pytest.raises(ValueError, match="caption features bound"):
        z(torch.randn(2, 16, 4, 4), torch.ones(2))
    f = Flux2Velocity(tiny_flux2_transformer(joint_attention_dim=16), torch.randn(1, 5, 16), 2, 2)
    with pytest.raises(ValueError, match=r"\(B, 4, C'\)"):
        f(torch.randn(1, 6, 4), torch.ones(1))
