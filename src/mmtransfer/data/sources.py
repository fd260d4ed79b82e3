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

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import BUILTIN_DATASETS, DataConfig, DataError
from .report import Problem
from .staging import (
    CAPTION_COLUMN_GUESSES,
    IMAGE_COLUMN_GUESSES,
    LABEL_COLUMN_GUESSES,
    METADATA_FILES,
    SPLIT_FOLDER_NAMES,
    TABLE_EXTENSIONS,
    RootFence,
    Staged,
    _captions_of,
    _is_candidate_image,
    _is_missing,
    _Labels,
    _pick_column,
    _records_to_dataset,
    column_values,
    readable_name,
    standard_features,
)
from .shards import is_stream
from .tables import stage_caption_table

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("mmtransfer.data")


# ----------------------------------------------------------------------------- staging


# -- caption tables -------------------------------------------------------------


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


# -- folders ------------------------------------------------------------------------


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or ((folder / "dataset_info.json").is_file() and (folder / "state.json").is_file())


def is_plain_class_folder(folder: Path) -> bool:
    """True for a folder whose sub-folders can only be classes: no split sub-folder, metadata table or saved data set."""
    if _is_saved_dataset(folder) or any((folder / m).is_file() for m in METADATA_FILES):
        return False
    return not any(d.is_dir() and d.name.lower() in SPLIT_FOLDER_NAMES for d in folder.iterdir())


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
                "Pass one of those as split=..., or split=None (split: null in a recipe's data section) to read the folder as it is."
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
    out = _image_column(ds, image_col, config, base_dir, where, bad_rows)

    if caption_cols:
        captions: list[list[str]] = [[] for _ in range(n)]
        caption_issues: dict[int, list[str]] = {}
        for col in caption_cols:
            for i, value in enumerate(column_values(ds, col)):
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
        labels, class_names = _label_column(ds, label_col, config, where, bad_rows)
        out = out.add_column("label", labels, feature=ClassLabel(names=class_names))
        if not caption_cols:
            out = out.add_column("captions", [[class_names[j]] for j in labels], feature=List(Value("string")))

    domains = [str(v) if not _is_missing(v) else source for v in column_values(ds, domain_col)] if domain_col else [source] * n
    out = out.add_column("domain", domains, feature=Value("string"))
    out = out.add_column("image_id", list(range(n)), feature=Value("int64"))
    order = ["image", "captions", "label", "domain", "image_id"]
    out = out.select_columns([c for c in order if c in out.column_names])
    problems.extend(p for i in sorted(bad_rows) for p in bad_rows[i])
    return Staged(out, source, split, problems)


def _image_column(ds: "Dataset", image_col: str, config: DataConfig, base_dir: Path | None, where: str,
                  bad_rows: dict[int, list[Problem]]) -> "Dataset":
    """The ``image`` column: an Image feature as it is, or file paths resolved against the root and checked."""
    from datasets import Image, Value

    feats = ds.features
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
        for i, value in enumerate(column_values(ds, image_col)):
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
    return out


def _label_column(ds: "Dataset", label_col: str, config: DataConfig, where: str,
                  bad_rows: dict[int, list[Problem]]) -> tuple[list[int], list[str]]:
    """Class indices of every row (0 for a bad row, which is reported) and the class names."""
    from datasets import ClassLabel, Value

    lf = ds.features[label_col]
    values = column_values(ds, label_col)
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
    return labels, class_names


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
    names = records.pop("class_names_of")
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
    out["class_names_of"] = names
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
    if is_stream(name):
        raise DataError(f"'{name}' names shards, read as a stream while training: only data.train of "
                        "scripts/finetune_captions.py (without a tasks section) reads them (docs/data.md, \"Caption data "
                        "bigger than memory\"). Give this section a folder or table, e.g. the one the shards were written from.")
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


