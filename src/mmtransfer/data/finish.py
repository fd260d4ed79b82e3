"""Finishing a staged source: class selection, sampling, scanning the images, the bad-sample policy,
the content fingerprint and the load report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import DataConfig, DataError
from .report import DataReport, Problem
from .staging import Staged, column_values

if TYPE_CHECKING:
    from datasets import Dataset

logger = logging.getLogger("mmtransfer.data")


PROGRESS_ABOVE = 300  # scans longer than this show a progress bar by default


SAMPLE_SEED = 0  # sample="balanced" takes the same rows every run, so runs stay comparable


SIGNATURE_BLOCK = 64 * 1024  # a file's content signature hashes its first and last this many bytes


def scan_images(staged: Staged, verify: str, progress: bool | None, problems: list[Problem]) -> int:
    """Open (and decode) every image of ``staged``; append a problem per bad one. Returns the count checked."""
    from datasets import Image

    from .images import describe_source, image_problem

    ds = staged.dataset
    if "image" not in ds.column_names or len(ds) == 0:
        return 0
    raw = ds.cast_column("image", Image(decode=False))
    n = len(raw)
    bar = progress_bar(n, progress, f"Checking images of {_short(staged.source)}")
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


def progress_bar(total: int, progress: bool | None, desc: str) -> Any:
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
        return keep_rows(staged, balanced_rows(column_values(ds, "label"), n, SAMPLE_SEED))
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
        num_captions = sum(len(c) for c in column_values(ds, "captions"))
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
