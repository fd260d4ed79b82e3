"""Caption tables (CSV, TSV, JSONL, JSON) and image folders with a metadata table: rows to records,
every bad row named by file and line.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from .config import DataConfig, DataError
from .report import Problem
from .staging import (
    CAPTION_COLUMN_GUESSES,
    IMAGE_COLUMN_GUESSES,
    LABEL_COLUMN_GUESSES,
    METADATA_FILES,
    RootFence,
    Staged,
    _captions_of,
    _image_files,
    _is_missing,
    _Labels,
    _pick_column,
    _records_to_dataset,
)

logger = logging.getLogger("mmtransfer.data")


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
    image_col, caption_cols, label_col, domain_col = _table_columns(columns, config, table)
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

    kept = _usable_records(records, caption_problems, bool(caption_cols), problems)
    _note_unlisted_images(path, records, root)
    if not caption_cols and labels is not None:
        # A labelled table without captions: the class name is the caption (as for class folders).
        for rec in kept:
            rec["captions"] = [labels.names[rec["label"]]] if rec["label"] is not None else []
    dataset = _records_to_dataset(kept, bool(caption_cols) or labels is not None, labels.names if labels else None)
    wheres = [_join_wheres(r["wheres"]) for r in kept]
    problems.sort(key=lambda p: _row_number(p.where))
    return Staged(dataset, source, config.split, problems, wheres)



def _table_columns(columns: list[str], config: DataConfig, table: str) -> tuple[str, list[str], str | None, str | None]:
    """The image column, the caption columns, the label and domain columns (None: absent) of a table."""
    image_col = _pick_column(columns, config.image_column, IMAGE_COLUMN_GUESSES, "image", "image_column", table)
    if isinstance(config.caption_column, list):
        caption_cols = [_pick_column(columns, c, CAPTION_COLUMN_GUESSES, "caption", "caption_column", table) for c in config.caption_column]
    else:
        found = _pick_column(columns, config.caption_column, CAPTION_COLUMN_GUESSES, "caption", "caption_column", table,
                             required=config.label_column is None and not any(c.lower() in LABEL_COLUMN_GUESSES for c in columns))
        caption_cols = [found] if found else []
    label_col = _pick_column(columns, config.label_column, LABEL_COLUMN_GUESSES, "label", "label_column", table, required=False)
    domain_col = _pick_column(columns, config.domain_column, ("domain",), "domain", "domain_column", table, required=False)
    return image_col, caption_cols, label_col, domain_col

def _usable_records(records: dict[str, dict[str, Any]], caption_problems: dict[str, list[Problem]], has_captions: bool,
                    problems: list[Problem]) -> list[dict[str, Any]]:
    """The records that can be samples; the others' problems (and the kept ones' caption problems) go to ``problems``."""
    kept: list[dict[str, Any]] = []
    for key, rec in records.items():
        cps = caption_problems.get(key, [])
        if rec["bad"] is not None:
            problems.append(rec["bad"])
            continue
        if has_captions and not rec["captions"]:
            for p in cps:
                p.reason += " (the image has no other caption, so it is left out)"
            problems.extend(cps or [Problem(", ".join(rec["wheres"]), rec["file"], "the image has no caption")])
            continue
        problems.extend(cps)
        kept.append(rec)
    return kept


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
