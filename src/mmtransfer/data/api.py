"""The data layer's entry points: ``load``, ``load_with_report``, ``validate``, ``list_datasets``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import BUILTIN_DATASETS, DataConfig, make_config
from .report import DataReport

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class LoadedData:
    """A loaded data set and what loading it found (the training loop puts ``report`` in its run summary)."""

    dataset: "Dataset"
    report: DataReport


def list_datasets() -> dict[str, str]:
    """Built-in data set names -> one-line descriptions.

    Example:
        >>> "openmoji" in list_datasets()
        True
    """
    return dict(BUILTIN_DATASETS)


def load_with_report(name_or_path: "str | os.PathLike[str] | DataConfig | dict[str, Any]", split: str | None = None, **options: Any) -> LoadedData:
    """Like :func:`load`, and also return the :class:`DataReport` (bad samples skipped, counts).

    Example:
        >>> out = load_with_report("captions.csv", on_bad_sample="skip")   # doctest: +SKIP
        >>> out.report.skipped, len(out.dataset)                          # doctest: +SKIP
        (2, 98)
    """
    from .finish import finish
    from .sources import stage

    config = make_config(name_or_path, split, options)
    dataset, report = finish(stage(config), config)
    return LoadedData(dataset, report)


def load(name_or_path: "str | os.PathLike[str] | DataConfig | dict[str, Any]", split: str | None = None, **options: Any) -> "Dataset":
    """Load a built-in set, a local path or a hub data set as a ``datasets.Dataset`` with standard columns.

    Built-in names (:func:`list_datasets`) are dispatched by name; a path by what
    it holds (an image folder with ``metadata.jsonl``/``.csv``, a folder of class
    sub-folders, a caption table, a ``save_to_disk`` folder, a ``.npz``); an
    ``owner/name`` id or ``hf:name`` is read with ``datasets.load_dataset``.

    Columns (those the source has): ``image`` (``datasets.Image``, PIL when
    read), ``captions`` (list of strings), ``label`` (``ClassLabel`` with
    readable names), ``domain`` (string), ``image_id`` (int). The emoji sets add
    ``emoji``, ``view`` and ``split``.

    Args:
        name_or_path: a name or path, or a :class:`DataConfig` (or a mapping of its fields).
        split: the split to read (see :class:`DataConfig`).
        **options: any :class:`DataConfig` field (unknown ones raise, listing the valid ones).

    Raises:
        DataError: an unknown name, a missing file or column, or bad samples with
            ``on_bad_sample="error"`` (the message names the first few rows and files).

    Example:
        >>> ds = load("openmoji", split="test")
        >>> ds.features["label"].int2str(ds[0]["label"]) == ds[0]["captions"][0]
        True
    """
    return load_with_report(name_or_path, split, **options).dataset


def validate(dataset_or_name: "Dataset | str | os.PathLike[str] | DataConfig", split: str | None = None, **options: Any) -> DataReport:
    """Scan a data set: open, fully decode and convert every image; check captions and labels.

    Never raises for bad samples: they are listed in the returned report with
    their row, file and reason (``report.ok`` is False). A source that cannot
    be read at all (unknown name, missing column) still raises :class:`DataError`.

    Args:
        dataset_or_name: a ``datasets.Dataset`` (e.g. from :func:`load`) or anything :func:`load` takes.
        split: the split, for names.
        **options: :class:`DataConfig` fields (``verify`` defaults to "full").

    Example:
        >>> report = validate("my_images/")        # doctest: +SKIP
        >>> print(report)                          # doctest: +SKIP
    """
    import dataclasses

    from .finish import make_report, scan_images
    from .sources import stage, standardize
    from .staging import Staged

    if _is_dataset(dataset_or_name):
        config = make_config(None, split, options)
        staged = standardize(dataset_or_name, config, source=options.get("name") or "<Dataset>", split=split, base_dir=None)  # type: ignore[arg-type]
    else:
        config = make_config(dataset_or_name, split, options)  # type: ignore[arg-type]
        staged = stage(dataclasses.replace(config, max_samples=None))
    problems = list(staged.problems)
    verify = config.verify if config.verify != "none" else "full"
    checked = scan_images(Staged(staged.dataset, staged.source, staged.split, [], staged.wheres), verify, config.progress, problems)
    return make_report(staged.dataset, staged, problems, 0, checked, verify)


def _is_dataset(obj: Any) -> bool:
    return type(obj).__name__ == "Dataset" and hasattr(obj, "column_names") and hasattr(obj, "features")
