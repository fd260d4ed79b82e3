"""Build-once caches of generated data sets, keyed on everything that shapes them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import ENV_CACHE_DIR, DataError

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger("mmtransfer.data")

BUILD_INFO = "build_info.json"


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and SHA-256 of a file: changes whenever its content does (mtime alone can lie)."""
    path = Path(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def cache_key(inputs: dict[str, Any]) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cached_build(root: Path, kind: str, inputs: dict[str, Any], build: Callable[[], tuple["DatasetDict", dict[str, Any]]]) -> tuple["DatasetDict", dict[str, Any]]:
    """Load ``root/<kind>-<key>`` or build it with ``build()`` and save it there first.

    ``build`` returns the data set and a JSON-able info dict (counts, what was
    left out and why), stored next to it as ``build_info.json``. The folder is
    written under a temporary name and renamed, so an interrupted build never
    leaves a half-written cache behind.
    """
    from datasets import load_from_disk

    key = cache_key(inputs)
    folder = root / f"{kind}-{key}"
    info_file = folder / BUILD_INFO
    if info_file.is_file():
        return load_from_disk(str(folder)), json.loads(info_file.read_text())
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"Cannot create the cache folder {root} ({err.strerror}). Set cache_dir=... or the environment "
            f"variable {ENV_CACHE_DIR} to a writable folder."
        ) from None
    logger.info("Building '%s' into %s (once; later loads read the cache).", kind, folder)
    start = time.perf_counter()
    dataset, info = build()
    info = dict(info, build_seconds=round(time.perf_counter() - start, 1), cache_key=key, inputs=inputs)
    tmp = root / f".{kind}-{key}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_quietly(dataset, tmp)
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=1, ensure_ascii=False))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not info_file.is_file():  # not a concurrent build that finished first
                raise
    except OSError as err:
        raise DataError(
            f"Cannot write the cache folder {folder} ({err}). Set cache_dir=... or {ENV_CACHE_DIR} to a writable folder."
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(folder)), json.loads(info_file.read_text())


def _save_quietly(dataset: "DatasetDict", folder: Path) -> None:
    """save_to_disk without its per-split progress bars (the build has its own)."""
    import datasets

    quiet_before = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(folder))
    finally:
        if not quiet_before:
            datasets.enable_progress_bars()
