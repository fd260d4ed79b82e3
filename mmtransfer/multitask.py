"""Multi-task training: several objectives and heads over one shared model, in one run.

One :class:`MultiTask` holds a :class:`~mmtransfer.MultimodalModel` and the
objectives that train it together:

- ``captions``: contrastive alignment (+ image-text matching) on captioned images
  (:class:`~mmtransfer.objectives.CaptionObjective`);
- ``labels``: cross-entropy of a linear head over the shared image embedding,
  initialised from the class names' text embeddings (:class:`LabelObjective`);
- ``domain``: a domain loss (DANN, MMD or CORAL, from :mod:`mmtransfer.losses.domain`)
  between the step's source images and unlabelled target images (:class:`DomainObjective`).

Each returns its loss and metrics; :class:`FixedWeighting` or
:class:`UncertaintyWeighting` adds the losses up. Every step holds a batch of
every enabled task, sized by the tasks' shares of ``train.batch_size``
(:class:`MixedBatchSampler`), so there is one backward per step and every
trainable parameter gets a gradient each step, as DDP wants. The recipe behind
``scripts/finetune_captions.py`` with a ``tasks`` section is :func:`run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, at_least, check_ranges
from .data.config import DataConfig
from .train import StepInfo, TaskOutput

logger = logging.getLogger(__name__)

TASKS = ("captions", "labels", "domain")


# ----------------------------------------------------------------------------- configs


@dataclass
class CaptionTaskSection:
    """The caption objective (``objective``: contrastive + ITM) on ``data.train``."""

    # Train on the captions of data.train.
    enabled: bool = True
    # This task's share of every step's images: train.batch_size is split over the
    # enabled tasks in proportion to their shares.
    share: float = 1.0
    # Weight of this task's loss in the sum (uncertainty weighting multiplies it by exp(-s_k)).
    weight: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(self, share=at_least(0), weight=at_least(0))


@dataclass
class LabelTaskSection:
    """A classification head on the shared image embedding, trained with cross-entropy."""

    # Train the head (and the image side under it) on labelled images.
    enabled: bool = False
    # This task's share of every step's images.
    share: float = 1.0
    # Weight of this task's loss in the sum.
    weight: float = 1.0
    # Labelled training images; the head has one output per class that occurs here.
    train: DataConfig = field(default_factory=lambda: DataConfig(name="openmoji", split="train"))
    # Labelled images evaluated every train.eval_every steps and at the end: by the head when
    # the task trains, and by class names (nearest name embedding) in every multi-task run.
    # None: no label evaluation.
    validation: DataConfig | None = field(default_factory=lambda: DataConfig(name="openmoji", split="validation"))
    # Labelled images evaluated once after training, like validation. None: skip.
    test: DataConfig | None = field(default_factory=lambda: DataConfig(name="openmoji", split="test"))
    # Head initialisation: "text" (the class names' embeddings times the temperature: the
    # zero-shot classifier) or "random".
    head_init: Literal["text", "random"] = "text"

    def __post_init__(self) -> None:
        check_ranges(self, share=at_least(0), weight=at_least(0))


@dataclass
class DomainTaskSection:
    """A domain loss between the step's source images and unlabelled target images."""

    # Train the domain loss on the shared image embedding: source = the images of the
    # step's captions and labels batches, target = tasks.domain.target.
    enabled: bool = False
    # This task's share of every step's images (the target images).
    share: float = 1.0
    # Weight of this task's loss in the sum.
    weight: float = 1.0
    # Unlabelled target images (labels, if the set has any, are never read).
    target: DataConfig = field(default_factory=lambda: DataConfig(name="noto-emoji", split="train"))
    # The domain loss, with the keys of scripts/domain_adapt.py's `method` section: name
    # (dann, mmd or coral), schedule, gamma, lambda_max, discriminator, mmd_bandwidths.
    # Its weight is tasks.domain.weight.
    method: dict[str, Any] = field(default_factory=lambda: {"name": "dann"})

    def __post_init__(self) -> None:
        check_ranges(self, share=at_least(0), weight=at_least(0))


@dataclass
class TasksConfig:
    """The objectives of a multi-task run, how their losses add up, and what is evaluated."""

    captions: CaptionTaskSection = field(default_factory=CaptionTaskSection)
    labels: LabelTaskSection = field(default_factory=LabelTaskSection)
    domain: DomainTaskSection = field(default_factory=DomainTaskSection)
    # How task losses add up. "fixed": L = sum_k w_k L_k. "uncertainty": L = sum_k exp(-s_k) w_k L_k + s_k
    # with a learnable log-variance s_k per task (Kendall, Gal & Cipolla 2018), saved with checkpoints.
    weighting: Literal["fixed", "uncertainty"] = "fixed"
    # Uncertainty weighting: every s_k at step 0 (0: every exp(-s_k) starts at 1).
    init_log_var: float = 0.0
    # Prompt templates with "{}" for a class name: the text-initialised head, the class-name
    # metrics and zero-shot evaluation average the embeddings of the filled templates.
    templates: list[str] = field(default_factory=lambda: ["{}"])
    # Zero-shot evaluation: a labelled split classified by its own class names, every
    # evaluation (e.g. openmoji unseen: 383 names never seen in training). None: skip.
    zero_shot: DataConfig | None = None


# ----------------------------------------------------------------------------- loss weighting


@dataclass
class WeightedLoss:
    """Task losses combined into one.

    Shapes (all scalars):
        loss: () the combined loss to minimise.
        weights: task -> () the effective multiplier of its loss (w_k, or exp(-s_k) w_k).
        log_vars: task -> () s_k (uncertainty weighting; empty for fixed weights).
    """

    loss: torch.Tensor
    weights: dict[str, torch.Tensor]
    log_vars: dict[str, torch.Tensor] = field(default_factory=dict)


class FixedWeighting(nn.Module):
    """L = sum_k w_k L_k with fixed weights w_k.

    Example:
        >>> FixedWeighting({"a": 1.0, "b": 0.5})({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).loss
        tensor(4.)
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.fixed = dict(weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> WeightedLoss:
        total = sum(self.fixed[k] * loss for k, loss in losses.items())
        weights = {k: torch.tensor(self.fixed[k]) for k in losses}
        return WeightedLoss(loss=total, weights=weights)


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting with learnable log-variances.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics" (CVPR 2018). The variant used here gives
    every task the same form, with s_k = log sigma_k^2 and no 1/2 factors:

        L = sum_k exp(-s_k) w_k L_k + s_k

    (w_k the fixed weights, 1 by default). For fixed L_k the minimum over s_k is
    at s_k = log(w_k L_k): a task's effective weight exp(-s_k) w_k tends to the
    inverse of its loss, and the + s_k term keeps the weights from collapsing to 0.

    Gradients:
        dL/ds_k = 1 - exp(-s_k) w_k L_k;   dL/dtheta = sum_k exp(-s_k) w_k dL_k/dtheta.

    The s_k are parameters of the module (so of the task): the optimizer trains
    them, checkpoints save them and a resumed run continues from them.

    Args:
        names: the tasks, in a fixed order (``log_vars[i]`` belongs to ``names[i]``).
        weights: fixed weights w_k (None: all 1).
        init: s_k at the start.

    Shapes:
        log_vars: (K,); losses: task -> () -> :class:`WeightedLoss`.

    Example:
        >>> uw = UncertaintyWeighting(["captions", "labels"])
        >>> out = uw({"captions": torch.tensor(2.0), "labels": torch.tensor(3.0)})
        >>> float(out.loss)  # exp(0) * 2 + 0 + exp(0) * 3 + 0
        5.0
    """

    def __init__(self, names: Sequence[str], weights: dict[str, float] | None = None, init: float = 0.0) -> None:
        super().__init__()
        if not names:
            raise ValueError("UncertaintyWeighting needs at least one task name.")
        self.names = list(names)
        self.fixed = {k: float((weights or {}).get(k, 1.0)) for k in self.names}
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init)))

    def forward(self, losses: dict[str, torch.Tensor]) -> WeightedLoss:
        unknown = sorted(set(losses) - set(self.names))
        if unknown:
            raise KeyError(f"UncertaintyWeighting has no log-variance for {unknown}; it was built for {self.names}.")
        total = self.log_vars.new_zeros(())
        weights, log_vars = {}, {}
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            s = self.log_vars[i]
            precision = torch.exp(-s) * self.fixed[name]
            total = total + precision * losses[name].to(s.dtype) + s
            weights[name], log_vars[name] = precision.detach(), s.detach()
        return WeightedLoss(loss=total, weights=weights, log_vars=log_vars)


# ----------------------------------------------------------------------------- objectives


@dataclass
class ObjectiveOutput:
    """One objective's loss and its metrics (what :class:`MultiTask` combines and logs)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class LabelObjective(nn.Module):
    """Cross-entropy of a linear head over the normalised shared image embedding.

    Args:
        head: a :class:`~mmtransfer.transfer.LinearHead` with one row per class.

    Shapes:
        batch: ``image_pooled`` (B, Di) or ``pixel_values`` (B, 3, S, S); ``labels`` (B,) in [0, C).
        -> loss (), metrics ``ce``, ``acc``.

    Example:
        >>> obj = LabelObjective(LinearHead.random(10, model.config.embed_dim))
        >>> obj(model, {"image_pooled": torch.randn(4, Di), "labels": torch.tensor([0, 1, 2, 3])}).loss.shape
        torch.Size([])
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def logits(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        from .objectives import image_features

        z = model.project_image(image_features(model, batch).pooled)  # (B, E)
        return self.head(z)  # (B, C)

    def forward(self, model: Any, batch: dict[str, Any]) -> ObjectiveOutput:
        logits = self.logits(model, batch)  # (B, C)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"ce": loss.detach(), "acc": acc})


class DomainObjective(nn.Module):
    """A domain loss between source and target image embeddings in the shared space.

    Args:
        loss: a loss module of :mod:`mmtransfer.losses.domain` (DANN, MMD or CORAL)
            mapping ``(f_s, f_t, lambda_)`` to a :class:`~mmtransfer.losses.domain.DomainLossOutput`.
        strength: gradient-reversal strength as a pure function of training progress in [0, 1].

    Shapes:
        source: (B_s, E) embeddings; target batch: ``image_pooled`` (B_t, Di) or ``pixel_values``.
    """

    def __init__(self, loss: nn.Module, strength: Callable[[float], float]) -> None:
        super().__init__()
        self.loss = loss
        self.strength = strength

    def forward(self, model: Any, source: torch.Tensor, target: dict[str, Any], progress: float) -> ObjectiveOutput:
        from .objectives import image_features

        z_t = model.project_image(image_features(model, target).pooled)  # (B_t, E)
        out = self.loss(source, z_t, self.strength(progress))
        return ObjectiveOutput(loss=out.loss, metrics={"transfer_loss": out.loss.detach(), **out.metrics()})


class MultiTask(nn.Module):
    """Several objectives over one :class:`~mmtransfer.MultimodalModel`; one combined loss per step.

    The model is held once (the objectives hold only their own heads and loss
    modules), so checkpoints and DDP see each parameter once.

    Args:
        model: the shared model.
        captions: a :class:`~mmtransfer.objectives.CaptionObjective`, or None.
        labels: a :class:`LabelObjective`, or None.
        domain: a :class:`DomainObjective`, or None (needs captions or labels as its source).
        weighting: :class:`FixedWeighting` or :class:`UncertaintyWeighting` over the enabled tasks.

    Batches:
        ``{"captions": caption batch, "labels": label batch, "domain": target image batch}``,
        one entry per enabled task. Each batch's image tower output is computed once
        and shared by the objectives that read it.

    Example:
        >>> task = MultiTask(model, CaptionObjective(cfg, use_itm=False), LabelObjective(head), None,
        ...                  UncertaintyWeighting(["captions", "labels"]))
        >>> out = task(batch, StepInfo(step=0, total_steps=100))   # TaskOutput
        >>> sorted(out.metrics)[:3]
        ['captions/acc_i2t', 'captions/acc_t2i', 'captions/contrastive']
    """

    def __init__(self, model: Any, captions: nn.Module | None, labels: nn.Module | None,
                 domain: nn.Module | None, weighting: nn.Module) -> None:
        super().__init__()
        if captions is None and labels is None:
            raise ConfigError("A multi-task run needs tasks.captions or tasks.labels enabled (the domain loss needs source images).")
        self.model = model
        self.captions = captions
        self.labels = labels
        self.domain = domain
        self.weighting = weighting

    @property
    def names(self) -> list[str]:
        return [k for k in TASKS if getattr(self, k) is not None]

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        from .objectives import image_features

        model = self.model
        batch = {k: _with_image_features(model, b) for k, b in batch.items()}
        outs: dict[str, ObjectiveOutput] = {}
        if self.captions is not None:
            out = self.captions(model, batch["captions"], info)
            outs["captions"] = ObjectiveOutput(out.loss, out.metrics)
        if self.labels is not None:
            outs["labels"] = self.labels(model, batch["labels"])
        if self.domain is not None:
            sources = [model.project_image(image_features(model, batch[k]).pooled) for k in ("captions", "labels") if k in batch]
            outs["domain"] = self.domain(model, torch.cat(sources), batch["domain"], info.progress)  # (B_s, E) source
        combined = self.weighting({k: o.loss for k, o in outs.items()})
        metrics: dict[str, torch.Tensor | float] = {}
        for k, o in outs.items():
            metrics[f"{k}/loss"] = o.loss.detach()
            metrics.update({f"{k}/{m}": v for m, v in o.metrics.items()})
            metrics[f"weight/{k}"] = combined.weights[k]
            if k in combined.log_vars:
                metrics[f"log_var/{k}"] = combined.log_vars[k]
        return TaskOutput(loss=combined.loss, metrics=metrics)


def _with_image_features(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its image tower output as ``image_pooled``/``image_tokens``, computed once from pixels when needed."""
    if "pixel_values" not in batch:
        return batch
    out = model.image_encoder(batch["pixel_values"])
    rest = {k: v for k, v in batch.items() if k != "pixel_values"}
    rest["image_pooled"] = out.pooled  # (B, Di)
    if out.tokens is not None:
        rest["image_tokens"] = out.tokens  # (B, P, Di)
    return rest


# ----------------------------------------------------------------------------- mixing data sets


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
    from .data.collate import undecoded

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


# ----------------------------------------------------------------------------- class names


@dataclass
class ClassSet:
    """Class names and where the data's label ids go.

    Shapes:
        lookup: (L,) for the data set's L label ids: position among ``names``, or -1.
    """

    names: list[str]
    lookup: torch.Tensor

    @classmethod
    def present(cls, datasets: Sequence[Any], what: str) -> "ClassSet":
        """The classes that occur in ``datasets`` (sorted by label id), named by the first one's ClassLabel."""
        feature = datasets[0].features.get("label")
        all_names = list(getattr(feature, "names", None) or [])
        if not all_names:
            raise ConfigError(f"The {what} data has no class names (a ClassLabel 'label' column); labels and zero-shot need them.")
        ids = sorted(set().union(*(set(_labels(d, what).tolist()) for d in datasets)))
        lookup = torch.full((len(all_names),), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        return cls([all_names[i] for i in ids], lookup)

    def prompts(self, templates: Sequence[str]) -> list[str]:
        return [t.format(name) for name in self.names for t in templates]


def _labels(dataset: Any, what: str) -> torch.Tensor:
    if "label" not in dataset.column_names:
        raise ConfigError(f"The {what} data has no 'label' column (columns: {', '.join(dataset.column_names)}); it must be labelled.")
    return torch.tensor(dataset.select_columns(["label"])["label"], dtype=torch.long)


def name_embeddings(model: Any, names: Sequence[str], templates: Sequence[str],
                    text_cache: Any = None, text_rows: dict[str, int] | None = None) -> torch.Tensor:
    """Normalised prompt-ensemble embedding of each class name, in the model's shared space.

    From cached text features of the filled templates when given (frozen text
    tower), else through :func:`mmtransfer.transfer.class_embeddings`.

    Shapes:
        -> (C, E) for C names.
    """
    from .transfer import class_embeddings

    if text_cache is None:
        return class_embeddings(model, names, templates)
    prompts = [t.format(n) for n in names for t in templates]
    rows = torch.tensor([text_rows[p] for p in prompts])  # (C*K,)
    z = model.project_text(text_cache.pooled[rows].to(model.device))  # (C*K, E)
    return F.normalize(z.view(len(names), len(templates), -1).mean(1), dim=-1)  # (C, E)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def classify_split(model: Any, loader: Any, labels: torch.Tensor, classifiers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                   accelerator: Any = None) -> dict[str, float]:
    """Top-1/top-5 (%) of each classifier over the embedded images of ``loader``.

    Rows whose label is -1 (a class the classifiers do not cover) are left out.

    Args:
        loader: image batches with ``image_index`` (cached ``image_pooled`` or ``pixel_values``).
        labels: (N,) class position of each image_index, or -1.
        classifiers: name -> fn mapping (N, E) embeddings to (N, C) logits.
    """
    from .evaluate import embed_all
    from .objectives import image_features

    z, idx = embed_all(loader, lambda b: model.project_image(image_features(model, b).pooled), accelerator)  # (N, E), (N,)
    y = labels[idx]
    keep = y >= 0
    z, y = z[keep], y[keep]
    out: dict[str, float] = {}
    for name, fn in classifiers.items():
        logits = fn(z.to(model.device)).float().cpu()  # (N, C)
        k = min(5, logits.shape[1])
        out[f"{name}top1"] = 100.0 * float((logits.argmax(1) == y).float().mean())
        out[f"{name}top{k}"] = 100.0 * float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())
    return out


# ----------------------------------------------------------------------------- export


HEAD_WEIGHTS = "label_head.safetensors"
HEAD_CONFIG = "label_head.json"


def save_label_head(head: nn.Module, class_names: Sequence[str], folder: str | Path) -> None:
    """Write the label head beside a saved model: ``label_head.safetensors`` and ``label_head.json`` (class names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(json.dumps({"class_names": list(class_names)}, indent=2))


def load_classifier(folder: str | Path) -> Any:
    """A model folder written by a multi-task run with a label head, as an image classifier.

    Returns a :class:`~mmtransfer.transfer.ImageClassifier`: images (PIL or a pixel
    tensor) -> (B, C) logits over the trained classes; ``.predict(images)`` gives names.

    Example:
        >>> clf = load_classifier("runs/multitask_openmoji_joint/model")
        >>> clf.predict([Image.open("emoji.png")])   # from PIL import Image
        ['grinning face']
    """
    import mmtransfer
    from safetensors.torch import load_file

    from .transfer import ImageClassifier, LinearHead

    folder = Path(folder)
    if not (folder / HEAD_WEIGHTS).is_file():
        raise FileNotFoundError(f"'{folder}' has no {HEAD_WEIGHTS}: train a multi-task run with tasks.labels.enabled=true, "
                                "or load the model alone with mmtransfer.load.")
    model = mmtransfer.load(folder)
    weights = load_file(str(folder / HEAD_WEIGHTS))
    names = json.loads((folder / HEAD_CONFIG).read_text())["class_names"]
    return ImageClassifier(model, LinearHead(weights["weight"], weights["bias"]), names).eval()


# ----------------------------------------------------------------------------- the recipe


def _check(cfg: Any) -> dict[str, Any] | None:
    """Combinations that cannot work, each named in one sentence; returns the domain method mapping."""
    t = cfg.tasks
    if not (t.captions.enabled or t.labels.enabled):
        raise ConfigError("Enable tasks.captions or tasks.labels: a multi-task run needs at least one of them "
                          "(the domain loss needs their images as its source).")
    bad = [tpl for tpl in t.templates if "{}" not in tpl]
    if not t.templates or bad:
        raise ConfigError(f"tasks.templates needs at least one template, each with '{{}}' where the class name goes; these have none: {bad}.")
    if t.labels.enabled and t.labels.test is None and t.labels.validation is None:
        logger.warning("tasks.labels trains a head but neither tasks.labels.validation nor tasks.labels.test is set: it is never evaluated.")
    if not t.domain.enabled:
        return None
    method = dict(t.domain.method)
    for key in ("weight", "features"):
        if key in method:
            raise ConfigError(f"tasks.domain.method.{key} does not apply here: the domain loss acts on the shared image "
                              "embedding with weight tasks.domain.weight; remove the key.")
    if method.get("name", "dann") not in ("dann", "mmd", "coral"):
        raise ConfigError(f"tasks.domain.method.name={method.get('name')!r}: the multi-task domain loss is dann, mmd or coral "
                          "(CDAN conditions on class predictions of a single classifier).")
    return method


def _fast_dev(cfg: Any) -> None:
    from .train import fast_dev_slice

    t = cfg.tasks
    fast_dev_slice(cfg.train, (cfg.data.train, cfg.data.validation, cfg.data.test, t.labels.train, t.labels.validation,
                               t.labels.test, t.domain.target, t.zero_shot), 64)
    cfg.train.batch_size = min(cfg.train.batch_size, 16)


def run(cfg: Any, fast_dev_run: bool = False) -> dict[str, Any]:
    """Train and evaluate a multi-task run per ``cfg`` (a :class:`~mmtransfer.finetune.FinetuneConfig` with ``tasks``).

    Returns the summary (also in the run folder's summary.json): validation and
    test metrics per task, keyed ``captions/...``, ``labels/...``, ``zero_shot/...``.
    """
    from . import data as mmdata
    from .finetune import (
        build_model,
        cache_image_features,
        cache_text_features,
        caption_collator,
        caption_templates,
        caption_texts,
        feature_plan,
        load_split,
        retrieval_loaders,
        save_example_image,
        write_test_metrics,
    )
    from .objectives import CaptionObjective, evaluate_retrieval
    from .train import Trainer, make_accelerator
    from .transfer import LinearHead

    t = cfg.tasks
    method = _check(cfg)
    templates = caption_templates(cfg.data)
    if fast_dev_run:
        _fast_dev(cfg)
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.train)
    model = build_model(cfg)
    seed = cfg.train.seed

    # Data: main process first, so built-in sets are rendered once and read by the others.
    reports: dict[str, Any] = {}
    sections = {
        "train": cfg.data.train if t.captions.enabled else None,
        "validation": cfg.data.validation,
        "test": cfg.data.test,
        "labels/train": t.labels.train if t.labels.enabled else None,
        "labels/validation": t.labels.validation,
        "labels/test": t.labels.test,
        "domain/target": t.domain.target if t.domain.enabled else None,
        "zero_shot": t.zero_shot,
    }
    with accelerator.main_process_first():
        splits = {name: load_split(name, section, reports) for name, section in sections.items() if section is not None}
    for name in ("train", "validation", "test"):
        if name in splits and not splits[name].captions:
            raise ConfigError(f"data.{name} has no captions: the caption task and retrieval evaluation need captioned images.")
    label_sources = [splits["labels/train"]] if t.labels.enabled else [splits[k] for k in ("labels/validation", "labels/test") if k in splits]
    classes = ClassSet.present([s.dataset for s in label_sources], "tasks.labels") if label_sources else None
    zero_shot = ClassSet.present([splits["zero_shot"].dataset], "tasks.zero_shot") if "zero_shot" in splits else None
    if classes is not None:
        logger.info("labels: %d classes (%s)", len(classes.names), ", ".join(classes.names[:5]))

    # Frozen towers: every split's image features, and the text of captions and class-name prompts, once.
    use_itm = t.captions.enabled and CaptionObjective.uses_itm(model, cfg.objective)
    plan = feature_plan(model, cfg.data, keep_tokens=use_itm)
    progress = accelerator.is_local_main_process
    bs = cfg.data.eval_batch_size
    caption_splits = {"train", "validation", "test"}
    training = {"train", "labels/train", "domain/target"}
    texts = caption_texts({n: s for n, s in splits.items() if n in caption_splits}, templates)
    texts += [p for cs in (classes, zero_shot) if cs is not None for p in cs.prompts(t.templates)]
    text_cache, text_rows = None, {}
    model.to(accelerator.device)
    with accelerator.main_process_first():
        if plan.cache:
            for name, split in splits.items():
                cache_image_features(model, split, plan, cfg.data.augment, seed, bs, progress, train=name in training,
                                     keep_tokens=plan.keep_tokens and name in caption_splits)
        if plan.text_frozen and (plan.cache or classes is not None or zero_shot is not None):
            text_cache, text_rows = cache_text_features(model, texts, plan, progress)

    # Objectives over the one model.
    captions = CaptionObjective(cfg.objective, use_itm) if t.captions.enabled else None
    if model.fusion is not None and not use_itm:
        model.fusion.requires_grad_(False)  # DDP: no parameter may go without a gradient
    if not t.captions.enabled:
        # Labels alone never read the text side or the temperature.
        model.text_projection.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    labels = None
    if t.labels.enabled:
        with torch.no_grad():
            if t.labels.head_init == "text":
                # The temperature is folded into the rows (scale 1), so under Adam the head stays
                # close to the names and cross-entropy through it pulls images towards their
                # names' text embeddings (docs/multitask.md measures this).
                weight = name_embeddings(model, classes.names, t.templates, text_cache, text_rows) * model.get_logit_scale()
                head = LinearHead(weight.cpu())  # (C, E)
            else:
                # nn.Linear's default range, U(-1/sqrt(E), 1/sqrt(E)), scale 1.
                g = torch.Generator().manual_seed(seed)
                bound = model.config.embed_dim ** -0.5
                head = LinearHead((torch.rand(len(classes.names), model.config.embed_dim, generator=g) * 2 - 1) * bound)
        labels = LabelObjective(head)
    domain = None
    if method is not None:
        from .adapt import MethodConfig, build_domain_loss, grl_lambda
        from .config import from_dict

        mcfg = from_dict(MethodConfig, method, prefix="tasks.domain.method")
        domain = DomainObjective(build_domain_loss(mcfg, model.config.embed_dim, 0, seed), lambda p: grl_lambda(mcfg, p))
    enabled = [k for k in TASKS if getattr(t, k).enabled]
    fixed = {k: getattr(t, k).weight for k in enabled}
    weighting = UncertaintyWeighting(enabled, fixed, t.init_log_var) if t.weighting == "uncertainty" else FixedWeighting(fixed)
    task = MultiTask(model, captions, labels, domain, weighting)

    # Training data: every step holds each enabled task's share of train.batch_size.
    sizes = batch_shares(cfg.train.batch_size, {k: getattr(t, k).share for k in enabled})
    logger.info("Each step: %s (train.batch_size=%d).", ", ".join(f"{n} {k}" for k, n in sizes.items()), cfg.train.batch_size)
    train_names = {"captions": "train", "labels": "labels/train", "domain": "domain/target"}
    datasets = {k: splits[train_names[k]].dataset for k in enabled}
    collators: dict[str, Callable] = {}
    pre = model.preprocessor
    if plan.cache:
        if "captions" in enabled:
            collators["captions"] = caption_collator(model, splits["train"], plan, text_cache, text_rows, train=True, seed=seed,
                                                     templates=templates)
        for k, lookup in (("labels", classes.lookup if classes else None), ("domain", None)):
            if k in enabled:
                s = splits[train_names[k]]
                collators[k] = CachedImageBatches([s.image_feats, *s.augmented_feats],
                                                  None if lookup is None else lookup[_labels(s.dataset, "tasks.labels.train")])
    else:
        aug = cfg.data.augment
        if "captions" in enabled:
            collators["captions"] = mmdata.CaptionCollator.from_model(model, train=True, augment=aug, seed=seed, templates=templates)
        if "labels" in enabled:
            collators["labels"] = _LabelRows(mmdata.ImageCollator(pre.with_augment(aug)), classes.lookup)
        if "domain" in enabled:
            collators["domain"] = mmdata.ImageCollator(pre.with_augment(aug))
    train_loader = mixed_loader(datasets, collators, sizes, seed, {k: not plan.cache for k in enabled}, cfg.train.num_workers)

    # Evaluation: retrieval on captioned splits, head and class names on labelled ones, zero-shot names.
    loaders: dict[str, Any] = {}
    for name in ("validation", "test"):
        if name in splits:
            loaders.update(retrieval_loaders(model, splits[name], plan, text_cache, text_rows, bs, seed))
    for name in ("labels/validation", "labels/test", "zero_shot"):
        if name in splits:
            s = splits[name]
            if plan.cache:
                loaders[name] = torch.utils.data.DataLoader(list(range(len(s.dataset))), batch_size=bs,
                                                            collate_fn=CachedImageBatches([s.image_feats]))
            else:
                loaders[name] = mmdata.make_loader(s.dataset, mmdata.ImageCollator(pre), bs)
    eval_labels = {name: (zero_shot if name == "zero_shot" else classes).lookup[_labels(splits[name].dataset, name)]
                   for name in ("labels/validation", "labels/test", "zero_shot") if name in splits}

    def evaluate_split(task: MultiTask, acc: Any, prepared: dict[str, Any], which: str) -> dict[str, float]:
        """Every task's metrics on the ``which`` ("validation" or "test") splits."""
        m = task.model
        out: dict[str, float] = {}
        if f"{which}/images" in prepared:
            r = evaluate_retrieval(m, acc, prepared[f"{which}/images"], prepared[f"{which}/captions"], cfg.data.rerank_k)
            out.update({f"captions/{k}": v for k, v in r.items()})
        scale = m.get_logit_scale()
        if f"labels/{which}" in prepared:
            names_z = name_embeddings(m, classes.names, t.templates, text_cache, text_rows)  # (C, E)
            fns: dict[str, Callable] = {"names_": lambda z: scale * z @ names_z.T}  # (N, E) @ (E, C)
            if task.labels is not None:
                fns[""] = task.labels.head
            r = classify_split(m, prepared[f"labels/{which}"], eval_labels[f"labels/{which}"], fns, acc)
            out.update({f"labels/{k}": v for k, v in r.items()})
        if which == "test" and "zero_shot" in prepared:
            zs_z = name_embeddings(m, zero_shot.names, t.templates, text_cache, text_rows)  # (K, E)
            r = classify_split(m, prepared["zero_shot"], eval_labels["zero_shot"], {"": lambda z: z @ zs_z.T}, acc)
            out.update({f"zero_shot/{k}": v for k, v in r.items()})
        return out

    def evaluate(task: MultiTask, acc: Any, prepared: dict[str, Any]) -> dict[str, float]:
        return {f"val/{k}": v for k, v in evaluate_split(task, acc, prepared, "validation").items()}

    def export(task: MultiTask, folder: Path) -> None:
        task.model.save_pretrained(folder)
        if task.labels is not None:
            save_label_head(task.labels.head, classes.names, folder)

    summary_extra = {"data": {k: r.to_dict() for k, r in reports.items()}, "feature_cache": bool(plan.cache),
                     "augmented_copies": plan.copies, "tasks": enabled, "batch_shares": sizes, "weighting": t.weighting,
                     "label_classes": len(classes.names) if classes else 0,
                     "zero_shot_classes": len(zero_shot.names) if zero_shot else 0}
    trainer = Trainer(task, train_loader, cfg.train, cfg.optim, evaluate=evaluate, eval_loaders=loaders,
                      run_config=cfg, export=export, summary_extra=summary_extra, accelerator=accelerator)
    result = trainer.fit()
    task_ = accelerator.unwrap_model(trainer.task)
    task_.eval()
    with torch.no_grad(), accelerator.autocast():
        test_metrics = evaluate_split(task_, accelerator, trainer.eval_loaders, "test")
    final_weights = {}
    if isinstance(task_.weighting, UncertaintyWeighting):
        final_weights = {k: float(v) for k, v in zip(task_.weighting.names, task_.weighting.log_vars.detach().cpu())}
    summary = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
               "steps": result.step, "tasks": enabled, "batch_shares": sizes, "weighting": t.weighting,
               "log_vars": final_weights, "validation": result.metrics, "test": test_metrics}
    write_test_metrics(accelerator, result.run_dir, test_metrics)
    if accelerator.is_main_process:
        path = result.run_dir / "summary.json"
        data = json.loads(path.read_text())
        data["minutes_total"] = round((time.perf_counter() - started) / 60, 2)
        if final_weights:
            data["final_log_vars"] = final_weights
        path.write_text(json.dumps(data, indent=2))
        summary["example_image"] = save_example_image([s.dataset for s in splits.values()], result.run_dir)
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The end-of-run table printed by ``scripts/finetune_captions.py`` for a multi-task run."""
    test = summary["test"]
    lines = ["", f"Multi-task run: {', '.join(summary['tasks'])} (per step: "
             + ", ".join(f"{n} {k}" for k, n in summary["batch_shares"].items()) + f"; {summary['weighting']} weights)", ""]
    rows = [("captions", "retrieval i2t / t2i R@1 (%)", "captions/i2t_R@1", "captions/t2i_R@1"),
            ("labels", "head top-1 / top-5 (%)", "labels/top1", "labels/top5"),
            ("labels", "class names top-1 / top-5 (%)", "labels/names_top1", "labels/names_top5"),
            ("zero-shot", "unseen names top-1 / top-5 (%)", "zero_shot/top1", "zero_shot/top5")]
    for what, label, a, b in rows:
        if a in test:
            lines.append(f"  test {what:<10} {label:<32} {test[a]:6.2f} / {test.get(b, float('nan')):6.2f}")
    if summary.get("log_vars"):
        lines.append("  learned log-variances s_k: " + ", ".join(f"{k} {v:+.3f}" for k, v in summary["log_vars"].items()))
    lines += ["", f"Run folder: {summary['run_dir']}", f"Model:      {summary['model_dir']}"]
    if "labels" in summary["tasks"]:
        from .finetune import example_image_code

        image, note = example_image_code(summary)
        lines += ["", "Load the classifier:", "  from PIL import Image", "  from mmtransfer.multitask import load_classifier",
                  f"  clf = load_classifier({summary['model_dir']!r})", f"  print(clf.predict([Image.open({image})])){note}"]
    return "\n".join(lines)
