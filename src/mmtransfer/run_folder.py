"""The run folder on disk: creating and checking it, writing files whole, reading the metrics log back.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from .config import to_dict

CHECKPOINT_PREFIX = "checkpoint-"


class RunFolderError(OSError):
    """The run folder cannot be created or written (a file in the way, read-only, disk full)."""


def folder_error(folder: Path, err: OSError, doing: str) -> RunFolderError:
    reason = err.strerror or str(err)
    return RunFolderError(
        f"Cannot {doing} in the run folder '{folder}': {reason}. Free some space or choose another folder with "
        "train.output_dir=...; a run that stops here keeps its last complete checkpoint (train.resume=latest)."
    )


def prepare_run_folder(folder: Path) -> None:
    """Create ``folder`` and check that it takes files, before any model or data is loaded.

    Raises:
        RunFolderError: a file stands where a folder should be, the folder is read-only, or the disk is full.
    """
    probe = folder / f".write-test-{os.getpid()}"  # one per process: several may check at once
    try:
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(20, "it is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(
            f"Cannot write the run folder '{folder}' (train.output_dir): {err.strerror or err}. "
            "Choose a folder you can write to with train.output_dir=..."
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed into place: a crash or full disk never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise folder_error(path.parent, err, f"write {path.name}") from None


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a ``metrics.jsonl`` and how many unreadable lines were left out.

    A run killed while writing leaves a partial last line; it is dropped (with
    any other line that is not a JSON object) instead of making the run
    impossible to resume.
    """
    records: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def save_example_image(datasets: Sequence[Any], run_dir: Path) -> str | None:
    """Write the first readable image of ``datasets`` to ``run_dir/example.png``; its path, or None without one.

    The snippet a finished run prints opens it, so that the snippet runs as pasted.
    """
    from .data import DataError, open_image

    for dataset in datasets:
        if "image" not in dataset.column_names or len(dataset) == 0:
            continue
        try:
            image = open_image(dataset[0]["image"])
        except DataError:
            continue
        path = run_dir / EXAMPLE_IMAGE
        image.save(path)
        return str(path)
    return None


def example_image_code(summary: dict[str, Any]) -> tuple[str, str]:
    """The quoted path a printed snippet opens, and a comment for its line: the run's example image,
    or (a run without one) a placeholder marked as such."""
    path = summary.get("example_image")
    if path:
        return repr(path), ""
    return "'your_image.png'", "  # placeholder: put the path of one of your images here"


EXAMPLE_IMAGE = "example.png"


SUMMARY_FILE = "summary.json"


def update_summary(run_dir: Path, values: dict[str, Any]) -> None:
    """Merge ``values`` into the run's ``summary.json`` (written whole, through a renamed temporary file).

    The only writer of that file: the training loop writes the run's figures with it,
    recipes add theirs (test metrics, plots, timings) the same way.
    """
    path = run_dir / SUMMARY_FILE
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(values)
    write_text_atomic(path, json.dumps(data, indent=2))


def flat_hparams(run_config: Any) -> dict[str, Any]:
    """A flat {dotted.key: scalar} view of the config for trackers (TensorBoard hparams)."""
    if run_config is None:
        return {}
    data = to_dict(run_config) if not isinstance(run_config, dict) else run_config
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(node, (int, float, str, bool)):
            flat[prefix] = node
        else:
            flat[prefix] = str(node)

    walk(data, "")
    return flat
