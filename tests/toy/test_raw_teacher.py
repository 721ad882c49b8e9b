"""The raw-target teacher diagnostic (``toy_models.eval.evaluate``): its placement measure
tells a copy of the target's placement from a placement chosen by the noise."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from toy_models.eval import evaluate as E
from toy_models.world import data as D
from toy_models.world.concepts import concept_specs


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000))
def test_placement_overlap_tells_a_placement_copy_from_a_moved_one(seed):
    """Images that copy the target (placement included) overlap the target's mask far more
    than a shifted mask (an exact render scores ≈ 0.8: anti-aliased edges); the same shapes
    drawn at fresh random placements overlap both about equally."""
    targets = concept_specs("ell", 32, seed)
    copied = E.placement_overlap(D.render_batch(targets), targets, seed)
    assert copied["iou_target"] > 0.7 and copied["iou_target"] > copied["iou_shifted"] + 0.4
    rng = np.random.default_rng(seed)
    moved = [t.replace(cx=c[0], cy=c[1]) for t in targets for c in [D.random_placement(rng, t.size)]]
    free = E.placement_overlap(D.render_batch(moved), targets, seed + 1)
    assert abs(free["iou_target"] - free["iou_shifted"]) < 0.15
    assert free["iou_target"] < copied["iou_target"] - 0.4


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000))
def test_family_domain_specs_are_fresh_training_family_domains(seed):
    """The family-domain row's targets are known shapes, each in its own procedural domain of
    the training family (never the held-out pastel, never within its hole), and the same
    seed gives the same targets."""
    from toy_models.world.vocab import KNOWN_SHAPES

    specs = E.family_domain_specs(24, seed)
    assert specs == E.family_domain_specs(24, seed)
    assert all(s.shape in KNOWN_SHAPES for s in specs)
    assert len({s.domain for s in specs}) == len(specs)
    pastel = D.PALETTES["pastel"]
    for s in specs:
        assert s.domain.startswith("fam:")
        assert D.palette_distance_between(D.domain_palette(s.domain), pastel) >= D.DOMAIN_HOLDOUT


def test_evaluate_cli_prints_every_row_and_saves_the_grid(tmp_path, capsys):
    """``python -m toy_models.eval.evaluate --model F --grid P`` prints the raw-target rows for
    the three held-out concepts plus text-only and jittered-copy rows, and saves 6 rows of 8
    images (targets over samples, per concept)."""
    from toy_models.models.dit import toy_dit_xs

    folder = tmp_path / "m"
    toy_dit_xs().save_pretrained(folder)
    grid = tmp_path / "g.png"
    E.main(["--model", str(folder), "--n", "8", "--steps", "2", "--grid", str(grid)])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"ell", "hstripe", "pastel", "text_only", "copy_trained_jittered", "family_domain"}
    assert {"acc", "shape_acc", "shape_acc_silhouette", "iou_target", "iou_shifted"} <= set(out["ell"])
    assert set(out["family_domain"]) == {"shape_acc", "shape_acc_clean"}
    w, h = Image.open(grid).size
    assert abs(h / w - 6 / 8) < 0.05, (w, h)


def test_evaluate_cli_rows_subset(tmp_path, capsys):
    """``--rows pastel,text_only`` measures only those rows (and grids only the pastel
    concept); an unknown row name is refused, naming it and the valid choices."""
    from toy_models.models.dit import toy_dit_xs

    folder = tmp_path / "m"
    toy_dit_xs().save_pretrained(folder)
    grid = tmp_path / "g.png"
    E.main(["--model", str(folder), "--n", "4", "--steps", "2", "--rows", "pastel,text_only", "--grid", str(grid)])
    assert set(json.loads(capsys.readouterr().out)) == {"pastel", "text_only"}
    w, h = Image.open(grid).size
    assert abs(h / w - 2 / 8) < 0.05, (w, h)
    with pytest.raises(SystemExit):
        E.main(["--model", str(folder), "--rows", "pastel,stripes"])
    assert "unknown ['stripes']" in capsys.readouterr().err


def test_evaluate_cli_negative_is_applied(tmp_path, capsys, monkeypatch):
    """``--negative keep_reference`` guides with the domain-keeping c⁻ (the default is the
    distillation's, ``drop_reference``); an unknown name is refused."""
    from toy_models.models import guidance as G
    from toy_models.models.dit import toy_dit_xs

    folder = tmp_path / "m"
    toy_dit_xs().save_pretrained(folder)
    seen = []
    for name, fn in list(G.NEGATIVES.items()):
        monkeypatch.setitem(G.NEGATIVES, name, lambda ctx, fn=fn, name=name: seen.append(name) or fn(ctx))
    args = ["--model", str(folder), "--n", "2", "--steps", "1", "--guidance", "3", "--rows", "pastel"]
    E.main(args)
    E.main(args + ["--negative", "keep_reference"])
    assert seen == ["drop_reference", "keep_reference"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        E.main(args + ["--negative", "none"])
    assert "--negative" in capsys.readouterr().err
