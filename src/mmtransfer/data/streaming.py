"""Training on shards: every process and DataLoader worker reads whole shards of its own, once per epoch.

The rule (docs/data.md, "Caption data bigger than memory"):

- **Slots.** Each epoch the shard list is shuffled by ``(seed, epoch)``; process ``r`` of ``R``
  takes shards ``r, r+R, ...`` of that order and its worker ``w`` of ``W`` every ``W``-th of those.
  A slot reads only its shards, so no sample is read twice; fewer shards than ``R x W`` slots is
  an error that says so.
- **Order.** A slot streams its shards in that order through a shuffle buffer seeded by
  ``(seed, epoch, process, worker)``.
- **Equal steps.** Every process takes the same number of batches per epoch: the smallest
  number of full batches any process's shards hold (shard sizes from ``sizes.json`` or counted).
  Each worker fills its share of them; what is left over (each worker's last partial batch, and
  a process's batches beyond the common number) is left out of this epoch; the next one orders
  the shards anew, so other samples are left out then. A worker short of usable samples (bad
  ones left out) reads its shards again, reshuffled, to fill its share.
- **Resume.** :meth:`StreamLoader.resume_at` (through :meth:`ShardStream.skip`) makes each worker
  re-read the records of the epoch's batches already trained on without decoding them, and go on
  from there in the uninterrupted order (the workers take the slots rotated, so that the slot
  whose batch is due next comes first).

Bad samples follow ``on_bad_sample``: ``error`` stops naming the shard and the key, ``skip``
leaves them out and counts them (:attr:`StreamLoader.report`).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .collate import _stable_seed
from .config import DataConfig, DataError
from .images import _Bad, load_image
from .shards import Record, list_shards, read_records, shard_sizes

logger = logging.getLogger("mmtransfer.data")

# Bad samples a report or a log line names before "and N more".
NAMED_PROBLEMS = 20


@dataclass
class EpochPlan:
    """Who reads what in one epoch: ``shards[rank][worker]`` (indices, in reading order) and ``quotas[rank][worker]`` (batches)."""

    shards: list[list[list[int]]]
    quotas: list[list[int]]
    steps: int


def share(capacities: list[int], total: int) -> list[int]:
    """Split ``total`` batches over workers holding ``capacities`` batches as evenly as they allow (water-filling)."""
    low, high = 0, max(capacities, default=0)
    while low < high:  # the largest level L with sum(min(c, L)) <= total
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(min(c, mid) for c in capacities) <= total else (low, mid - 1)
    quotas = [min(c, low) for c in capacities]
    rest = total - sum(quotas)
    for w, c in enumerate(capacities):
        if rest and c > quotas[w]:
            quotas[w], rest = quotas[w] + 1, rest - 1
    return quotas


def resume_point(quotas: list[int], batches: int) -> tuple[list[int], int]:
    """Where a DataLoader stands after ``batches`` batches, taking one from each worker that still has
    some, in worker order, round after round: how many each worker gave, and which one gives the next."""
    done = [0] * len(quotas)
    for round_ in itertools.count():
        active = [w for w, q in enumerate(quotas) if q > round_]
        if not active:
            return done, 0
        for w in active[:batches]:
            done[w] += 1
        if batches < len(active):
            return done, active[batches]
        batches -= len(active)
    raise AssertionError("unreachable")


class ShardStream(IterableDataset):
    """The samples (or, with ``batch_size``, collated batches) of one process's shards.

    Args:
        source: a ``wds:``/``parquet:`` name, or a :class:`DataConfig` with one (its
            ``on_bad_sample``, ``caption_column``, ``image_column`` and ``max_samples`` apply).
        shuffle_buffer: samples held for shuffling per worker (0 or 1: shard order only).
        seed: seed of the shard order and the shuffle buffers (with the epoch).
        batch_size: yield batches of this many samples, ``collate_fn(rows)`` each, the same number on every
            process (:class:`StreamLoader` runs it); None yields each slot's samples once, uncollated.
        num_workers: the DataLoader's workers (0: reading in the process itself, one slot).
        rank, world_size: this process and how many there are; None: ``accelerate.PartialState()``.

    Samples are ``{"image": PIL RGB, "captions": [...], "image_id": int, "__key__": str, "__shard__": str}``;
    ``image_id`` is a stable hash of the shard's name and the key.
    """

    def __init__(self, source: str | DataConfig, shuffle_buffer: int = 1000, seed: int = 0, batch_size: int | None = None,
                 collate_fn: Callable[[list[dict[str, Any]]], Any] | None = None, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.config = source if isinstance(source, DataConfig) else DataConfig(name=source)
        self.kind, self.paths = list_shards(self.config.name)
        self.counts = shard_sizes(self.kind, self.paths, self.config.on_bad_sample)
        if rank is None or world_size is None:
            from accelerate import PartialState

            state = PartialState()
            rank, world_size = state.process_index, state.num_processes
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = max(0, shuffle_buffer), seed
        self.batch_size, self.collate_fn, self.num_workers = batch_size, collate_fn, num_workers
        self.epoch = 0
        self.resume_batches = 0
        self.plan()  # fewer shards than slots, or than one batch per process: fail now, not in a worker

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Let the next pass over this epoch start after its first ``batches`` batches (a resumed run)."""
        self.resume_batches = batches

    def _usable(self) -> list[int]:
        """Indices of the shards read: all, or with ``max_samples`` the first ones holding that many (one per slot at least)."""
        n = len(self.paths)
        if self.config.max_samples is None:
            return list(range(n))
        totals = list(itertools.accumulate(self.counts))
        k = next((i + 1 for i, t in enumerate(totals) if t >= self.config.max_samples), n)
        return list(range(min(n, max(k, self.slots))))

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The epoch's slots, quotas and steps (the same on every process)."""
        R, W, B = self.world_size, max(1, self.num_workers), self.batch_size or 1
        usable = self._usable()
        if len(usable) < R * W:
            raise DataError(
                f"'{self.config.name}' has {len(self.paths)} shard(s) for {R} process(es) x {W} DataLoader worker(s) = {R * W} "
                f"slots. Every slot reads whole shards of its own (so no sample is read twice), which needs at least one shard "
                f"per slot: write at least {R * W} shards (python scripts/write_shards.py <data> --output <folder> "
                f"--samples-per-shard {max(1, sum(self.counts) // (R * W))}), or lower train.num_workers.")
        order = list(usable)
        random.Random(_stable_seed("shards", self.seed, self.epoch if epoch is None else epoch)).shuffle(order)
        shards = [[order[r::R][w::W] for w in range(W)] for r in range(R)]
        capacities = [[sum(self.counts[i] for i in slot) // B for slot in rank] for rank in shards]
        steps = min(sum(c) for c in capacities)
        if self.config.max_samples is not None:
            steps = min(steps, max(1, self.config.max_samples // (R * B)))
        if steps == 0 and self.batch_size:
            short = min(range(R), key=lambda r: sum(capacities[r]))
            raise DataError(
                f"'{self.config.name}': process {short} gets no full batch of {B} this epoch (its shards hold "
                f"{sum(self.counts[i] for s in shards[short] for i in s)} samples over {W} worker slot(s), each batching its own). "
                "Lower train.batch_size or train.num_workers, or write more samples.")
        return EpochPlan(shards, [share(c, steps) for c in capacities], steps)

    # -- reading -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(1, self.num_workers):
            raise DataError(f"ShardStream(num_workers={self.num_workers}) is read by a DataLoader with {workers} worker(s); "
                            "give both the same number (the shards are planned per worker).")
        plan = self.plan()
        # The state is read now, not at the first sample: the caller may reset it once the iterator exists.
        if self.batch_size is None:
            return self._samples(plan.shards[self.rank][worker], worker, passes=1, skip=0, stats=_Stats(self.config))
        # A resumed DataLoader starts its round at worker 0: rotate which slot each worker reads, so that the
        # slot due next comes first and the batches follow in the uninterrupted order.
        done, first = resume_point(plan.quotas[self.rank], self.resume_batches)
        slot = (worker + first) % workers
        return self._batches(plan.quotas[self.rank][slot], done[slot], plan.shards[self.rank][slot], slot)

    def _batches(self, quota: int, done: int, shards: list[int], worker: int) -> Iterator[dict[str, Any]]:
        assert self.batch_size is not None and self.collate_fn is not None, "batches need batch_size and collate_fn"
        stats = _Stats(self.config)
        try:
            samples = self._samples(shards, worker, passes=None, skip=done * self.batch_size, stats=stats)
            for _ in range(quota - done):
                batch = self.collate_fn([next(samples) for _ in range(self.batch_size)])
                batch["_stream"] = stats.take(worker)
                yield batch
        except DataError as err:  # handed to the main process whole, rather than as a worker's traceback
            yield {"_stream_error": str(err)}

    def _records(self, shards: list[int], worker: int, pass_index: int) -> Iterator[Record]:
        rng = random.Random(_stable_seed("buffer", self.seed, self.epoch, self.rank, worker, pass_index))
        if pass_index:  # a worker reading its shards again (bad samples left it short) reads them in a new order
            shards = rng.sample(shards, len(shards))
        records = itertools.chain.from_iterable(read_records(self.kind, self.paths[i], self.config) for i in shards)
        if self.shuffle_buffer <= 1:
            yield from records
            return
        buffer: list[Record] = []
        for record in records:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = record
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, shards: list[int], worker: int, passes: int | None, skip: int, stats: "_Stats") -> Iterator[dict[str, Any]]:
        """The slot's usable samples, decoded; the first ``skip`` usable records pass undecoded."""
        for pass_index in itertools.count() if passes is None else range(passes):
            usable = 0
            for record in self._records(shards, worker, pass_index):
                if record.problem is not None:
                    stats.bad(record, again=pass_index > 0)
                    continue
                usable += 1
                if skip:
                    skip -= 1
                    continue
                try:
                    image = load_image(record.image, "full")
                except _Bad as bad:
                    usable -= 1
                    stats.bad(record, str(bad), again=pass_index > 0)
                    continue
                yield {"image": image, "captions": record.captions, "image_id": sample_id(record),
                       "__key__": record.key, "__shard__": os.path.basename(record.shard)}
            if usable == 0 and passes is None:
                names = ", ".join(os.path.basename(self.paths[i]) for i in shards[:3])
                raise DataError(f"No usable sample in the shards of worker {worker} of process {self.rank} ({names}"
                                f"{' ...' if len(shards) > 3 else ''}); every one was bad ({stats.first()}).")


def sample_id(record: Record) -> int:
    """A stable non-negative int64 of (shard file name, key)."""
    return _stable_seed("sample", os.path.basename(record.shard), record.key) % (2**63)


class _Stats:
    """Bad samples met by one worker: raised at once under ``error``, counted under ``skip``."""

    def __init__(self, config: DataConfig) -> None:
        self.policy = config.on_bad_sample
        self.skipped = 0
        self.named: list[str] = []
        self._sent = (0, 0)

    def bad(self, record: Record, reason: str | None = None, again: bool = False) -> None:
        """A bad sample; ``again``: met on a later pass over the same shards (counted once)."""
        text = f"{record.where}: {reason or record.problem}"
        if self.policy == "error":
            raise DataError(f"{text}. Fix or rewrite that shard (python scripts/write_shards.py decodes every image it "
                            "writes), or set data.train.on_bad_sample=skip to leave such samples out.")
        if again:
            return
        self.skipped += 1
        if len(self.named) < NAMED_PROBLEMS:
            self.named.append(text)

    def first(self) -> str:
        return "; ".join(self.named[:3])

    def take(self, worker: int) -> dict[str, Any]:
        """What is new since the last call, for the main process."""
        skipped, named = self._sent
        self._sent = (self.skipped, len(self.named))
        return {"worker": worker, "skipped": self.skipped - skipped, "problems": self.named[named:]}


class StreamLoader:
    """Batches of a :class:`ShardStream` for the training loop: the same number on every process each epoch,
    moved to the process's device.

    The loop calls :meth:`prepare_with` (instead of letting Accelerate shard a DataLoader: the
    stream shards itself), :meth:`set_epoch` before each epoch and :meth:`resume_at` on a resume.
    :attr:`report` counts what was read and skipped (the run's ``summary.json``).
    """

    def __init__(self, stream: ShardStream, seed: int = 0) -> None:
        self.stream, self.seed = stream, seed
        self.device: Any = None
        self.report: dict[str, Any] = {"source": stream.config.name, "streamed": stream.kind, "shards": len(stream.paths),
                                       "samples_in_shards": sum(stream.counts), "skipped": 0, "problems": []}

    def prepare_with(self, accelerator: Any) -> None:
        self.stream.rank, self.stream.world_size = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.stream.plan()

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def resume_at(self, batches: int) -> int:
        """Start the next pass after the epoch's first ``batches`` batches; returns how many the caller must still drop (none)."""
        self.stream.skip(batches)
        return 0

    def __len__(self) -> int:
        return self.stream.plan().steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from torch.utils.data import DataLoader

        stream = self.stream
        plan = stream.plan()
        generator = torch.Generator()  # worker seeds (caption choice, augmentation) from (seed, epoch, process)
        generator.manual_seed(_stable_seed("stream-loader", self.seed, stream.epoch, stream.rank) % 2**63)
        loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers, generator=generator)
        start, iterator = stream.resume_batches, iter(loader)
        stream.resume_batches = 0  # the workers took their copy
        count, skipped = start, [0] * max(1, stream.num_workers)
        for batch in iterator:
            if "_stream_error" in batch:
                raise DataError(batch["_stream_error"])
            info = batch.pop("_stream")
            skipped[info["worker"]] += info["skipped"]
            self.report["skipped"] += info["skipped"]
            self.report["problems"] = (self.report["problems"] + info["problems"])[:NAMED_PROBLEMS]
            count += 1
            yield {k: v.to(self.device) if isinstance(v, torch.Tensor) and self.device is not None else v for k, v in batch.items()}
        if count != plan.steps:
            raise RuntimeError(f"The stream gave {count} batches where the plan says {plan.steps}.")
        if any(skipped):
            logger.warning("Epoch %d of '%s', process %d: bad samples skipped per worker: %s (first: %s).", stream.epoch,
                           stream.config.name, stream.rank, skipped, "; ".join(self.report["problems"][:3]))
        else:
            logger.info("Epoch %d of '%s', process %d: %d batches, no bad sample.", stream.epoch, stream.config.name,
                        stream.rank, plan.steps - start)

    def gathered_report(self) -> dict[str, Any]:
        """:attr:`report` summed over every process (call it on all of them)."""
        from accelerate.utils import gather_object

        reports = gather_object([self.report]) if self.stream.world_size > 1 else [self.report]
        problems = [p for r in reports for p in r["problems"]][:NAMED_PROBLEMS]
        return {**self.report, "skipped": sum(r["skipped"] for r in reports), "problems": problems}
