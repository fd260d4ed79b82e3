"""The built-in glyphs set: printed digits and letters with their names, split by font."""

from __future__ import annotations

import numpy as np
import pytest

from mmtransfer.data import DataError, load
from mmtransfer.data import glyph_sets as G

try:
    from data_helpers import shared_cache_dir
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import shared_cache_dir


def test_classes_name_digits_like_the_digit_sets():
    from mmtransfer.data.builtin import DIGIT_NAMES

    classes = G.glyph_classes()
    assert [c.name for c in classes[:10]] == DIGIT_NAMES
    assert len(classes) == 62 and len({c.name for c in classes}) == 62
    assert "the digit 7" in classes[7].captions and classes[10].name == "capital letter A"


def test_fonts_split_into_disjoint_train_validation_and_test():
    fonts = G.glyph_fonts()
    splits = {f.stem: G.split_of_font(f) for f in fonts}
    assert {s for s in splits.values()} == {"train", "validation", "test"}
    assert all(splits[n] == "test" for n in G.TEST_FONTS) and all(splits[n] == "validation" for n in G.VALIDATION_FONTS)


def test_views_are_deterministic_and_differ():
    font = G.glyph_fonts()[0]
    a, b = G.render_glyph("7", font, 0), G.render_glyph("7", font, 0)
    assert a.size == (G.CANVAS, G.CANVAS) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    others = [np.asarray(G.render_glyph("7", font, v)) for v in range(1, 4)]
    assert all(not np.array_equal(np.asarray(a), o) for o in others)


def test_unknown_split_is_named():
    with pytest.raises(DataError, match="splits are: train, validation, test, all"):
        load("glyphs", split="unseen")


@pytest.mark.slow
def test_glyphs_build_with_every_class_in_every_split(request, tmp_path_factory):
    cache = shared_cache_dir(request, tmp_path_factory)
    sizes = {}
    for split in ("train", "validation", "test"):
        ds = load("glyphs", split=split, cache_dir=cache)
        sizes[split] = len(ds)
        assert set(ds["label"]) == set(range(62))
        assert set(ds["font"]).isdisjoint(G.TEST_FONTS if split != "test" else G.VALIDATION_FONTS)
    n_fonts = len(G.glyph_fonts())
    assert sizes["test"] == 62 * len(G.TEST_FONTS) * G.VIEWS["test"]
    assert sizes["train"] == 62 * (n_fonts - len(G.TEST_FONTS) - len(G.VALIDATION_FONTS)) * G.VIEWS["train"]
