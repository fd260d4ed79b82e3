"""What every source is staged into: the standard columns, the fence that keeps paths inside a data set,
column guessing, captions and labels as rows give them.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .config import DataConfig, DataError
from .report import Problem

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("mmtransfer.data")


IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico .jp2 .avif".split()
)


# Files that live next to images and are not samples.
NON_IMAGE_EXTENSIONS = frozenset(".txt .md .json .jsonl .csv .tsv .yaml .yml .ini .db .parquet .arrow .py .npz".split())


TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")


METADATA_FILES = ("metadata.jsonl", "metadata.csv")


IMAGE_COLUMN_GUESSES = ("file_name", "image", "image_path", "img", "img_path", "filename", "file", "path", "image_file")


CAPTION_COLUMN_GUESSES = ("captions", "caption", "text", "sentences", "sentence", "description", "alt_text", "title")


LABEL_COLUMN_GUESSES = ("label", "labels")


SPLIT_FOLDER_NAMES = frozenset({"train", "test", "validation", "valid", "val", "dev", "unseen", "all"})


@dataclass
class Staged:
    """A source in the standard layout, before its images are scanned.

    ``problems`` with a ``row`` mark rows of ``dataset`` that ``skip`` leaves out;
    the others were already kept out of ``dataset`` (or only lost a caption).
    """

    dataset: "Dataset"
    source: str
    split: str | None
    problems: list[Problem] = field(default_factory=list)
    # Where each row came from ("metadata.csv line 4"); None: "row i".
    wheres: list[str] | None = None
    # Built here from trusted inputs: never scanned.
    trusted: bool = False

    def where(self, row: int) -> str:
        return self.wheres[row] if self.wheres is not None else f"row {row}"


def standard_features(has_captions: bool, class_names: list[str] | None, has_domain: bool = True) -> Any:
    from datasets import ClassLabel, Features, Image, List, Value

    feats: dict[str, Any] = {"image": Image()}
    if has_captions:
        feats["captions"] = List(Value("string"))
    if class_names is not None:
        feats["label"] = ClassLabel(names=list(class_names))
    if has_domain:
        feats["domain"] = Value("string")
    feats["image_id"] = Value("int64")
    return Features(feats)


def readable_name(raw: str) -> str:
    """A folder or CLDR-style name as people write it: ``golden_retriever`` -> ``golden retriever``."""
    text = raw.replace("_", " ").replace("\u2019", "'")
    return re.sub(r"\s+", " ", text).strip(" :")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class RootFence:
    """Keeps image paths inside a data set's folder (unless ``allow_outside_root``).

    Only the resolved name is compared (``..`` and links followed), never the
    file out there, so the answer and its message are the same whether or not
    something exists outside.
    """

    def __init__(self, root: Path, config: DataConfig) -> None:
        self.root = root
        self.real_root = os.path.realpath(root)
        self.open = config.allow_outside_root

    def reason(self, what: str = "file") -> str:
        return (f"the path leads outside the data set folder {self.root}, so it is not read; move the {what} into "
                "that folder, or set allow_outside_root=True to read files elsewhere")

    def keeps_out(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` resolves outside the root and outside paths are not allowed."""
        if self.open:
            return False
        real = os.path.realpath(path)
        try:
            return os.path.commonpath([real, self.real_root]) != self.real_root
        except ValueError:  # another drive (Windows): outside
            return True


def _captions_of(value: Any) -> tuple[list[str], list[str]]:
    """A cell -> (captions, reasons for the bad entries)."""
    if _is_missing(value):
        return [], ["the caption is missing (null)"]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        return [], ["the caption list is empty"]
    good, bad = [], []
    for item in items:
        if _is_missing(item):
            bad.append("the caption is missing (null)")
        elif isinstance(item, (dict, list, tuple)):
            bad.append(f"the caption is a {type(item).__name__}, not text")
        elif not str(item).strip():
            bad.append("the caption is empty")
        else:
            good.append(str(item).strip())
    return good, bad


def _pick_column(columns: Iterable[str], wanted: str | None, guesses: tuple[str, ...], what: str, option: str, source: str, required: bool = True) -> str | None:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{source} has no {what} column '{wanted}' (set by {option}). Its columns are: {', '.join(columns) or 'none'}."
            )
        return wanted
    lower = {c.lower(): c for c in columns}
    for guess in guesses:
        if guess in lower:
            return lower[guess]
    if required:
        raise DataError(
            f"{source} has no {what} column: none of {', '.join(guesses)} is among its columns "
            f"({', '.join(columns) or 'none'}). Name it with {option}=..."
        )
    return None


class _Labels:
    """Maps raw label values to class indices, noting values outside the class list."""

    def __init__(self, class_names: list[str] | None, values: list[Any], column: str, source: str) -> None:
        present = [v for v in values if not _is_missing(v)]
        self.column = column
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in present)
        if class_names is not None:
            self.names = list(class_names)
        elif ints:
            top = max(present, default=-1)
            self.names = [str(i) for i in range(top + 1)]
            logger.info("%s: integer labels without class_names; naming classes '0'..'%d'.", source, top)
        else:
            self.names = sorted({str(v) for v in present})
        self.index = {name: i for i, name in enumerate(self.names)}
        self.by_int = ints

    def __call__(self, value: Any) -> tuple[int | None, str | None]:
        if _is_missing(value) or value == "":
            return None, f"the label in column '{self.column}' is missing"
        if isinstance(value, int) and not isinstance(value, bool):
            if value == -1:
                return None, f"the label in column '{self.column}' is missing (-1)"
            if 0 <= value < len(self.names):
                return value, None
            return None, f"label {value} is outside the class list (0..{len(self.names) - 1}, {len(self.names)} classes)"
        text = str(value)
        if text in self.index:
            return self.index[text], None
        if text.lstrip("-").isdigit() and self.by_int:
            return self(int(text))
        shown = ", ".join(self.names[:8]) + (", ..." if len(self.names) > 8 else "")
        return None, f"label '{text}' is not one of the {len(self.names)} class names ({shown})"


def _records_to_dataset(records: list[dict[str, Any]], has_captions: bool, class_names: list[str] | None) -> "Dataset":
    from datasets import Dataset

    columns: dict[str, list[Any]] = {"image": [r["image"] for r in records]}
    if has_captions:
        columns["captions"] = [r["captions"] for r in records]
    if class_names is not None:
        columns["label"] = [r["label"] for r in records]
    columns["domain"] = [r["domain"] for r in records]
    columns["image_id"] = list(range(len(records)))
    return Dataset.from_dict(columns, features=standard_features(has_captions, class_names))


def column_values(ds: "Dataset", name: str) -> list[Any]:
    return ds.select_columns([name]).to_dict()[name]


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


def _is_candidate_image(path: Path) -> bool:
    """Every visible file except known non-image companions: the scan then flags what PIL cannot read."""
    name = path.name
    if name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini"):
        return False
    return path.suffix.lower() not in NON_IMAGE_EXTENSIONS
