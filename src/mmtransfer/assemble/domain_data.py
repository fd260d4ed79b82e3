"""Data of domain-adaptation runs: preprocessed tensors, pooled source domains, balanced draws, label lookups.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ConfigError
from ..data.builtin import DIGIT_NAMES
from ..data.config import BUILTIN_DATASETS, DataConfig
from ..models.preprocess import ImagePreprocessor

logger = logging.getLogger(__name__)


class TensorBatches:
    """Positions -> a batch from preprocessed tensors: ``pixel_values`` (B, 3, S, S) and, when kept, ``labels`` (B,)."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.pixels = pixels
        self.labels = labels

    def __call__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)  # (B,)
        batch = {"pixel_values": self.pixels[idx].float(), "index": idx}  # (B, 3, S, S)
        if self.labels is not None:
            batch["labels"] = self.labels[idx]  # (B,)
        return batch


class WithoutLabels:
    """Wraps a collator and removes ``labels`` from its batches (target images are unlabelled)."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        batch = self.collate(rows)
        batch.pop("labels", None)
        return batch


class CachedImages:
    """Positions -> ``image_pooled`` (B, Di) (+ ``image_tokens`` (B, P, Di)) and ``labels`` (B,) when given."""

    def __init__(self, feats: Any, labels: torch.Tensor | None = None) -> None:
        self.feats = feats
        self.labels = labels

    def __call__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(positions, dtype=torch.long)  # (B,)
        batch = {"image_pooled": self.feats.pooled[idx], "image_index": idx}  # (B, Di)
        if self.feats.tokens is not None:
            batch["image_tokens"] = self.feats.tokens[idx].float()  # (B, P, Di)
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


def preprocess_all(dataset: Any, preprocessor: ImagePreprocessor, batch_size: int = 512, progress: bool = False) -> torch.Tensor:
    """Every image of ``dataset`` through ``preprocessor``, stacked: (N, 3, S, S) float32."""
    from tqdm.auto import tqdm

    from ..data.collate import ImageCollator, make_loader

    loader = make_loader(dataset, ImageCollator(preprocessor), batch_size)
    parts = [b["pixel_values"] for b in tqdm(loader, desc="preprocessing images", disable=not progress, dynamic_ncols=True)]
    return torch.cat(parts)  # (N, 3, S, S)


def _labels(dataset: Any) -> torch.Tensor:
    if "label" not in dataset.column_names:
        raise ConfigError(f"This data set has no 'label' column ({', '.join(dataset.column_names)}); evaluation and source training need labels.")
    return torch.tensor(dataset.select_columns(["label"])["label"], dtype=torch.long)


def class_names_of(dataset: Any, what: str) -> list[str]:
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError(f"The {what} data has no class names (a ClassLabel 'label' column); domain adaptation needs labelled source data.")
    return list(names)


def whole_folder(section: DataConfig, role: str) -> DataConfig:
    """``section`` without its split when it names a folder of class folders, which has no splits (logged).

    Recipes written for the built-in sets carry ``split: train`` / ``split: test``;
    pointed at a user's class folder, the split names nothing there, so the whole
    folder is read (the target and its test then hold the same images, as the
    digits protocol does). Folders with split sub-folders keep the split.
    """
    from ..data.sources import is_plain_class_folder

    path = Path(section.name).expanduser()
    if (section.split is None or section.name in BUILTIN_DATASETS or not path.is_dir() or (path / section.split).exists()
            or not is_plain_class_folder(path)):
        return section
    logger.info("%s: %s has no split sub-folders, so split '%s' is ignored and the whole folder is read "
                "(set %s.split=null to say so explicitly).", role, path, section.split, role)
    return dataclasses.replace(section, split=None)


def class_key(name: str) -> str:
    """A class name as compared across data sets: case, spaces, underscores and hyphens ignored, "0"-"9" read as "zero"-"nine".

    Example:
        >>> class_key("Golden_Retriever"), class_key("7")
        ('golden retriever', 'seven')
    """
    key = re.sub(r"[\s_\-]+", " ", name).strip().lower()
    return DIGIT_NAMES[int(key)] if key in {str(i) for i in range(10)} else key


def match_classes(source: list[str], other: list[str], role: str) -> list[int]:
    """For each class of ``other``, the position of the same class among ``source``: an equal name, else an equal :func:`class_key`.

    Raises:
        ConfigError: a class that matches no source class or several, or two classes
            that match one; the message lists both name lists and the fix.

    Example:
        >>> match_classes(["zero", "one", "two"], ["2", "0"], "data.target_test")
        [2, 0]
    """
    exact = {n: i for i, n in enumerate(source)}
    by_key: dict[str, list[int]] = {}
    for i, n in enumerate(source):
        by_key.setdefault(class_key(n), []).append(i)

    def position(name: str) -> int:
        if name in exact:
            return exact[name]
        hits = by_key.get(class_key(name), [])
        return hits[0] if len(hits) == 1 else -1

    mapping = [position(n) for n in other]
    problems = []
    unmatched = [n for n, m in zip(other, mapping) if m < 0 and not by_key.get(class_key(n))]
    several = [n for n, m in zip(other, mapping) if m < 0 and by_key.get(class_key(n))]
    taken = Counter(m for m in mapping if m >= 0)
    shared = [n for n, m in zip(other, mapping) if m >= 0 and taken[m] > 1]
    if unmatched:
        problems.append(f"{_listed(unmatched)} match no source class")
    if several:
        problems.append(f"{_listed(several)} match several source classes")
    if shared:
        problems.append(f"{_listed(shared)} match the same source class")
    if problems:
        raise ConfigError(
            f"{role} names its classes {_listed(other)}, the source {_listed(source)}; {'; '.join(problems)}. Give them the "
            f"same names: rename the class folders, or set {role}.class_names to {len(other)} source names, one for each of "
            "its classes in the order above."
        )
    return mapping


def _listed(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return f"[{shown}{', ...' if len(names) > limit else ''}]"


def align_classes(dataset: Any, names: list[str], role: str) -> Any:
    """``dataset`` with its labels renumbered onto the source's classes ``names`` (:func:`match_classes`); the mapping is logged."""
    from datasets import ClassLabel

    other = class_names_of(dataset, role)
    if other == names:
        return dataset
    mapping = match_classes(names, other, role)
    pairs = [f"{o} -> {names[m]}" for o, m in zip(other, mapping) if o != names[m]]
    subset_note = f" ({len(other)} of the source's {len(names)} classes)" if len(other) < len(names) else ""
    if pairs:
        logger.info("%s: class names matched to the source's: %s%s.", role, ", ".join(pairs), subset_note)
    else:
        logger.info("%s: the source's classes in another order%s; labels renumbered to the source's.", role, subset_note)
    columns = dataset.column_names
    labels = [mapping[i] for i in dataset.select_columns(["label"])["label"]]
    return dataset.remove_columns("label").add_column("label", labels, feature=ClassLabel(names=names)).select_columns(columns)


def subset(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def _loader(items: Any, collate: Any, batch_size: int, shuffle: bool, seed: int, drop_last: bool, num_workers: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       collate_fn=collate, generator=generator, num_workers=num_workers)


@torch.no_grad()
def collect(loader: Any, embed: Callable[[dict[str, Any]], dict[str, torch.Tensor]], accelerator: Any = None) -> dict[str, torch.Tensor]:
    """Run ``embed`` over every batch and concatenate its outputs, gathered across processes.

    Shapes:
        each key -> (N, ...) on the CPU, N = the evaluation set's size.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        out = embed(batch)
        if accelerator is not None:
            out = accelerator.gather_for_metrics({k: v.contiguous() for k, v in out.items()})
        for k, v in out.items():
            parts.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


@dataclass
class Sources:
    """The labelled source domains: each one's data set, their concatenation, and per-row values.

    Shapes:
        domain: (N,) which source each pooled row comes from; weight: (N,) importance weights or None.
    """

    parts: list[Any]
    names: list[str]
    pooled: Any
    domain: torch.Tensor
    weight: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return len(self.parts)

    def items(self, balance: bool, seed: int) -> list[int]:
        """Pooled row positions of one epoch: each row once, or (balanced) every source as often as the largest."""
        if self.count == 1 or not balance:
            return list(range(len(self.domain)))
        return balanced_items(self.domain, seed)

    def row_values(self) -> dict[str, torch.Tensor]:
        """What each source batch carries besides the collator's output: importance weights, domain ids."""
        out: dict[str, torch.Tensor] = {}
        if self.weight is not None:
            out["weight"] = self.weight
        if self.count > 1:
            out["domain"] = self.domain
        return out


def balanced_items(domain: torch.Tensor, seed: int = 0) -> list[int]:
    """Row positions in which every domain appears as often as the largest one (smaller ones repeat, then a seeded remainder).

    Example:
        >>> sorted(balanced_items(torch.tensor([0, 0, 0, 0, 1, 1])))
        [0, 1, 2, 3, 4, 4, 5, 5]
    """
    gen = torch.Generator().manual_seed(seed)
    counts = torch.bincount(domain)
    target = int(counts.max())
    out: list[int] = []
    for k in range(len(counts)):
        rows = (domain == k).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        reps, rest = divmod(target, len(rows))
        out += rows.repeat(reps).tolist() + rows[torch.randperm(len(rows), generator=gen)[:rest]].tolist()
    return out


class RowValues:
    """Wraps a collator and adds per-row values (importance weights, domain ids) to its batches.

    Items are row positions (ints) or data set rows with ``image_id`` equal to
    their position (:func:`~mmtransfer.features.with_row_ids`).

    Shapes:
        each value (N,) -> batch[key] (B,).
    """

    def __init__(self, collate: Callable[[list[Any]], dict[str, Any]], values: dict[str, torch.Tensor]) -> None:
        self.collate = collate
        self.values = values

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        batch = self.collate(items)
        positions = torch.as_tensor([int(i["image_id"]) if isinstance(i, dict) else int(i) for i in items], dtype=torch.long)  # (B,)
        for key, value in self.values.items():
            batch[key] = value[positions]
        return batch


def with_rows(collate: Any, sources: Sources) -> Any:
    values = sources.row_values()
    return RowValues(collate, values) if values else collate


def pool_sources(parts: list[Any], names: list[str], need_labels: bool = True) -> tuple[Any, torch.Tensor]:
    """Concatenate labelled source data sets into one, and say which source each row came from.

    The pooled set keeps the columns every part has among ``image``, ``captions``
    and ``label``; labels must name the same classes in the same order (when
    ``need_labels``; otherwise differing labels are dropped).

    Shapes:
        -> (pooled data set, domain ids (N,)).
    """
    lengths = torch.tensor([len(p) for p in parts])
    domain = torch.repeat_interleave(torch.arange(len(parts)), lengths)  # (N,)
    if len(parts) == 1:
        return parts[0], domain
    from datasets import concatenate_datasets

    keep = [c for c in ("image", "captions", "label") if all(c in p.column_names for p in parts)]
    if need_labels and "label" not in keep:
        missing = [n for n, p in zip(names, parts) if "label" not in p.column_names]
        raise ConfigError(f"Every source must be labelled for task=classify; {', '.join(missing)} has no 'label' column.")
    if "label" in keep:
        class_lists = [list(getattr(p.features["label"], "names", None) or []) for p in parts]
        if any(c != class_lists[0] for c in class_lists[1:]):
            odd = next(n for n, c in zip(names, class_lists) if c != class_lists[0])
            if need_labels:
                raise ConfigError(
                    f"The source {odd} names its classes differently from {names[0]} ({class_lists[0][:3]}...): every source "
                    "must list the same classes in the same order (set class_names on the data sections)."
                )
            keep.remove("label")
    trimmed = [p.select_columns(keep) for p in parts]
    try:
        trimmed = [trimmed[0]] + [p.cast(trimmed[0].features) for p in trimmed[1:]]
        pooled = concatenate_datasets(trimmed)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"The sources {', '.join(names)} cannot be pooled: their columns {keep} differ in type ({err}).") from None
    return pooled, domain


def check_loaders(bs: int, **loaders: Any) -> None:
    for role, loader in loaders.items():
        if loader is not None and len(loader) == 0:
            raise ConfigError(f"The {role} data has fewer images than one batch of {bs}: lower train.batch_size.")


def labels_and_names(dataset: Any) -> tuple[torch.Tensor, list[str]]:
    """Class ids (N,) and class names of a labelled set, or, without a label column, of its first captions.

    A captioned image folder with no label column is labelled by caption: each
    distinct first caption is a class (names sorted).

    Example:
        >>> labels_and_names(folder_with_captions_only)            # doctest: +SKIP
        (tensor([1, 0, 1]), ['cat face', 'grinning face'])
    """
    if "label" in dataset.column_names:
        return _labels(dataset), class_names_of(dataset, "evaluation")
    if "captions" not in dataset.column_names:
        raise ConfigError(f"This evaluation set has neither a 'label' nor a 'captions' column ({', '.join(dataset.column_names)}).")
    firsts = [(c if isinstance(c, str) else c[0]) for c in dataset.select_columns(["captions"])["captions"]]
    names = sorted(set(firsts))
    index = {n: i for i, n in enumerate(names)}
    return torch.tensor([index[f] for f in firsts], dtype=torch.long), names


def zero_shot_candidates(evals: dict[str, Any]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Every class name present in an evaluation set (in order of first appearance), and each set's labels as positions in that list.

    Sets are matched by class *name*, so a labelled built-in set and a captioned
    folder (labelled by caption) share candidates where their names agree.

    Shapes:
        -> names (K,), {set: (N_set,) positions in 0..K-1}.
    """
    candidates: list[str] = []
    where: dict[str, int] = {}
    mapped: dict[str, torch.Tensor] = {}
    for key, ds in evals.items():
        labels, names = labels_and_names(ds)
        for i in sorted(set(labels.tolist())):
            if names[i] not in where:
                where[names[i]] = len(candidates)
                candidates.append(names[i])
        lookup = torch.tensor([where.get(n, -1) for n in names], dtype=torch.long)
        mapped[key] = lookup[labels]
    return candidates, mapped


class MappedLabels:
    """Adds ``labels`` (positions among the zero-shot candidates, by row) to an image collator's batches."""

    def __init__(self, collate: Any, labels: torch.Tensor) -> None:
        self.collate, self.labels = collate, labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        batch["labels"] = self.labels[batch["image_index"]]
        return batch
