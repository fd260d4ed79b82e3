"""Caption fine-tuning: the recipe behind ``scripts/finetune_captions.py``.

Builds the model, data, cached features (for frozen towers), the caption task
and its retrieval evaluation, then hands them to the one training loop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .data.config import DataConfig
from .models.preprocess import AugmentConfig
from .objectives import CaptionObjectiveConfig
from .train import OptimConfig, TrainConfig

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
    # Compute frozen towers once and reuse their features every step.
    cache_features: bool = True
    # With a frozen image tower and `augment` on: also cache this many augmented
    # copies of every training image's features (each computed once, seeded);
    # every step then draws one of the plain and augmented copies per image.
    # 0 with augment on runs the frozen tower on fresh augmentations every step.
    augmented_copies: int = 0
    # Also keep cached features on disk, keyed by weights and data, for later runs.
    persist_features: bool = True
    # Folder of on-disk feature caches (None: "features" in the data cache folder,
    # $MMTRANSFER_CACHE_DIR or ~/.cache/mmtransfer).
    feature_cache_dir: str | None = None
    # Batch size of evaluation and feature caching.
    eval_batch_size: int = 128
    # Also report retrieval after re-ranking each query's top K candidates with the
    # fusion layer's matching score (ALBEF-style; 0 disables).
    rerank_k: int = 0


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


def _captions(dataset: Any) -> list[list[str]]:
    return [list(c) if not isinstance(c, str) else [c] for c in dataset.select_columns(["captions"])["captions"]]


class _CaptionLoader:
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
class _Split:
    """One data split, ready for training or evaluation."""

    name: str
    dataset: Any
    captions: list[list[str]]
    image_feats: Any = None  # CachedFeatures when the image tower is cached
    augmented_feats: list[Any] = field(default_factory=list)  # augmented copies (training split)


def build_model(cfg: FinetuneConfig) -> Any:
    """Create (or load) the model and apply the freezing policy."""
    import mmtransfer

    model = mmtransfer.load(cfg.init_from) if cfg.init_from else mmtransfer.create_model(cfg.model)
    if cfg.init_from:
        cfg.model = model.config
    f = cfg.freeze
    if f.text:
        model.freeze("text", f.text_keep_last)
    if f.image:
        model.freeze("image", f.image_keep_last)
    return model


def run(cfg: FinetuneConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Train and evaluate per ``cfg``; returns the summary (also written to the run folder)."""
    from . import data as mmdata
    from .features import CachedCaptionCollator, image_features, text_features, with_row_ids
    from .objectives import CaptionTask
    from .train import Trainer, fast_dev_slice, make_accelerator

    if fast_dev_run:
        fast_dev_slice(cfg.train, (cfg.data.train, cfg.data.validation, cfg.data.test), 64)
        cfg.train.batch_size = min(cfg.train.batch_size, 16)
    accelerator = make_accelerator(cfg.train)
    model = build_model(cfg)
    if accelerator.is_main_process:
        logger.info("Model:\n%s", model.parameter_summary())

    # Data: main process first, so built-in sets are rendered once and read by the others.
    reports: dict[str, Any] = {}
    splits: dict[str, _Split] = {}
    with accelerator.main_process_first():
        for name, section in (("train", cfg.data.train), ("validation", cfg.data.validation), ("test", cfg.data.test)):
            if section is None:
                continue
            loaded = mmdata.load_with_report(section)
            reports[name] = loaded.report
            ds = with_row_ids(loaded.dataset)
            splits[name] = _Split(name, ds, _captions(ds))
            logger.info("%s: %d images, %d captions (%s)", name, len(ds), sum(map(len, splits[name].captions)), section.name)

    image_frozen = not any(p.requires_grad for p in model.image_encoder.parameters())
    text_frozen = not any(p.requires_grad for p in model.text_encoder.parameters())
    augment = cfg.data.augment
    copies = cfg.data.augmented_copies if augment.enabled else 0
    if cfg.data.augmented_copies < 0:
        raise ValueError(f"data.augmented_copies must be 0 or more, not {cfg.data.augmented_copies}.")
    if cfg.data.augmented_copies > 0 and not augment.enabled:
        logger.warning("data.augmented_copies=%d has no effect: data.augment is off.", cfg.data.augmented_copies)
    cache = cfg.data.cache_features and image_frozen and (not augment.enabled or copies > 0)
    keep_tokens = model.fusion is not None and cfg.objective.itm_weight > 0
    max_length = model.text_encoder.config.max_length
    bs = cfg.data.eval_batch_size
    feature_dir = None
    if cfg.data.persist_features:
        from .data.config import cache_root

        feature_dir = Path(cfg.data.feature_cache_dir) if cfg.data.feature_cache_dir else cache_root(cfg.data.train) / "features"
    text_cache = None
    text_rows: dict[str, int] = {}
    if cache:
        model.to(accelerator.device)
        with accelerator.main_process_first():
            for split in splits.values():
                loader = mmdata.make_loader(split.dataset, mmdata.ImageCollator(model.preprocessor), bs)
                key = f"{split.dataset._fingerprint}"
                split.image_feats = image_features(
                    model.image_encoder, loader, len(split.dataset), keep_tokens=keep_tokens,
                    cache_dir=feature_dir, data_key=key, progress=accelerator.is_local_main_process,
                )
            train_split = splits["train"]
            augmenting = model.preprocessor.with_augment(augment)
            for k in range(copies):
                # Each copy's augmentations come from their own seed, so the cache key pins them.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.train.seed * 1000 + k)
                    loader = mmdata.make_loader(train_split.dataset, mmdata.ImageCollator(augmenting), bs)
                    train_split.augmented_feats.append(image_features(
                        model.image_encoder, loader, len(train_split.dataset), keep_tokens=keep_tokens,
                        cache_dir=feature_dir, data_key=f"{train_split.dataset._fingerprint}|{augment}|seed={cfg.train.seed}|copy={k}",
                        progress=accelerator.is_local_main_process, desc=f"caching augmented copy {k + 1}/{copies}",
                    ))
            if text_frozen:
                unique = sorted({c for s in splits.values() for caps in s.captions for c in caps})
                text_rows = {c: i for i, c in enumerate(unique)}
                text_cache = text_features(model.text_encoder, unique, keep_tokens=keep_tokens,
                                           cache_dir=feature_dir, progress=accelerator.is_local_main_process)
        logger.info("Frozen towers: training on cached features (image%s%s).", " and text" if text_cache else "",
                    f", {copies} augmented cop{'y' if copies == 1 else 'ies'} of the training images" if copies else "")

    if cfg.objective.positives == "label" and "label" not in splits["train"].dataset.column_names:
        raise ValueError(f"objective.positives=label needs class labels, but the training data ({cfg.data.train.name}) "
                         "has no 'label' column; use objective.positives=caption.")

    def cached_collator(split: _Split, train: bool) -> CachedCaptionCollator:
        feats = [split.image_feats, *split.augmented_feats] if train else split.image_feats
        labels = split.dataset["label"] if "label" in split.dataset.column_names else None
        labels = None if labels is None or None in labels else labels
        return CachedCaptionCollator(feats, split.captions, text_cache, text_rows,
                                     model.tokenizer, max_length, train=train, seed=cfg.train.seed, labels=labels)

    train_split = splits["train"]
    if cache:
        train_loader = torch.utils.data.DataLoader(
            list(range(len(train_split.dataset))), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
            collate_fn=cached_collator(train_split, train=True),
        )
    else:
        collate = mmdata.CaptionCollator.from_model(model, train=True, augment=cfg.data.augment, seed=cfg.train.seed)
        train_loader = mmdata.make_loader(train_split.dataset, collate, cfg.train.batch_size, shuffle=True,
                                          seed=cfg.train.seed, num_workers=cfg.train.num_workers, drop_last=True)
    if len(train_loader) == 0:
        raise ValueError(f"The training split has {len(train_split.dataset)} images, fewer than one batch of {cfg.train.batch_size}: lower train.batch_size.")

    def eval_loaders(split: _Split) -> dict[str, Any]:
        if cache:
            positions = list(range(len(split.dataset)))
            images = torch.utils.data.DataLoader(positions, batch_size=bs, collate_fn=cached_collator(split, train=False))
        else:
            images = mmdata.make_loader(split.dataset, mmdata.ImageCollator(model.preprocessor), bs)
        captions = _CaptionLoader(split.captions, model.tokenizer, max_length, text_cache, text_rows).dataloader(bs)
        return {f"{split.name}/images": images, f"{split.name}/captions": captions}

    loaders: dict[str, Any] = {}
    for name in ("validation", "test"):
        if name in splits:
            loaders.update(eval_loaders(splits[name]))

    task = CaptionTask(model, cfg.objective)

    def evaluate(task: Any, acc: Any, prepared: dict[str, Any]) -> dict[str, float]:
        if "validation/images" not in prepared:
            return {}
        out = task.evaluate_retrieval(acc, prepared["validation/images"], prepared["validation/captions"], cfg.data.rerank_k)
        return {f"val/{k}": v for k, v in out.items()}

    summary_extra = {"data": {k: r.to_dict() for k, r in reports.items()},
                     "feature_cache": bool(cache), "augmented_copies": len(train_split.augmented_feats)}
    trainer = Trainer(task, train_loader, cfg.train, cfg.optim, evaluate=evaluate, eval_loaders=loaders,
                      run_config=cfg, export=lambda t, d: t.model.save_pretrained(d), summary_extra=summary_extra,
                      accelerator=accelerator)
    result = trainer.fit()
    test_metrics: dict[str, float] = {}
    if "test/images" in trainer.eval_loaders:
        task_ = accelerator.unwrap_model(trainer.task)
        task_.eval()
        with torch.no_grad():
            test_metrics = task_.evaluate_retrieval(accelerator, trainer.eval_loaders["test/images"],
                                                    trainer.eval_loaders["test/captions"], cfg.data.rerank_k)
    summary = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
               "steps": result.step, "validation": result.metrics, "test": test_metrics}
    if accelerator.is_main_process:
        path = result.run_dir / "summary.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data["test_metrics"] = test_metrics
        path.write_text(json.dumps(data, indent=2))
    return summary
