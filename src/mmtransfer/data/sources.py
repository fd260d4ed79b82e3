"""Sources a user already has, read into one ``datasets.Dataset`` layout.

Every source ends as a data set with the standard columns (those it has):

- ``image``: a ``datasets.Image()`` feature, decoded to PIL lazily;
- ``captions``: a list of strings, at least one per image;
- ``label``: a ``ClassLabel`` whose names are readable class names (for prompts);
- ``domain``: the domain's name;
- ``image_id``: a stable integer per image (its row before bad samples were left out).

Reading happens in two stages. *Staging* turns the source into that layout and
notes every structural problem (a row naming a missing file, an empty caption,
an unknown label) with the row it came from. *Finishing* scans the images
(``verify``), then either stops with the first problems named (``error``) or
leaves the bad samples out and counts them (``skip``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .config import BUILTIN_DATASETS, DataConfig, DataError
from .report import DataReport, Problem

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
PROGRESS_ABOVE = 300  # scans longer than this show a progress bar by default
SAMPLE_SEED = 0  # sample="balanced" takes the same rows every run, so runs stay comparable
SIGNATURE_BLOCK = 64 * 1024  # a file's content signature hashes its first and last this many bytes


# ----------------------------------------------------------------------------- staging


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


# -- caption tables -------------------------------------------------------------

# Tables are read with errors="surrogateescape": a byte that is not UTF-8 becomes one of these
# code points (never produced by valid UTF-8), so the row holding it can be named and left out.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _not_utf8(value: Any) -> str | None:
    """Why a cell, row or item read with surrogateescape is not UTF-8 text, or None when it is."""
    if isinstance(value, str):
        found = _ESCAPED_BYTE.search(value)
        if found is None:
            return None
        return (f"it holds the byte 0x{ord(found.group()) - 0xDC00:02x}, which is not UTF-8 text; save the table "
                "as UTF-8 (it may have been written as Latin-1 or Windows-1252)")
    parts = [*value, *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
    return next((reason for part in parts if (reason := _not_utf8(part))), None)


def _read_table(path: Path) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """Rows of a CSV/TSV/JSONL/JSON table as (where, row or None, error)."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                return
            reason = _not_utf8(list(reader.fieldnames))
            if reason:  # without readable column names no row can be read
                raise DataError(f"{path} line {reader.line_num} (the header): {reason}.")
            for row in reader:
                if None in row:  # more cells than header names
                    yield f"{name} line {reader.line_num}", None, f"the row has more cells than the header ({len(reader.fieldnames)} columns)"
                    continue
                reason = _not_utf8(list(row.values()))
                yield f"{name} line {reader.line_num}", None if reason else row, reason
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8-sig", errors="surrogateescape") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                reason = _not_utf8(line)
                if reason:
                    yield f"{name} line {number}", None, reason
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{name} line {number}", None, f"the line is not valid JSON ({err.msg})"
                    continue
                if not isinstance(row, dict):
                    yield f"{name} line {number}", None, "the line is not a JSON object"
                    continue
                yield f"{name} line {number}", row, None
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig", errors="surrogateescape"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}).") from None
        if isinstance(data, dict):
            # {"file.png": "caption"} or {"images": [...]} are both common; accept the first.
            if all(isinstance(v, (str, list)) for v in data.values()):
                data = [{"file_name": k, "text": v} for k, v in data.items()]
            else:
                lists = [v for v in data.values() if isinstance(v, list)]
                data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise DataError(f"{path} must hold a JSON list of objects (one per row), or a mapping file -> caption.")
        for number, row in enumerate(data):
            if not isinstance(row, dict):
                yield f"{name} item {number}", None, "the item is not a JSON object"
                continue
            reason = _not_utf8(row)
            yield f"{name} item {number}", None if reason else row, reason
    else:
        raise DataError(f"{path}: caption tables must be .csv, .tsv, .jsonl or .json files.")


def stage_caption_table(path: Path, config: DataConfig, source: str, image_root: Path | None = None) -> Staged:
    """A table of (image file, caption(s)[, label]) rows; several rows per file add captions."""
    rows = list(_read_table(path))
    problems: list[Problem] = []
    good_rows = [(w, r) for w, r, err in rows if r is not None]
    for where, _, err in rows:
        if err is not None:
            problems.append(Problem(where, None, err))
    if not good_rows and not problems:
        raise DataError(f"{path} holds no rows. Write one row per (image, caption): e.g. file_name,text.")
    columns: list[str] = []
    for _, row in good_rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    table = f"The table {path}"
    image_col = _pick_column(columns, config.image_column, IMAGE_COLUMN_GUESSES, "image", "image_column", table)
    if isinstance(config.caption_column, list):
        caption_cols = [_pick_column(columns, c, CAPTION_COLUMN_GUESSES, "caption", "caption_column", table) for c in config.caption_column]
    else:
        found = _pick_column(columns, config.caption_column, CAPTION_COLUMN_GUESSES, "caption", "caption_column", table,
                             required=config.label_column is None and not any(c.lower() in LABEL_COLUMN_GUESSES for c in columns))
        caption_cols = [found] if found else []
    label_col = _pick_column(columns, config.label_column, LABEL_COLUMN_GUESSES, "label", "label_column", table, required=False)
    domain_col = _pick_column(columns, config.domain_column, ("domain",), "domain", "domain_column", table, required=False)
    root = image_root or (Path(config.image_root).expanduser() if config.image_root else path.parent)
    fence = RootFence(root, config)
    labels = _Labels(config.class_names, [r.get(label_col) for _, r in good_rows], label_col, table) if label_col else None

    # file -> one record; rows naming the same file add captions.
    records: dict[str, dict[str, Any]] = {}
    caption_problems: dict[str, list[Problem]] = {}
    for where, row in good_rows:
        value = row.get(image_col)
        if _is_missing(value) or not str(value).strip():
            problems.append(Problem(where, None, f"no image file is named in column '{image_col}'"))
            continue
        name = str(value).strip()
        full = Path(name).expanduser()
        full = full if full.is_absolute() else root / full
        key = os.path.normpath(full)
        # Before any look at the file, so that an outside path reads the same whether or not it exists.
        if fence.keeps_out(key):
            problems.append(Problem(where, name, fence.reason()))
            continue
        if not os.path.isfile(key):
            problems.append(Problem(where, name, f"the file does not exist (looked for {key}); fix the path or image_root, or add the file"))
            continue
        rec = records.get(key)
        if rec is None:
            rec = records[key] = {"image": key, "captions": [], "label": None, "domain": source, "wheres": [], "file": name, "bad": None}
        rec["wheres"].append(where)
        for col in caption_cols:
            if col not in row:
                caption_problems.setdefault(key, []).append(Problem(where, name, f"the row has no column '{col}' (no caption)"))
                continue
            good, bad = _captions_of(row[col])
            rec["captions"].extend(good)
            for reason in bad:
                caption_problems.setdefault(key, []).append(Problem(where, name, f"{reason} in column '{col}'"))
        if labels is not None:
            index, reason = labels(row.get(label_col))
            if reason:
                rec["bad"] = rec["bad"] or Problem(where, name, reason)
            elif rec["label"] is not None and rec["label"] != index:
                rec["bad"] = rec["bad"] or Problem(
                    where, name, f"conflicting labels for one image: '{labels.names[rec['label']]}' and '{labels.names[index]}'"
                )
            else:
                rec["label"] = index
        if domain_col and not _is_missing(row.get(domain_col)):
            rec["domain"] = str(row[domain_col])

    kept: list[dict[str, Any]] = []
    for key, rec in records.items():
        cps = caption_problems.get(key, [])
        if rec["bad"] is not None:
            problems.append(rec["bad"])
            continue
        if caption_cols and not rec["captions"]:
            for p in cps:
                p.reason += " (the image has no other caption, so it is left out)"
            problems.extend(cps or [Problem(", ".join(rec["wheres"]), rec["file"], "the image has no caption")])
            continue
        problems.extend(cps)
        kept.append(rec)
    _note_unlisted_images(path, records, root)
    if not caption_cols and labels is not None:
        # A labelled table without captions: the class name is the caption (as for class folders).
        for rec in kept:
            rec["captions"] = [labels.names[rec["label"]]] if rec["label"] is not None else []
    dataset = _records_to_dataset(kept, bool(caption_cols) or labels is not None, labels.names if labels else None)
    wheres = [_join_wheres(r["wheres"]) for r in kept]
    problems.sort(key=lambda p: _row_number(p.where))
    return Staged(dataset, source, config.split, problems, wheres)


def _row_number(where: str) -> int:
    found = re.search(r"(?:line|item|row|index)s? (\d+)", where)
    return int(found.group(1)) if found else 0


def _join_wheres(wheres: list[str]) -> str:
    if len(wheres) == 1:
        return wheres[0]
    name = wheres[0].rsplit(" line ", 1)[0]
    if all(w.startswith(name + " line ") for w in wheres):
        numbers = [w.rsplit(" ", 1)[1] for w in wheres]
        shown = ", ".join(numbers[:6]) + (", ..." if len(numbers) > 6 else "")
        return f"{name} lines {shown}"
    return ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")


def _note_unlisted_images(table: Path, records: dict[str, Any], root: Path) -> None:
    """Imagefolder metadata: say so when image files next to it are not named in it."""
    if table.name not in METADATA_FILES:
        return
    unlisted = [p for p in _image_files(root) if os.path.normpath(p) not in records]
    if unlisted:
        logger.warning(
            "%d image file(s) in %s are not named in %s and are not used (first: %s).",
            len(unlisted), root, table.name, ", ".join(os.path.relpath(p, root) for p in unlisted[:3]),
        )


def _image_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / name)
    return out


# -- labelled image folders ------------------------------------------------------------


def stage_class_folders(root: Path, config: DataConfig, source: str) -> Staged:
    """``root/<class>/<image>``: one sub-folder per class (the imagefolder convention)."""
    fence = RootFence(root, config)
    problems: list[Problem] = []
    class_dirs = []
    for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        # os.walk follows a linked top folder: one leading out (to "/", say) would walk the disk.
        if fence.keeps_out(d):
            problems.append(Problem(d.name + "/", None, fence.reason("class folder")))
        else:
            class_dirs.append(d)
    if not class_dirs and problems:
        raise DataError(
            f"Every class folder of {root} ({', '.join(p.where for p in problems[:5])}) is a link leading outside it, so "
            f"none is read; move the images into {root}, or set allow_outside_root=True to read them where they are."
        )
    if not class_dirs:
        raise DataError(
            f"The folder {root} has no class sub-folders and no metadata.jsonl/metadata.csv. Put images in one "
            "sub-folder per class (root/cat/1.png), or add a metadata.jsonl with file_name and text columns."
        )
    readable = [readable_name(d.name) for d in class_dirs]
    if config.class_names is not None:
        if len(config.class_names) != len(class_dirs):
            raise DataError(
                f"class_names has {len(config.class_names)} names but {root} has {len(class_dirs)} class folders "
                f"({', '.join(d.name for d in class_dirs)})."
            )
        names = list(config.class_names)
    else:
        names = readable
    for stray in sorted(p for p in root.iterdir() if p.is_file() and _is_candidate_image(p)):
        problems.append(Problem(stray.name, stray.name, "the image is not inside a class folder, so it has no label"))
    records, wheres = [], []
    for label, (folder, name) in enumerate(zip(class_dirs, names)):
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                path = Path(dirpath) / fname
                if not _is_candidate_image(path):
                    continue
                rel = os.path.relpath(path, root)
                if fence.keeps_out(path):  # a linked file; linked sub-folders are not walked (os.walk's default)
                    problems.append(Problem(rel, rel, fence.reason()))
                    continue
                records.append({"image": str(path), "captions": [name], "label": label, "domain": source})
                wheres.append(rel)
    if not records and not problems:
        raise DataError(f"The class folders of {root} ({', '.join(d.name for d in class_dirs[:5])}, ...) hold no image files.")
    dataset = _records_to_dataset(records, True, names)
    return Staged(dataset, source, config.split, problems, wheres)


def _is_candidate_image(path: Path) -> bool:
    """Every visible file except known non-image companions: the scan then flags what PIL cannot read."""
    name = path.name
    if name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini"):
        return False
    return path.suffix.lower() not in NON_IMAGE_EXTENSIONS


# -- folders ------------------------------------------------------------------------


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


def _looks_like_split_folders(folder: Path) -> list[str]:
    subdirs = [d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]
    has_files = any(_is_candidate_image(p) for p in folder.iterdir() if p.is_file())
    if subdirs and not has_files and all(d.lower() in SPLIT_FOLDER_NAMES for d in subdirs):
        return sorted(subdirs)
    return []


def stage_folder(folder: Path, config: DataConfig, source: str) -> Staged:
    if _is_saved_dataset(folder):
        return stage_saved(folder, config, source)
    if config.split is not None:
        sub = folder / config.split
        if sub.is_dir():
            if RootFence(folder, config).keeps_out(sub):
                raise DataError(
                    f"The split folder {sub} is a link leading outside {folder}, so it is not read; move it into "
                    f"{folder}, or set allow_outside_root=True to read it where it is."
                )
            staged = stage_folder(sub, dataclasses.replace(config, split=None), source)
            staged.split = config.split
            return staged
        if not any((folder / m).is_file() for m in METADATA_FILES):
            others = sorted(d.name for d in folder.iterdir() if d.is_dir())
            raise DataError(
                f"The folder {folder} has no split sub-folder '{config.split}' (sub-folders: {', '.join(others) or 'none'}). "
                "Pass one of those as split=..., or split=None to read the folder as it is."
            )
    for meta in METADATA_FILES:
        if (folder / meta).is_file():
            return stage_caption_table(folder / meta, config, source, image_root=folder)
    splits = _looks_like_split_folders(folder)
    if splits:
        raise DataError(
            f"The folder {folder} holds split folders ({', '.join(splits)}). Pass split='{splits[0]}' (or another of them)."
        )
    return stage_class_folders(folder, config, source)


# -- saved and hub data sets ------------------------------------------------------------------


def stage_saved(folder: Path, config: DataConfig, source: str) -> Staged:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    from datasets import DatasetDict, load_from_disk

    try:
        loaded = load_from_disk(str(folder))
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "cannot read it"
        raise DataError(f"Cannot read the saved data set {folder}: {err}") from None
    split = config.split
    if isinstance(loaded, DatasetDict):
        names = list(loaded)
        if split is None:
            split = "train" if "train" in loaded else (names[0] if len(names) == 1 else None)
            if split is None:
                raise DataError(f"The saved data set {folder} has splits {', '.join(names)}; pass split=... to pick one.")
        if split not in loaded:
            raise DataError(f"The saved data set {folder} has no split '{split}'; its splits are: {', '.join(names)}.")
        ds = loaded[split]
    else:
        ds = loaded
        if split not in (None, "train", "all"):
            raise DataError(f"The saved data set {folder} is a single Dataset without splits; leave split unset.")
    return standardize(ds, config, source, split, base_dir=folder)


def stage_hub(name: str, config: DataConfig) -> Staged:
    """A Hugging Face hub data set, for users who are online."""
    import datasets

    split = config.split or "train"
    try:
        ds = datasets.load_dataset(name, config.hub_config, split=split, cache_dir=None)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"'{name}' is not a built-in data set ({', '.join(BUILTIN_DATASETS)}) nor an existing path, and loading it "
            f"from the Hugging Face hub failed: {first}"
        ) from None
    return standardize(ds, config, name, split, base_dir=None)


def standardize(ds: "Dataset", config: DataConfig, source: str, split: str | None, base_dir: Path | None) -> Staged:
    """Map a ``datasets.Dataset``'s columns onto the standard ones, noting bad rows."""
    from datasets import ClassLabel, Image, List, Value

    where = f"The data set {source}"
    cols = ds.column_names
    feats = ds.features
    image_col = config.image_column
    if image_col is None:
        typed = [c for c in cols if isinstance(feats[c], Image)]
        image_col = typed[0] if typed else None
    image_col = _pick_column(cols, image_col, IMAGE_COLUMN_GUESSES, "image", "image_column", where)
    if isinstance(config.caption_column, list):
        caption_cols = [_pick_column(cols, c, CAPTION_COLUMN_GUESSES, "caption", "caption_column", where) for c in config.caption_column]
    else:
        found = _pick_column(cols, config.caption_column, CAPTION_COLUMN_GUESSES, "caption", "caption_column", where, required=False)
        caption_cols = [found] if found else []
    label_col = _pick_column(cols, config.label_column, LABEL_COLUMN_GUESSES, "label", "label_column", where, required=False)
    domain_col = _pick_column(cols, config.domain_column, ("domain",), "domain", "domain_column", where, required=False)
    if not caption_cols and label_col is None:
        raise DataError(
            f"{where} has neither a caption column ({', '.join(CAPTION_COLUMN_GUESSES)}) nor a label column "
            f"(label). Its columns are {', '.join(cols)}; name them with caption_column=... or label_column=..."
        )

    problems: list[Problem] = []
    bad_rows: dict[int, list[Problem]] = {}
    n = len(ds)
    out = ds.select_columns([image_col])
    if image_col != "image":
        out = out.rename_column(image_col, "image")
    image_feature = feats[image_col]
    if not isinstance(image_feature, Image):
        if not (isinstance(image_feature, Value) and image_feature.dtype in ("string", "large_string")):
            raise DataError(
                f"{where}: the image column '{image_col}' holds {image_feature}, not images or file paths. "
                "Name the right column with image_column=..."
            )
        # File paths: resolve relative ones and check that they exist.
        root = Path(config.image_root).expanduser() if config.image_root else base_dir
        paths = []
        for i, value in enumerate(_column(ds, image_col)):
            if _is_missing(value) or not str(value).strip():
                bad_rows.setdefault(i, []).append(Problem(f"row {i}", None, f"no image file is named in column '{image_col}'", i))
                paths.append("")
                continue
            p = Path(str(value)).expanduser()
            if not p.is_absolute() and root is not None:
                p = root / p
            if not p.is_file():
                bad_rows.setdefault(i, []).append(Problem(f"row {i}", str(value), f"the file does not exist (looked for {p})", i))
            paths.append(str(p))
        from datasets import Dataset, Features

        out = Dataset.from_dict({"image": paths}, features=Features({"image": Image()}))
    elif image_feature.decode is False:
        out = out.cast_column("image", Image())

    if caption_cols:
        captions: list[list[str]] = [[] for _ in range(n)]
        caption_issues: dict[int, list[str]] = {}
        for col in caption_cols:
            for i, value in enumerate(_column(ds, col)):
                good, bad = _captions_of(value)
                captions[i].extend(good)
                for reason in bad:
                    caption_issues.setdefault(i, []).append(f"{reason} in column '{col}'")
        for i, reasons in caption_issues.items():
            if captions[i]:
                problems.extend(Problem(f"row {i}", None, r) for r in reasons)
            else:
                bad_rows.setdefault(i, []).append(Problem(f"row {i}", None, "; ".join(reasons) + " (no caption left, so the sample is left out)", i))
        out = out.add_column("captions", captions, feature=List(Value("string")))

    class_names = None
    if label_col is not None:
        lf = feats[label_col]
        values = _column(ds, label_col)
        if isinstance(lf, ClassLabel):
            class_names = list(config.class_names) if config.class_names is not None else [readable_name(x) if x.isidentifier() else x for x in lf.names]
            if len(class_names) != lf.num_classes:
                raise DataError(f"class_names has {len(class_names)} names but the label column '{label_col}' has {lf.num_classes} classes.")
            mapper = _Labels(class_names, [], label_col, where)
        else:
            if isinstance(lf, Value) and lf.dtype.startswith(("int", "uint")) and config.class_names is None:
                logger.warning("%s: label column '%s' holds integers and no class_names were given.", where, label_col)
            mapper = _Labels(config.class_names, values, label_col, where)
            class_names = mapper.names
        labels: list[int] = []
        for i, value in enumerate(values):
            index, reason = mapper(value)
            if reason:
                bad_rows.setdefault(i, []).append(Problem(f"row {i}", None, reason, i))
                index = 0  # placeholder; the row is reported and never used as it is
            labels.append(index)
        out = out.add_column("label", labels, feature=ClassLabel(names=class_names))
        if not caption_cols:
            out = out.add_column("captions", [[class_names[j]] for j in labels], feature=List(Value("string")))

    domains = [str(v) if not _is_missing(v) else source for v in _column(ds, domain_col)] if domain_col else [source] * n
    out = out.add_column("domain", domains, feature=Value("string"))
    out = out.add_column("image_id", list(range(n)), feature=Value("int64"))
    order = ["image", "captions", "label", "domain", "image_id"]
    out = out.select_columns([c for c in order if c in out.column_names])
    problems.extend(p for i in sorted(bad_rows) for p in bad_rows[i])
    return Staged(out, source, split, problems)


def _column(ds: "Dataset", name: str) -> list[Any]:
    return ds.select_columns([name]).to_dict()[name]


# -- npz archives ----------------------------------------------------------------------


def stage_npz(path: Path, config: DataConfig, source: str, class_names: list[str] | None = None, domain: str | None = None) -> Staged:
    """A NumPy archive of uint8 images (N, H, W) or (N, H, W, C) and optional integer labels."""
    import numpy as np

    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"Cannot read the NumPy archive {path}: {err}") from None
    with archive:
        keys = list(archive.files)
        split = config.split
        image_key = config.image_column
        if image_key is None:
            guesses = ([f"{split}_images", f"x_{split}"] if split else []) + ["images", "x", "X", "data"]
            image_key = next((k for k in guesses if k in keys), None)
            if image_key is None:
                split_keys = sorted({k[: -len("_images")] for k in keys if k.endswith("_images")})
                hint = f" It has splits {', '.join(split_keys)}: pass split=..." if split_keys and not split else ""
                raise DataError(f"{path} has no image array (looked for {', '.join(guesses)}; it holds {', '.join(keys)}).{hint} Or set image_column=...")
        elif image_key not in keys:
            raise DataError(f"{path} has no array '{image_key}' (image_column); it holds {', '.join(keys)}.")
        label_key = config.label_column
        if label_key is None:
            guesses = ([f"{split}_labels", f"y_{split}"] if split else []) + ["labels", "y", "Y", "targets"]
            if image_key.endswith("_images"):
                guesses.insert(0, image_key[: -len("_images")] + "_labels")
            label_key = next((k for k in guesses if k in keys), None)
        elif label_key not in keys:
            raise DataError(f"{path} has no array '{label_key}' (label_column); it holds {', '.join(keys)}.")
        images = archive[image_key]
        labels = archive[label_key] if label_key else None
    records = encode_arrays(images, labels, class_names or config.class_names, path, domain or source)
    names = records.pop("_class_names")
    from datasets import Dataset

    ds = Dataset.from_dict(records, features=standard_features(labels is not None, names))
    wheres = None
    problems: list[Problem] = []
    if labels is not None and names is not None:
        # Out-of-range labels were set to -1 by encode_arrays: report them by index.
        bad = [i for i, v in enumerate(records["label"]) if v == -1]
        problems = [Problem(f"{path.name} index {i}", None, f"label {int(labels[i])} is outside the class list (0..{len(names) - 1})", i) for i in bad]
    return Staged(ds, source, split, problems, wheres)


def encode_arrays(images: Any, labels: Any, class_names: list[str] | None, path: Path, domain: str) -> dict[str, Any]:
    """uint8 arrays -> PNG bytes per image (+ labels, captions from class names)."""
    import io

    import numpy as np
    from PIL import Image

    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
        raise DataError(f"{path}: images must be (N, H, W) grey or (N, H, W, 3|4) colour arrays, got shape {images.shape}.")
    if images.dtype != np.uint8:
        if np.issubdtype(images.dtype, np.floating) and float(np.nanmax(images)) <= 1.0:
            images = np.round(np.clip(images, 0, 1) * 255)
        images = np.clip(images, 0, 255).astype(np.uint8)
    mode = "L" if images.ndim == 3 else {3: "RGB", 4: "RGBA"}[images.shape[-1]]
    encoded = []
    for arr in images:
        buf = io.BytesIO()
        Image.fromarray(arr, mode=mode).save(buf, format="PNG", compress_level=1)
        encoded.append({"bytes": buf.getvalue(), "path": None})
    out: dict[str, Any] = {"image": encoded}
    names = None
    if labels is not None:
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if len(labels) != len(images):
            raise DataError(f"{path}: {len(images)} images but {len(labels)} labels.")
        names = list(class_names) if class_names is not None else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        ok = (labels >= 0) & (labels < len(names))
        lab = np.where(ok, labels, -1)
        out["captions"] = [[names[v]] if v >= 0 else [] for v in lab.tolist()]
        out["label"] = lab.tolist()
    out["domain"] = [domain] * len(images)
    out["image_id"] = list(range(len(images)))
    out["_class_names"] = names
    return out


# ----------------------------------------------------------------------------- dispatch


def _looks_like_path(name: str) -> bool:
    """True for names no hub id looks like: ./x, /x, ~/x, a/b/c, x.csv, C:\\x."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).suffix.lower() in TABLE_EXTENSIONS + (".npz", ".arrow", ".parquet")
    )


def unknown_name_error(name: str) -> DataError:
    import difflib

    close = difflib.get_close_matches(name, list(BUILTIN_DATASETS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    listing = "; ".join(f"{k} ({v})" for k, v in BUILTIN_DATASETS.items())
    return DataError(
        f"Unknown data set '{name}': it is not a built-in name and no file or folder '{name}' exists.{hint} "
        f"Built-in sets: {listing}. Otherwise pass an existing path (image folder, caption table, "
        "saved data set, .npz), or a Hugging Face hub id as 'owner/name' or 'hf:name'."
    )


def stage(config: DataConfig) -> Staged:
    """Read the source named by ``config.name`` into the standard layout (not yet scanned)."""
    name = config.name
    if name in BUILTIN_DATASETS:
        from .builtin import stage_builtin

        return stage_builtin(config)
    if name.startswith(("hf:", "hub:")):
        return stage_hub(name.split(":", 1)[1], config)
    path = Path(name).expanduser()
    if path.exists():
        source = str(path)
        if path.is_dir():
            return stage_folder(path, config, source=source)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return stage_npz(path, config, source=path.stem)
        if suffix in TABLE_EXTENSIONS:
            return stage_caption_table(path, config, source=source)
        raise DataError(
            f"Cannot read '{path}': a file source must be a caption table (.csv, .tsv, .jsonl, .json) or a .npz archive; "
            "folders may hold images in class sub-folders, a metadata.jsonl/.csv, or a save_to_disk data set."
        )
    if "/" in name and not _looks_like_path(name) and not _hub_offline():
        return stage_hub(name, config)
    raise unknown_name_error(name)


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ----------------------------------------------------------------------------- finishing


def scan_images(staged: Staged, verify: str, progress: bool | None, problems: list[Problem]) -> int:
    """Open (and decode) every image of ``staged``; append a problem per bad one. Returns the count checked."""
    from datasets import Image

    from .images import describe_source, image_problem

    ds = staged.dataset
    if "image" not in ds.column_names or len(ds) == 0:
        return 0
    raw = ds.cast_column("image", Image(decode=False))
    n = len(raw)
    bar = _progress(n, progress, f"Checking images of {_short(staged.source)}")
    checked = 0
    try:
        for start in range(0, n, 256):
            chunk = raw[start : start + 256]["image"]
            for offset, src in enumerate(chunk):
                row = start + offset
                reason = image_problem(src, verify)  # type: ignore[arg-type]
                checked += 1
                if reason:
                    file = describe_source(src) if src and src.get("path") else None
                    problems.append(Problem(staged.where(row), _relative(file, staged), reason, row))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return checked


def _short(source: str) -> str:
    return source if len(source) < 40 else "..." + source[-37:]


def _relative(file: str | None, staged: Staged) -> str | None:
    if file is None:
        return None
    base = staged.source if os.path.isdir(staged.source) else os.path.dirname(staged.source)
    try:
        rel = os.path.relpath(file, base) if base else file
    except ValueError:
        return file
    return file if rel.startswith("..") else rel


def _progress(total: int, progress: bool | None, desc: str) -> Any:
    show = progress if progress is not None else total > PROGRESS_ABOVE
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def read_name_list(value: list[str] | str, option: str) -> list[str]:
    """Class names given inline as a list, or as a text file with one name per line ("#": comment)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    path = Path(value)
    if not path.is_file():
        raise DataError(
            f"{option}: '{value}' is not a file. Give a list of class names, or a text file with one "
            "name per line (a relative path is read from the working directory)."
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def select_classes(staged: Staged, config: DataConfig) -> Staged:
    """Keep the rows of ``include_classes`` and drop those of ``exclude_classes`` (labels unchanged)."""
    if config.include_classes is None and config.exclude_classes is None:
        return staged
    import difflib

    ds = staged.dataset
    label = ds.features.get("label")
    if label is None or not hasattr(label, "names"):
        raise DataError(
            f"include_classes/exclude_classes select rows by class, but '{staged.source}' has no "
            "label column with class names; set label_column (and class_names for integer labels)."
        )
    ids = {name: i for i, name in enumerate(label.names)}

    def resolve(value: list[str] | str, option: str) -> set[int]:
        names = read_name_list(value, option)
        unknown = [n for n in names if n not in ids]
        if unknown:
            hints = [f"'{n}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(n, list(ids), n=1)) else "")
                     for n in unknown[:5]]
            raise DataError(
                f"{option}: {len(unknown)} of {len(names)} names are not classes of '{staged.source}': "
                f"{', '.join(hints)}{' ...' if len(unknown) > 5 else ''}. Class names are the label names, "
                "e.g. " + ", ".join(f"'{n}'" for n in label.names[:3]) + "."
            )
        return {ids[n] for n in names}

    keep = resolve(config.include_classes, "include_classes") if config.include_classes is not None else set(ids.values())
    if config.exclude_classes is not None:
        keep -= resolve(config.exclude_classes, "exclude_classes")
    labels = ds["label"]
    rows = [i for i, y in enumerate(labels) if y in keep]
    if not rows:
        raise DataError(f"include_classes/exclude_classes leave no rows of '{staged.source}' (split {staged.split}).")
    logger.info("Class selection keeps %d of %d rows (%d classes) of '%s'.",
                len(rows), len(labels), len({labels[i] for i in rows}), staged.source)
    return keep_rows(staged, rows)


def keep_rows(staged: Staged, rows: Sequence[int]) -> Staged:
    """``staged`` with only ``rows``, in that order: row problems and row names move with their rows."""
    position = {row: j for j, row in enumerate(rows)}
    problems = [p if p.row is None else dataclasses.replace(p, row=position[p.row]) for p in staged.problems
                if p.row is None or p.row in position]
    wheres = [staged.wheres[i] for i in rows] if staged.wheres is not None else None
    return Staged(staged.dataset.select(rows), staged.source, staged.split, problems, wheres, staged.trusted)


def take_sample(staged: Staged, config: DataConfig) -> Staged:
    """At most ``max_samples`` rows: the first N, or with ``sample="balanced"`` a seeded sample spread over the classes."""
    n = config.max_samples
    ds = staged.dataset
    if n is None or len(ds) <= n:
        return staged
    if config.sample == "balanced" and "label" in ds.column_names:
        return keep_rows(staged, balanced_rows(_column(ds, "label"), n, SAMPLE_SEED))
    return keep_rows(staged, range(n))


def balanced_rows(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """``n`` rows spread as evenly as the classes allow, in row order: round after round, one row per class.

    Within a class the rows are drawn at random, and when ``n`` is not a whole number of
    rounds a random set of classes gets the extra row (both seeded by ``seed``).
    """
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        by_class.setdefault(label, []).append(row)
    pools = [rng.sample(rows, len(rows)) for _, rows in sorted(by_class.items())]
    rng.shuffle(pools)
    # (round, class slot, row): sorting takes round 0 of every class, then round 1, ...
    ranked = sorted((depth, slot, row) for slot, pool in enumerate(pools) for depth, row in enumerate(pool))
    return sorted(row for _, _, row in ranked[:n])


def finish(staged: Staged, config: DataConfig, scan: bool = True) -> tuple["Dataset", DataReport]:
    """Select classes, take ``max_samples``, scan, then apply ``on_bad_sample``: the loaded data set and its report."""
    staged = take_sample(select_classes(staged, config), config)
    ds = staged.dataset
    problems = list(staged.problems)
    checked = 0
    verify = "none" if staged.trusted else config.verify
    if scan and verify != "none":
        checked = scan_images(staged, verify, config.progress, problems)
    skipped = 0
    if problems:
        if config.on_bad_sample == "error":
            raise DataError(bad_samples_message(staged.source, problems))
        drop = {p.row for p in problems if p.row is not None}
        if drop:
            ds = ds.select([i for i in range(len(ds)) if i not in drop])
        # Rows left out, plus caption rows (and rows that never became samples) dropped on their own.
        skipped = len(drop) + sum(1 for p in problems if p.row is None)
        logger.warning(
            "Skipped %d bad sample(s) of '%s' (on_bad_sample='skip'); first:\n%s",
            skipped, staged.source, "\n".join(f"  - {p}" for p in problems[:5]),
        )
    if not staged.trusted:  # built-in sets are generated from fingerprinted inputs, with their bytes in the table
        ds = with_content_fingerprint(ds)
    report = make_report(ds, staged, problems, skipped, checked, verify)
    return ds, report


def with_content_fingerprint(ds: "Dataset") -> "Dataset":
    """``ds`` with a fingerprint that also covers the contents of the image files it names.

    A data set of file paths is otherwise fingerprinted by its paths and captions
    alone, so caches keyed on ``ds._fingerprint`` (the image features on disk)
    would serve the features of images replaced under the same names. Images
    stored as bytes are in the table, and so in the fingerprint, already.
    """
    from datasets import Image

    if "image" not in ds.column_names or len(ds) == 0 or not isinstance(ds.features["image"], Image):
        return ds
    # Arrow columns: the bytes of embedded images are never copied into Python.
    refs = ds.select_columns(["image"]).cast_column("image", Image(decode=False)).flatten().with_format("arrow")[:]
    paths = refs.column("image.path").to_pylist()
    embedded = refs.column("image.bytes").is_valid().to_pylist()
    files = [(row, path) for row, (path, inline) in enumerate(zip(paths, embedded)) if path and not inline]
    if not files:
        return ds
    digest = hashlib.sha256(ds._fingerprint.encode())
    for row, path in files:
        digest.update(f"{row}\0{path}\0".encode())
        digest.update(file_signature(path))
    # datasets offers no public way to set it; every later transform derives its fingerprint from this one.
    ds._fingerprint = digest.hexdigest()[:16]
    return ds


def file_signature(path: str) -> bytes:
    """Size, modification time and a hash of the first and last 64 KiB (the whole of a small file)."""
    digest = hashlib.sha256()
    try:
        stat = os.stat(path)
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(path, "rb") as fh:
            if stat.st_size <= 2 * SIGNATURE_BLOCK:
                digest.update(fh.read())
            else:
                digest.update(fh.read(SIGNATURE_BLOCK))
                fh.seek(-SIGNATURE_BLOCK, os.SEEK_END)
                digest.update(fh.read(SIGNATURE_BLOCK))
    except OSError as err:  # gone or unreadable since the scan (or never scanned): a key of its own, not a crash
        digest.update(f"unreadable:{err.errno}".encode())
    return digest.digest()


def make_report(ds: "Dataset", staged: Staged, problems: list[Problem], skipped: int, checked: int, verify: str) -> DataReport:
    from datasets import ClassLabel

    num_captions = 0
    if "captions" in ds.column_names:
        num_captions = sum(len(c) for c in _column(ds, "captions"))
    label = ds.features.get("label")
    return DataReport(
        source=staged.source,
        split=staged.split,
        num_rows=len(ds),
        num_captions=num_captions,
        num_classes=label.num_classes if isinstance(label, ClassLabel) else None,
        checked_images=checked,
        verify=verify,
        problems=problems,
        skipped=skipped,
    )


def bad_samples_message(source: str, problems: list[Problem]) -> str:
    lines = [f"  - {p}" for p in problems[:5]]
    if len(problems) > 5:
        lines.append(f"  ... and {len(problems) - 5} more")
    noun = "bad sample" if len(problems) == 1 else "bad samples"
    return (
        f"Found {len(problems)} {noun} in '{source}':\n" + "\n".join(lines) + "\n"
        "Fix or remove these files/rows, or load with on_bad_sample='skip' to leave them out "
        "(they are counted in the load report). `python scripts/validate_data.py <data>` lists them all."
    )
