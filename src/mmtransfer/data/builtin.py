"""Built-in sets, dispatched by name: the emoji and glyph renderings and the digit archives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DataConfig, DataError, cache_root

if TYPE_CHECKING:
    from datasets import DatasetDict

    from .staging import Staged

EMOJI_SETS = ("openmoji", "noto-emoji")
EMOJI_SPLITS = ("train", "validation", "test", "unseen", "all")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_BUILDER_VERSION = 1


@dataclass(frozen=True)
class DigitSet:
    """One digit archive and its splits: split -> (image array, label array)."""

    file: str
    splits: dict[str, tuple[str, str]]
    note: str


DIGIT_SETS: dict[str, DigitSet] = {
    "mnist5k": DigitSet("mnist5k.npz", {"train": ("images", "labels")}, "all 5,000 labelled images are the source's training set"),
    "usps": DigitSet(
        "usps.npz",
        {"train": ("images", "labels"), "test": ("images", "labels")},
        "train (all 9,298 images, for adaptation; ignore the labels) and test (the same images, with labels, for accuracy)",
    ),
    "mnist_m": DigitSet(
        "mnist_m.npz",
        {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")},
        "train (10,000 images, for adaptation) and test (9,001 labelled images, for accuracy)",
    ),
}


def stage_builtin(config: DataConfig) -> "Staged":
    if config.name in EMOJI_SETS:
        return _stage_emoji(config)
    if config.name == "glyphs":
        return _stage_glyphs(config)
    return _stage_digits(config)


def _stage_glyphs(config: DataConfig) -> "Staged":
    from datasets import concatenate_datasets

    from .glyph_sets import GLYPH_SPLITS, build_glyph_set
    from .staging import Staged

    split = config.split or "train"
    if split not in (*GLYPH_SPLITS, "all"):
        raise DataError(f"The built-in set 'glyphs' has no split '{split}'; its splits are: {', '.join(GLYPH_SPLITS)}, all.")
    dd, _ = build_glyph_set(config)
    ds = concatenate_datasets([dd[s] for s in GLYPH_SPLITS]) if split == "all" else dd[split]
    return Staged(ds, config.name, split, [], None, trusted=True)


def _stage_emoji(config: DataConfig) -> "Staged":
    from datasets import concatenate_datasets

    from .emoji_sets import SPLITS, build_emoji_set
    from .staging import Staged

    split = config.split or "train"
    if split not in EMOJI_SPLITS:
        raise DataError(f"The built-in set '{config.name}' has no split '{split}'; its splits are: {', '.join(EMOJI_SPLITS)}.")
    dd, _ = build_emoji_set(config.name, config)
    ds = concatenate_datasets([dd[s] for s in SPLITS]) if split == "all" else dd[split]
    return Staged(ds, config.name, split, [], None, trusted=True)


def emoji_build_info(name: str = "openmoji", **options: Any) -> dict[str, Any]:
    """What the cached build of an emoji set holds: counts per split, and each emoji left out with the reason.

    Example:
        >>> info = emoji_build_info("openmoji")   # builds the cache on first use
        >>> sorted(info["rows"])
        ['test', 'train', 'unseen', 'validation']
    """
    from .config import make_config
    from .emoji_sets import build_emoji_set

    if name not in EMOJI_SETS:
        raise DataError(f"'{name}' is not an emoji set; the emoji sets are: {', '.join(EMOJI_SETS)}.")
    _, info = build_emoji_set(name, make_config(name, None, options))
    return info


def _stage_digits(config: DataConfig) -> "Staged":
    from .cache import cached_build, file_fingerprint
    from .digit_files import digit_archive
    from .staging import Staged

    spec = DIGIT_SETS[config.name]
    split = config.split or "train"
    if split not in spec.splits:
        raise DataError(
            f"The built-in set '{config.name}' has no split '{split}'; its splits are: {', '.join(spec.splits)} ({spec.note})."
        )
    path = digit_archive(config, config.name, spec.file)
    inputs = {"builder": DIGITS_BUILDER_VERSION, "file": file_fingerprint(path), "splits": spec.splits}

    def build() -> tuple["DatasetDict", dict[str, Any]]:
        return _build_digits(config.name, path, spec)

    dd, _ = cached_build(cache_root(config), config.name, inputs, build)
    return Staged(dd[split], config.name, split, [], None, trusted=True)


def _build_digits(name: str, path: Path, spec: DigitSet) -> tuple["DatasetDict", dict[str, Any]]:
    import numpy as np
    from datasets import Dataset, DatasetDict

    from .sources import encode_arrays
    from .staging import standard_features

    parts = {}
    with np.load(path, allow_pickle=False) as archive:
        for split, (image_key, label_key) in spec.splits.items():
            for key in (image_key, label_key):
                if key not in archive.files:
                    raise DataError(f"{path} has no array '{key}' (it holds {', '.join(archive.files)}); is it the right file?")
            labels = archive[label_key]
            if labels.min() < 0 or labels.max() > 9:
                raise DataError(f"{path}: '{label_key}' holds labels outside 0-9 ({labels.min()}..{labels.max()}).")
            records = encode_arrays(archive[image_key], labels, DIGIT_NAMES, path, name)
            records.pop("class_names_of")
            parts[split] = Dataset.from_dict(records, features=standard_features(True, DIGIT_NAMES))
    info = {"kind": name, "file": str(path), "rows": {s: len(d) for s, d in parts.items()}}
    return DatasetDict(parts), info
