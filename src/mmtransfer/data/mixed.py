"""Mixed batches: every step's batch split between several data sets in fixed shares (multi-task runs).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence

import torch

from ..config import ConfigError


def batch_shares(batch_size: int, shares: dict[str, float]) -> dict[str, int]:
    """Split ``batch_size`` over tasks in proportion to ``shares`` (largest remainders; each task gets at least 1).

    Example:
        >>> batch_shares(64, {"captions": 1.0, "labels": 1.0})
        {'captions': 32, 'labels': 32}
        >>> batch_shares(10, {"captions": 2.0, "labels": 1.0})
        {'captions': 7, 'labels': 3}
    """
    bad = {k: v for k, v in shares.items() if not v > 0}
    if bad:
        raise ConfigError(f"Task shares must be positive numbers; got {bad} (disable a task with tasks.<name>.enabled=false).")
    if batch_size < len(shares):
        raise ConfigError(f"train.batch_size={batch_size} cannot give each of the {len(shares)} tasks ({', '.join(shares)}) an image per step.")
    total = sum(shares.values())
    exact = {k: batch_size * v / total for k, v in shares.items()}
    sizes = {k: max(1, int(x)) for k, x in exact.items()}
    order = sorted(shares, key=lambda k: exact[k] - int(exact[k]), reverse=True)
    i = 0
    while sum(sizes.values()) < batch_size:
        sizes[order[i % len(order)]] += 1
        i += 1
    while sum(sizes.values()) > batch_size:
        k = max(sizes, key=lambda k: sizes[k])
        sizes[k] -= 1
    return sizes


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big") % (2**63)


class MixedBatchSampler:
    """Batches that hold ``sizes[k]`` items of every task's data set, every step.

    Each item is ``(task, position, draw)``: a row of that task's data set and a
    random integer the collators use for their own choices (which augmented copy,
    which caption). An epoch lasts as many steps as the task that needs the most
    to see its data set once (full batches only); the others start a new,
    reshuffled pass when they run out. Everything is drawn from generators seeded
    by (seed, epoch, task, pass), so a batch is a pure function of the seed, the
    epoch and the step: resuming mid-epoch (skipping the consumed batches) draws
    exactly what an uninterrupted run does, and every process sees the same
    global order (Accelerate gives each process its own batches).

    Args:
        lengths: task -> rows in its data set.
        sizes: task -> items per step (see :func:`batch_shares`).
        seed: the run's seed.

    Example:
        >>> sampler = MixedBatchSampler({"captions": 100, "labels": 40}, {"captions": 8, "labels": 8}, seed=0)
        >>> len(sampler), len(next(iter(sampler)))
        (12, 16)
    """

    drop_last = True

    def __init__(self, lengths: dict[str, int], sizes: dict[str, int], seed: int = 0) -> None:
        for k, n in lengths.items():
            if n < sizes[k]:
                raise ConfigError(f"The {k} data has {n} rows, fewer than its {sizes[k]} per step: lower train.batch_size or tasks.{k}.share.")
        self.lengths = dict(lengths)
        self.sizes = {k: sizes[k] for k in lengths}
        self.batch_size = sum(self.sizes.values())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(self.lengths[k] // self.sizes[k] for k in self.lengths)

    def _stream(self, task: str, epoch: int) -> Any:
        n, size, p = self.lengths[task], self.sizes[task], 0
        while True:
            g = torch.Generator().manual_seed(_stable_seed("mixed", self.seed, epoch, task, p))
            order = torch.randperm(n, generator=g)
            draws = torch.randint(0, 2**31 - 1, (n,), generator=g)
            for start in range(0, n - size + 1, size):
                yield [(task, int(i), int(d)) for i, d in zip(order[start:start + size], draws[start:start + size])]
            p += 1

    def __iter__(self) -> Any:
        streams = {k: self._stream(k, self.epoch) for k in self.lengths}
        for _ in range(len(self)):
            yield [item for k in self.lengths for item in next(streams[k])]


class _MixedItems(torch.utils.data.Dataset):
    """``(task, position, draw)`` -> ``(task, payload)``: the data set row for collators that read rows,
    ``(position, draw)`` for those that read cached features."""

    def __init__(self, sampler: MixedBatchSampler, rows: dict[str, Any]) -> None:
        self.sampler = sampler
        self.rows = rows  # task -> a data set to read rows from, or None (cached features)

    def __len__(self) -> int:
        return sum(self.sampler.lengths.values())

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __getitem__(self, item: tuple[str, int, int]) -> tuple[str, Any]:
        task, position, draw = item
        rows = self.rows.get(task)
        return task, (rows[position] if rows is not None else (position, draw))


class MixedCollator:
    """``[(task, payload), ...]`` -> ``{task: that task's collator applied to its payloads}``."""

    def __init__(self, collators: dict[str, Callable[[list[Any]], dict[str, Any]]]) -> None:
        self.collators = collators

    def __call__(self, items: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
        grouped: dict[str, list[Any]] = {}
        for task, payload in items:
            grouped.setdefault(task, []).append(payload)
        return {task: self.collators[task](payloads) for task, payloads in grouped.items()}


def mixed_loader(datasets: dict[str, Any], collators: dict[str, Callable], sizes: dict[str, int], seed: int,
                 read_rows: dict[str, bool], num_workers: int = 0) -> torch.utils.data.DataLoader:
    """One DataLoader whose every batch is ``{task: batch}`` with ``sizes[task]`` items of each task.

    Args:
        datasets: task -> its data set (rows 0..N-1).
        collators: task -> collator of rows (``read_rows[task]``) or of ``(position, draw)`` pairs.
        sizes: task -> items per step.
        read_rows: task -> whether its collator reads data set rows (images decoded in the collator).
    """
    from .collate import undecoded

    sampler = MixedBatchSampler({k: len(d) for k, d in datasets.items()}, sizes, seed)
    rows = {k: undecoded(d) if read_rows.get(k) else None for k, d in datasets.items()}
    return torch.utils.data.DataLoader(_MixedItems(sampler, rows), batch_sampler=sampler, collate_fn=MixedCollator(collators),
                                       num_workers=num_workers if any(read_rows.values()) else 0)


class CachedImageBatches:
    """Positions (or ``(position, draw)`` pairs) -> ``image_pooled`` (B, Di), ``image_index`` (B,) and, with labels, ``labels`` (B,).

    With several copies (plain first, then augmented), training items read copy
    ``draw % copies``; plain positions read the plain copy.
    """

    def __init__(self, copies: Sequence[Any], labels: torch.Tensor | None = None) -> None:
        self.copies = list(copies)
        self.labels = labels

    def __call__(self, items: list[Any]) -> dict[str, torch.Tensor]:
        if items and isinstance(items[0], (tuple, list)):
            idx = torch.as_tensor([int(p) for p, _ in items], dtype=torch.long)  # (B,)
            which = torch.as_tensor([int(d) % len(self.copies) for _, d in items])  # (B,)
        else:
            idx = torch.as_tensor(items, dtype=torch.long)
            which = torch.zeros(len(items), dtype=torch.long)
        first = self.copies[0].pooled
        pooled = torch.empty(len(idx), *first.shape[1:], dtype=first.dtype)  # (B, Di)
        for c, feats in enumerate(self.copies):
            rows = (which == c).nonzero().squeeze(1)
            pooled[rows] = feats.pooled[idx[rows]]
        batch = {"image_pooled": pooled, "image_index": idx}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]
        return batch


class _LabelRows:
    """Wraps an image collator of data set rows: adds ``labels`` (head positions) from the rows' ``label``."""

    def __init__(self, collate: Callable, lookup: torch.Tensor) -> None:
        self.collate, self.lookup = collate, lookup

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        batch["labels"] = self.lookup[torch.tensor([int(r["label"]) for r in rows])]
        return batch
