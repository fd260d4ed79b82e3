"""Assembling caption runs from a config: the model with its freezing policy, data splits, feature caches and loaders.

Shared by the caption and multi-task recipes (and the multimodal side of domain
adaptation), so that no recipe copies another's building steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..config import ConfigError, ModelConfig, at_least, check_ranges
from ..data.config import DataConfig
from ..features import FeatureCacheConfig
from ..models.preprocess import AugmentConfig
from ..objectives.captions import CaptionObjectiveConfig
from ..objectives.domain import EmbeddingDomainLossConfig
from ..train import OptimConfig, TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class FreezeConfig:
    """Which pretrained tower weights stay fixed."""

    # Freeze the text tower.
    text: bool = False
    # With text frozen: keep its last N transformer blocks trainable.
    text_keep_last: int = 0
    # Freeze the image tower.
    image: bool = True
    # With image frozen: keep its last N blocks (stages) trainable.
    image_keep_last: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, text_keep_last=at_least(0), image_keep_last=at_least(0))


@dataclass
class CaptionDataSection:
    """Captioned data for training and evaluation."""

    train: DataConfig = field(default_factory=lambda: DataConfig(name="openmoji", split="train"))
    # Evaluated every train.eval_every steps and at the end (None: no evaluation).
    validation: DataConfig | None = field(default_factory=lambda: DataConfig(name="openmoji", split="validation"))
    # Evaluated once after training (None: skip).
    test: DataConfig | None = field(default_factory=lambda: DataConfig(name="openmoji", split="test"))
    # Train-time augmentation. With a trainable image tower it is applied every step;
    # with a frozen one it needs augmented_copies > 0 to keep the feature cache.
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Prompt templates for the training captions, '{}' marking the caption (["{}", "an emoji
    # of {}."]), or "default" for the zero-shot classifier's own (mmtransfer.transfer.
    # DEFAULT_TEMPLATES): every step draws each caption in one of them, so the image side
    # learns the prompts that zero-shot classification will ask with. None: captions as written.
    caption_templates: list[str] | str | None = None
    # Feature cache of frozen towers. With a frozen image tower and `augment` on, caching
    # needs augmented_copies > 0.
    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    # With a frozen image tower and `augment` on: also cache this many augmented
    # copies of every training image's features (each computed once, seeded);
    # every step then draws one of the plain and augmented copies per image.
    # 0 with augment on runs the frozen tower on fresh augmentations every step.
    augmented_copies: int = 0
    # Also report retrieval after re-ranking each query's top K candidates with the
    # fusion layer's matching score (ALBEF-style; 0 disables).
    rerank_k: int = 0
    # Streamed training shards (train.name "wds:..." or "parquet:..."): samples each DataLoader
    # worker holds to shuffle them (0: shard order only; the shard order is shuffled every epoch).
    shuffle_buffer: int = 1000

    def __post_init__(self) -> None:
        check_ranges(self, augmented_copies=at_least(0), rerank_k=at_least(0), shuffle_buffer=at_least(0))


@dataclass
class FinetuneConfig:
    """Everything a caption fine-tuning run needs; YAML recipes map onto it one-to-one."""

    model: ModelConfig = field(default_factory=ModelConfig)
    # Start from a saved model folder instead of building `model` from pretrained towers.
    init_from: str | None = None
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    data: CaptionDataSection = field(default_factory=CaptionDataSection)
    objective: CaptionObjectiveConfig = field(default_factory=CaptionObjectiveConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/finetune_captions"))
    optim: OptimConfig = field(default_factory=OptimConfig)


def caption_templates(section: CaptionDataSection) -> tuple[str, ...] | None:
    """``data.caption_templates`` resolved ("default": the zero-shot templates) and checked."""
    from ..data.collate import check_templates
    from ..transfer import DEFAULT_TEMPLATES

    value = section.caption_templates
    if value == "default":
        return tuple(DEFAULT_TEMPLATES)
    try:
        return check_templates(value, "data.caption_templates")
    except ValueError as err:
        raise ConfigError(f'{err} Or use data.caption_templates=default for the zero-shot templates.') from None


def caption_texts(splits: dict[str, "Split"], templates: Sequence[str] | None, train: str = "train") -> list[str]:
    """Every text the caption splits can feed the text tower: the training split's in each template's form."""
    from ..data.collate import templated

    return [t for name, s in splits.items() for caps in s.captions for t in templated(caps, templates if name == train else None)]


def captions_of(dataset: Any) -> list[list[str]]:
    return [list(c) if not isinstance(c, str) else [c] for c in dataset.select_columns(["captions"])["captions"]]


class CaptionLoader:
    """Every caption of every image: batches of input_ids, attention_mask and image_index (the owner),
    plus text_pooled/text_tokens when the text tower's features are cached."""

    def __init__(self, captions: list[list[str]], tokenizer: Any, max_length: int,
                 text_cache: Any = None, text_rows: dict[str, int] | None = None) -> None:
        self.items = [(c, i) for i, caps in enumerate(captions) for c in caps]
        self.tokenizer, self.max_length = tokenizer, max_length
        self.text_cache, self.text_rows = text_cache, text_rows or {}

    def dataloader(self, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.items, batch_size=batch_size, shuffle=False, collate_fn=self)

    def __call__(self, rows: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, owners = zip(*rows)
        batch: dict[str, torch.Tensor] = {"image_index": torch.tensor(owners)}
        if self.text_cache is None:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            batch.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            return batch
        t = torch.tensor([self.text_rows[c] for c in texts])  # (B,)
        mask = self.text_cache.attention_mask[t]  # (B, T_max)
        T = int(mask.sum(1).max())
        batch.update(input_ids=self.text_cache.input_ids[t, :T], attention_mask=mask[:, :T],
                     text_pooled=self.text_cache.pooled[t])
        if self.text_cache.tokens is not None:
            batch["text_tokens"] = self.text_cache.tokens[t, :T].float()  # (B, T, Dt)
        return batch


@dataclass
class Split:
    """One data split, ready for training or evaluation."""

    name: str
    dataset: Any
    captions: list[list[str]]  # empty for data without captions (e.g. a labelled split)
    image_feats: Any = None  # CachedFeatures when the image tower is cached
    augmented_feats: list[Any] = field(default_factory=list)  # augmented copies (training split)


def load_split(name: str, section: DataConfig, reports: dict[str, Any]) -> Split:
    """Load one data section with row ids 0..N-1 (and its captions, when it has them); its report goes into ``reports``."""
    from .. import data as mmdata
    from ..features import with_row_ids

    loaded = mmdata.load_with_report(section)
    reports[name] = loaded.report
    ds = with_row_ids(loaded.dataset)
    split = Split(name, ds, captions_of(ds) if "captions" in ds.column_names else [])
    logger.info("%s: %d images, %d captions (%s)", name, len(ds), sum(map(len, split.captions)), section.name)
    return split


def stream_loader(model: Any, cfg: FinetuneConfig, templates: Sequence[str] | None, accelerator: Any) -> Any:
    """Training batches streamed from the shards ``cfg.data.train`` names (:class:`~mmtransfer.data.StreamLoader`)."""
    from ..data.collate import CaptionCollator
    from ..data.streaming import ShardStream, StreamLoader

    collate = CaptionCollator.from_model(model, train=True, augment=cfg.data.augment, seed=cfg.train.seed, templates=templates)
    stream = ShardStream(cfg.data.train, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                         batch_size=cfg.train.batch_size, collate_fn=collate, num_workers=cfg.train.num_workers,
                         rank=accelerator.process_index, world_size=accelerator.num_processes)
    loader = StreamLoader(stream, seed=cfg.train.seed)
    logger.info("train: streaming %d %s shard(s), %d samples; %d step(s) per epoch on each of %d process(es).",
                len(stream.paths), stream.kind, sum(stream.counts), len(loader), accelerator.num_processes)
    return loader


def streaming_plan(plan: "FeaturePlan", data: CaptionDataSection) -> "FeaturePlan":
    """A streamed training split is read afresh every epoch: never a feature cache (every split then runs its towers)."""
    import dataclasses

    if plan.cache or data.augmented_copies:
        logger.info("train streams from %s: no feature cache (it cannot hold an unbounded stream); the frozen towers run "
                    "on every batch%s.", data.train.name, ", and data.augmented_copies is not used" if data.augmented_copies else "")
    return dataclasses.replace(plan, cache=False, copies=0)


@dataclass
class FeaturePlan:
    """Which tower outputs a run computes once and reuses (see :mod:`mmtransfer.features`)."""

    # Image tower features are cached (frozen tower, no augmentation or augmented copies).
    cache: bool
    # The text tower is frozen: caption features are cached too.
    text_frozen: bool
    # Augmented copies of each training image's features (per set).
    copies: int
    # Keep token features (the fusion layer needs them).
    keep_tokens: bool
    # On-disk cache folder (None: memory only).
    folder: Path | None


def feature_plan(model: Any, data: CaptionDataSection, keep_tokens: bool) -> FeaturePlan:
    """Decide, from the freezing policy and the data options, what is cached."""
    image_frozen = not any(p.requires_grad for p in model.image_encoder.parameters())
    text_frozen = not any(p.requires_grad for p in model.text_encoder.parameters())
    augment = data.augment
    if data.augmented_copies < 0:
        raise ValueError(f"data.augmented_copies must be 0 or more, not {data.augmented_copies}.")
    if data.augmented_copies > 0 and not augment.enabled:
        logger.warning("data.augmented_copies=%d has no effect: data.augment is off.", data.augmented_copies)
    copies = data.augmented_copies if augment.enabled else 0
    cache = data.features.cache and image_frozen and (not augment.enabled or copies > 0)
    folder = None
    if data.features.persist:
        from ..data.config import cache_root

        folder = Path(data.features.folder) if data.features.folder else cache_root(data.train) / "features"
    return FeaturePlan(cache, text_frozen, copies if cache else 0, keep_tokens, folder)


def cache_image_features(model: Any, split: Split, plan: FeaturePlan, augment: AugmentConfig, seed: int,
                         batch_size: int, progress: bool, train: bool = False, keep_tokens: bool | None = None) -> None:
    """Fill ``split.image_feats`` (and, for a training split, its augmented copies) from the frozen image tower."""
    from .. import data as mmdata
    from ..features import image_features

    tokens = plan.keep_tokens if keep_tokens is None else keep_tokens
    ds = split.dataset
    loader = mmdata.make_loader(ds, mmdata.ImageCollator(model.preprocessor), batch_size)
    split.image_feats = image_features(model.image_encoder, loader, len(ds), keep_tokens=tokens, cache_dir=plan.folder,
                                       data_key=f"{ds._fingerprint}", progress=progress)
    if not train:
        return
    augmenting = model.preprocessor.with_augment(augment)
    split.augmented_feats = []
    total = plan.copies
    for k in range(total):
        # Each copy's augmentations come from their own seed, so the cache key pins them.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            loader = mmdata.make_loader(ds, mmdata.ImageCollator(augmenting), batch_size)
            split.augmented_feats.append(image_features(
                model.image_encoder, loader, len(ds), keep_tokens=tokens, cache_dir=plan.folder,
                data_key=f"{ds._fingerprint}|{augment}|seed={seed}|copy={k}",
                progress=progress, desc=f"caching augmented copy {k + 1}/{total}",
            ))


def cache_text_features(model: Any, texts: Any, plan: FeaturePlan, progress: bool, keep_tokens: bool | None = None) -> tuple[Any, dict[str, int]]:
    """Frozen text tower features of the distinct ``texts`` (sorted) and each text's row in them."""
    from ..features import text_features

    unique = sorted(set(texts))
    rows = {c: i for i, c in enumerate(unique)}
    tokens = plan.keep_tokens if keep_tokens is None else keep_tokens
    return text_features(model.text_encoder, unique, keep_tokens=tokens, cache_dir=plan.folder, progress=progress), rows


def caption_collator(model: Any, split: Split, plan: FeaturePlan, text_cache: Any, text_rows: dict[str, int],
                     train: bool, seed: int, templates: Sequence[str] | None = None) -> Any:
    """Positions (or ``(position, draw)`` pairs) of ``split`` -> caption batches from its cached image features."""
    from ..features import CachedCaptionCollator

    feats = [split.image_feats, *split.augmented_feats] if train else split.image_feats
    labels = split.dataset["label"] if "label" in split.dataset.column_names else None
    labels = None if labels is None or None in labels else labels  # (N,) class ids, only when every row has one
    return CachedCaptionCollator(feats, split.captions, text_cache, text_rows, model.tokenizer,
                                 model.text_encoder.config.max_length, train=train, seed=seed, labels=labels, templates=templates)


def retrieval_loaders(model: Any, split: Split, plan: FeaturePlan, text_cache: Any, text_rows: dict[str, int],
                      batch_size: int, seed: int) -> dict[str, Any]:
    """``<split>/images`` and ``<split>/captions`` loaders for :func:`~mmtransfer.objectives.evaluate_retrieval`."""
    from .. import data as mmdata

    if plan.cache:
        positions = list(range(len(split.dataset)))
        collate = caption_collator(model, split, plan, text_cache, text_rows, train=False, seed=seed)
        images = torch.utils.data.DataLoader(positions, batch_size=batch_size, collate_fn=collate)
    else:
        images = mmdata.make_loader(split.dataset, mmdata.ImageCollator(model.preprocessor), batch_size)
    captions = CaptionLoader(split.captions, model.tokenizer, model.text_encoder.config.max_length,
                              text_cache, text_rows).dataloader(batch_size)
    return {f"{split.name}/images": images, f"{split.name}/captions": captions}


def build_model(cfg: Any) -> Any:
    """Create (or load) the model and apply the freezing policy.

    ``cfg`` is any section with ``init_from``, ``model`` and ``freeze`` (a :class:`FinetuneConfig`, or the
    multimodal section of a domain-adaptation config).
    """
    from ..models.factory import create_model, load

    model = load(cfg.init_from) if cfg.init_from else create_model(cfg.model)
    if cfg.init_from:
        if cfg.model.gradient_checkpointing:  # a training setting: the recipe's applies to the saved model too
            model.set_gradient_checkpointing(True)
        cfg.model = model.config
    f = cfg.freeze
    if f.text:
        model.freeze("text", f.text_keep_last)
    if f.image:
        model.freeze("image", f.image_keep_last)
    return model


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
    # The domain loss on the shared image embedding (its weight is tasks.domain.weight).
    method: EmbeddingDomainLossConfig = field(default_factory=EmbeddingDomainLossConfig)

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


@dataclass
class MultitaskConfig(FinetuneConfig):
    """A caption run with a ``tasks`` section: captions, labels and a domain loss over one model."""

    # Multi-task training: captions, labels and a domain loss in one run, each with its share of
    # every step's images and its loss weight (see docs/multitask.md).
    tasks: TasksConfig = field(default_factory=TasksConfig)
