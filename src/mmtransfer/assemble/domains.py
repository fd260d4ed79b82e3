"""Assembling domain-adaptation runs from a config: source and target data, the classifier or multimodal
model, its domain task, importance weights. Shared by the adaptation and distillation recipes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import nn

from ..config import ConfigError, ModelConfig, at_least, check_ranges, to_dict
from ..data.config import DataConfig
from ..features import FeatureCacheConfig
from ..models.classifier import BackboneClassifier, ClassifierConfig
from ..models.preprocess import AugmentConfig
from ..objectives.domain import ClassifyAdaptTask, MethodConfig, MultimodalAdaptTask
from ..train import OptimConfig, TrainConfig
from .captions import FreezeConfig
from .domain_data import (
    CachedImages,
    MappedLabels,
    Sources,
    TensorBatches,
    WithoutLabels,
    _labels,
    _loader,
    accuracy,
    align_classes,
    check_loaders,
    class_names_of,
    collect,
    pool_sources,
    preprocess_all,
    subset,
    whole_folder,
    with_rows,
    zero_shot_candidates,
)
from .fast_dev import fast_dev_slice
from .selection_run import HOLDOUT, TARGET_UNLABELLED, SelectionConfig, hold_out, label_free_metrics, target_sample

logger = logging.getLogger(__name__)


@dataclass
class MultimodalSection:
    """The model of the multimodal task (source captions, zero-shot evaluation)."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(fusion=_no_fusion()))
    # Start from a saved model folder instead of building `model` from pretrained towers.
    init_from: str | None = None
    freeze: FreezeConfig = field(default_factory=lambda: FreezeConfig(text=True, image=True))
    # Zero-shot prompt: each class name is put in place of {} and encoded as text.
    prompt: str = "{}"


def _no_fusion() -> Any:
    from ..config import FusionConfig

    return FusionConfig(num_layers=0)


@dataclass
class AdaptDataConfig:
    """Source, target and evaluation data."""

    # Labelled source images (captioned, for the multimodal task).
    source: DataConfig = field(default_factory=lambda: DataConfig(name="mnist5k", split="train"))
    # More labelled source domains, trained on together with `source` (domain
    # generalisation): each is a domain of its own for the domain loss. They must
    # share the source's class names (classify) or have captions (multimodal).
    extra_sources: list[DataConfig] = field(default_factory=list)
    # Draw every source domain equally often (the smaller ones repeat within an epoch);
    # false: rows in proportion to the sources' sizes.
    balance_sources: bool = True
    # Unlabelled target images; labels, if the set has any, are never read. None: no
    # target (domain generalisation from several sources, or source-only training).
    target: DataConfig | None = field(default_factory=lambda: DataConfig(name="usps", split="train"))
    # Labelled target images for the target accuracy (None: none measured). Classify task:
    # class names are matched to the source's ignoring case and spacing, "0" = "zero".
    # Multimodal task: a captioned folder without a label column works too: each image's
    # first caption is its class name.
    target_test: DataConfig | None = field(default_factory=lambda: DataConfig(name="usps", split="test"))
    # Labelled source images for the source accuracy (None: the source training images).
    source_test: DataConfig | None = None
    # Train-time augmentation of source and target images (classify task).
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Preprocess every image once and keep the tensors in memory (fast for small images
    # such as digits; turn off for large image folders). Needs augmentation off.
    in_memory: bool = True
    # Feature cache of frozen, unaugmented towers (multimodal task).
    features: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    # Evaluate on at most this many images of each evaluation set (None: all).
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        check_ranges(self, max_eval_samples=at_least(1))


@dataclass
class ReweightConfig:
    """Importance weights for the source rows: p_target(x) / p_source(x), estimated once before training."""

    # "none"; "classifier": a logistic-regression domain classifier on the features (L2
    # penalty by cross-validation, out-of-fold predictions, Platt-calibrated), w = (n_s/n_t)
    # p(t|x)/p(s|x); "kmm": kernel mean matching. Needs data.target.
    method: Literal["none", "classifier", "kmm"] = "none"
    # Features the ratio is estimated on: "pixels" (each image shrunk to pixel_size and
    # flattened: fine for digits and a LeNet trained from scratch), "encoder" (the pooled
    # features of the pretrained image encoder named in `encoder`), or "model" (a saved
    # model's features, from model_dir: an BackboneClassifier's bottleneck, or a
    # MultimodalModel's image embedding).
    features: Literal["pixels", "encoder", "model"] = "pixels"
    # features=pixels: side of the shrunk images.
    pixel_size: int = 16
    # features=encoder: an image encoder name (timm, packaged alias, torchvision:resnet50).
    encoder: str = "efficientnet-lite0"
    # features=model: a folder written by this script (model/) or by finetune_captions.py.
    model_dir: str | None = None
    # Reduce the standardised features to this many principal components (None: keep all).
    pca_dim: int | None = 64
    # Flatten the ratio to ratio ** power before clipping (adaptive importance weighting):
    # 1 the full ratio, 0 no weighting; in between trades bias for variance.
    power: float = 1.0
    # Weights are normalised to mean 1 and clipped at this value, then renormalised
    # (None: no clipping).
    clip_max: float | None = 10.0
    # classifier: L2 penalties tried; the lowest cross-validated log loss wins.
    l2_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    # classifier: cross-fitting folds.
    folds: int = 5
    # classifier: Platt-scale the out-of-fold logits before taking the ratio.
    calibrate: bool = True
    # kmm: Gaussian kernel width as a multiple of the median pairwise distance.
    kmm_bandwidth_scale: float = 1.0
    # kmm: upper bound B on each weight while solving.
    kmm_bound: float = 1000.0
    # kmm: projected-gradient steps (fewer smooth the weights).
    kmm_iterations: int = 300
    # Use at most this many target rows (a seeded sample) for the estimate (None: all).
    max_target: int | None = 10000


@dataclass
class PlotConfig:
    """The 2-D embedding plot of source and target features written to the run folder."""

    # Write embeddings.png (needs scikit-learn).
    enabled: bool = True
    # "tsne" or "pca" (scikit-learn).
    method: Literal["tsne", "pca"] = "tsne"
    # Points drawn per domain (a seeded sample of the evaluation sets).
    max_points: int = 500

    def __post_init__(self) -> None:
        check_ranges(self, max_points=at_least(1))
    # embeddings_final.npz of another run (e.g. the source-only run) drawn as "before
    # adaptation"; None: this run's own features at step 0.
    before: str | None = None


@dataclass
class AdaptConfig:
    """Everything a domain-adaptation run needs; YAML recipes map onto it one-to-one."""

    # "classify": an image classifier on source labels, accuracy on target labels.
    # "multimodal": a MultimodalModel on source captions, zero-shot accuracy by class names.
    task: Literal["classify", "multimodal"] = "classify"
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    multimodal: MultimodalSection = field(default_factory=MultimodalSection)
    data: AdaptDataConfig = field(default_factory=AdaptDataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    plot: PlotConfig = field(default_factory=PlotConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/domain_adapt", trackers=[], eval_batch_size=256))
    optim: OptimConfig = field(default_factory=OptimConfig)


def check_config(cfg: AdaptConfig) -> None:
    """Combinations that cannot work, each named in one sentence."""
    m = cfg.method
    if cfg.task == "classify" and m.features in ("embedding", "fused"):
        raise ConfigError(f"method.features={m.features} needs task=multimodal; a classifier adapts 'auto' (bottleneck) or 'pooled' features.")
    if cfg.task == "multimodal" and m.name in ("cdan", "cdan+e"):
        raise ConfigError(
            f"method.name={m.name} conditions on class predictions, which the caption-trained multimodal task does not make; "
            "use dann, mmd or coral there."
        )
    if m.weight < 0:
        raise ConfigError(f"method.weight must be >= 0, got {m.weight}.")
    if cfg.selection.holdout > 0 and (cfg.task != "classify" or cfg.data.target is None):
        raise ConfigError("selection.holdout needs task=classify and a data.target: the risks weigh held-out source images by target likeness.")
    sources = 1 + len(cfg.data.extra_sources)
    if cfg.data.target is None and m.name != "none" and sources == 1:
        raise ConfigError(
            f"method.name={m.name} needs a second domain: set data.target (unlabelled target images) or add labelled "
            "sources to data.extra_sources; or use method.name=none."
        )
    if sources > 1 and m.name in ("cdan", "cdan+e"):
        raise ConfigError(
            f"method.name={m.name} has no multi-domain form here; with data.extra_sources use dann (a K-way domain "
            "discriminator), coral or mmd (between every pair of domains)."
        )
    r = cfg.reweight
    if r.method != "none":
        if cfg.data.target is None:
            raise ConfigError(f"reweight.method={r.method} estimates p_target(x)/p_source(x) and needs data.target (unlabelled target images).")
        if r.clip_max is not None and r.clip_max <= 1.0:
            raise ConfigError(f"reweight.clip_max must be above 1 (weights have mean 1), got {r.clip_max}; or null for no clipping.")
        if r.features == "model" and not r.model_dir:
            raise ConfigError("reweight.features=model needs reweight.model_dir: a saved model folder (e.g. runs/<run>/model).")
        if not 0.0 <= r.power <= 1.0:
            raise ConfigError(f"reweight.power must lie in [0, 1] (1: the full ratio, 0: no weighting), got {r.power}.")
        if r.folds < 2:
            raise ConfigError(f"reweight.folds must be at least 2 (cross-fitting), got {r.folds}.")
    if cfg.data.in_memory and cfg.data.augment.enabled and cfg.task == "classify":
        logger.info("data.augment is on: images are preprocessed on the fly (data.in_memory is ignored).")


# Builds the task around a freshly built model: (model, accelerator) -> task.
TaskFactory = Callable[[nn.Module, Any], nn.Module]


@dataclass
class Built:
    """What the two tasks hand to the trainer."""

    task: nn.Module
    train_loader: Any
    eval_loaders: dict[str, Any]
    evaluate: Callable[[nn.Module, Any, dict[str, Any]], dict[str, float]]
    export: Callable[[nn.Module, Path], None]
    info: dict[str, Any]


def _fast_dev(cfg: AdaptConfig) -> None:
    # A balanced sample of 64 rows per section: the first 64 digits are all one class.
    fast_dev_slice(cfg.train, (cfg.data.source, *cfg.data.extra_sources, cfg.data.target, cfg.data.target_test,
                               cfg.data.source_test), 64)
    cfg.data.max_eval_samples = min(cfg.data.max_eval_samples or 64, 64)
    cfg.train.batch_size = min(cfg.train.batch_size, 16)
    cfg.plot.max_points = min(cfg.plot.max_points, 64)
    cfg.reweight.folds = min(cfg.reweight.folds, 3)


def load_sets(cfg: AdaptConfig, accelerator: Any) -> tuple[dict[str, Any], dict[str, Any], Sources]:
    from .. import data as mmdata

    sets: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    sources = [cfg.data.source, *cfg.data.extra_sources]
    sections = {("source" if i == 0 else f"source{i}"): s for i, s in enumerate(sources)}
    sections.update({"target": cfg.data.target, "target_test": cfg.data.target_test, "source_test": cfg.data.source_test})
    roles = {name: f"data.extra_sources[{int(name[6:]) - 1}]" if name[6:].isdigit() else f"data.{name}" for name in sections}
    with accelerator.main_process_first():
        for name, section in sections.items():
            if section is None:
                continue
            section = whole_folder(section, roles[name])
            loaded = mmdata.load_with_report(section)
            sets[name], reports[name] = loaded.dataset, loaded.report.to_dict()
            logger.info("%s: %d images (%s, split %s)", name, len(loaded.dataset), section.name, section.split)
    if cfg.task == "classify":  # the classifier's classes are the source's: the others' labels are renumbered onto them
        names = class_names_of(sets["source"], "source")
        for name in [n for n in sets if n not in ("source", "target")]:
            sets[name] = align_classes(sets[name], names, roles[name])
    parts = [sets.pop(name) for name in list(sections)[: len(sources)]]
    names = [f"{s.name}:{s.split}" if s.split else s.name for s in sources]
    if cfg.selection.holdout > 0:  # held-out source images for label-free selection; they never train
        parts, held = (list(x) for x in zip(*(hold_out(p, cfg.selection.holdout, cfg.train.seed) for p in parts)))
        sets[HOLDOUT] = pool_sources(held, names, need_labels=True)[0]
    pooled, domain = pool_sources(parts, names, need_labels=cfg.task == "classify")
    sets["source"] = pooled
    return sets, reports, Sources(parts, names, pooled, domain)


def eval_sets(cfg: AdaptConfig, sets: dict[str, Any]) -> dict[str, Any]:
    """Evaluation sets named by domain: 'source' (source_test or the source images) and 'target' (target_test)."""
    out = {"source": subset(sets.get("source_test", sets["source"]), cfg.data.max_eval_samples, cfg.train.seed)}
    if "target_test" in sets:
        out["target"] = subset(sets["target_test"], cfg.data.max_eval_samples, cfg.train.seed)
    if HOLDOUT in sets:
        out[HOLDOUT] = sets[HOLDOUT]
    return out


def build_classify(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: Sources,
                    make_task: TaskFactory | None = None) -> Built:
    from ..data.collate import LabelCollator, PairedLoader, make_loader
    from ..features import with_row_ids

    names = class_names_of(sets["source"], "source")
    for key in ("target_test", "source_test"):
        if key in sets:
            other = class_names_of(sets[key], key)
            if other != names:
                raise ConfigError(
                    f"data.{key} has classes {other[:5]}... but the source has {names[:5]}...: both must list the same "
                    "classes in the same order (set class_names on the data sections)."
                )
    model = BackboneClassifier(cfg.classifier, len(names), names)
    task = (make_task(model, accelerator) if make_task else
            ClassifyAdaptTask(model, cfg.method, seed=cfg.train.seed, num_sources=sources.count, with_target="target" in sets))
    pre = model.preprocessor
    bs, ebs, seed = cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.seed
    evals = eval_sets(cfg, sets)
    items = sources.items(cfg.data.balance_sources, seed)
    in_memory = cfg.data.in_memory and not cfg.data.augment.enabled
    progress = accelerator.is_local_main_process and cfg.train.progress_bar
    target = None
    if in_memory:
        started = time.perf_counter()
        # (N, 3, S, S): every source's images, in pooled-row order
        pixels: dict[str, torch.Tensor] = {"source": torch.cat([preprocess_all(p, pre, progress=progress) for p in sources.parts])}
        for name, ds in ([("target", sets["target"])] if "target" in sets else []) + [(f"eval/{k}", v) for k, v in evals.items()]:
            pixels[name] = preprocess_all(ds, pre, progress=progress)
        logger.info("Preprocessed %d images into memory in %.1f s.", sum(len(p) for p in pixels.values()), time.perf_counter() - started)
        source = _loader(items, with_rows(TensorBatches(pixels["source"], _labels(sets["source"])), sources), bs, True, seed, True)
        if "target" in sets:
            target = _loader(list(range(len(sets["target"]))), TensorBatches(pixels["target"], None), bs, True, seed + 1, True)
        eval_loaders = {k: _loader(list(range(len(v))), TensorBatches(pixels[f"eval/{k}"], _labels(v)), ebs, False, seed, False)
                        for k, v in evals.items()}
        if HOLDOUT in sets:
            unlabelled = TensorBatches(pixels["target"], torch.full((len(pixels["target"]),), -1))
            rows = target_sample(len(pixels["target"]), cfg.selection.max_target, seed)
            eval_loaders[TARGET_UNLABELLED] = _loader(rows, unlabelled, ebs, False, seed, False)
    else:
        aug = cfg.data.augment
        nw = cfg.train.num_workers
        source_ds = sets["source"]
        if sources.row_values() or len(items) != len(source_ds):
            source_ds = with_row_ids(source_ds)
            source_ds = source_ds if len(items) == len(source_ds) else source_ds.select(items)
        source = make_loader(source_ds, with_rows(LabelCollator(pre, train=True, augment=aug), sources), bs, shuffle=True, seed=seed,
                             num_workers=nw, drop_last=True)
        if "target" in sets:
            target = make_loader(sets["target"], WithoutLabels(LabelCollator(pre, train=True, augment=aug, require_labels=False)),
                                 bs, shuffle=True, seed=seed + 1, num_workers=nw, drop_last=True)
        eval_loaders = {k: make_loader(v, LabelCollator(pre), ebs, num_workers=nw) for k, v in evals.items()}
        if HOLDOUT in sets:
            rows = target_sample(len(sets["target"]), cfg.selection.max_target, seed)
            eval_loaders[TARGET_UNLABELLED] = make_loader(sets["target"].select(rows), LabelCollator(pre, require_labels=False),
                                                          ebs, num_workers=nw)
    check_loaders(bs, source=source, target=target)
    train_loader = PairedLoader(source, target, steps="max", seed=seed)

    def evaluate(task: ClassifyAdaptTask, acc: Any, loaders: dict[str, Any]) -> dict[str, float]:
        feats = {name: collect(loader, task.embed, acc) for name, loader in loaders.items()}
        unlabelled = feats.pop(TARGET_UNLABELLED, None)
        out = {f"{name}_acc": accuracy(f["logits"], f["labels"]) for name, f in feats.items()}
        if "source" in feats and "target" in feats:
            dacc = task.domain_accuracy(feats["source"], feats["target"])
            if dacc is not None:
                out["domain_acc"] = 100.0 * dacc
        if unlabelled is not None:
            out.update(label_free_metrics(feats[HOLDOUT], unlabelled, seed))
        return out

    info = {"num_classes": len(names), "class_names": names, "parameters": sum(p.numel() for p in model.parameters()),
            "preprocess": to_dict(model.preprocess), "in_memory": in_memory, "sources": sources.names}
    return Built(task, train_loader, eval_loaders, evaluate, lambda t, d: t.model.save_pretrained(d), info)


class ZeroShotEvaluation:
    """Zero-shot accuracy of every evaluation set against the candidate class names, and the domain accuracy."""

    def __init__(self, name_feats: Any, candidate_names: list[str]) -> None:
        self.name_feats, self.candidate_names = name_feats, candidate_names  # cached text features, or None

    def class_embeddings(self, task: MultimodalAdaptTask) -> torch.Tensor:
        m, names = task.model, self.candidate_names
        if self.name_feats is not None:
            return m.project_text(self.name_feats.pooled.to(m.device))  # (K, E)
        return torch.cat([m.encode_text(names[i:i + 256]) for i in range(0, len(names), 256)])

    def __call__(self, task: MultimodalAdaptTask, acc: Any, loaders: dict[str, Any]) -> dict[str, float]:
        zc = self.class_embeddings(task).float().cpu()  # (K, E)
        feats_ = {name: collect(loader, task.embed, acc) for name, loader in loaders.items()}
        out = {f"{name}_acc": accuracy(f["features"] @ zc.T, f["labels"]) for name, f in feats_.items()}  # (N, E) @ (E, K)
        if "source" in feats_ and "target" in feats_:
            dacc = task.domain_accuracy(feats_["source"], feats_["target"])
            if dacc is not None:
                out["domain_acc"] = 100.0 * dacc
        return out


def build_multimodal(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: Sources,
                      make_task: TaskFactory | None = None) -> Built:
    from ..data.collate import CaptionCollator, ImageCollator, PairedLoader, make_loader
    from ..features import CachedCaptionCollator, CachedFeatures, image_features, with_row_ids
    from .captions import build_model, captions_of

    mm = cfg.multimodal
    model = build_model(mm)  # the caption recipe's model and freezing policy (the section has the same keys)
    has_target = "target" in sets
    task = (make_task(model, accelerator) if make_task else
            MultimodalAdaptTask(model, cfg.method, seed=cfg.train.seed, num_sources=sources.count, with_target=has_target))
    if "captions" not in sets["source"].column_names:
        raise ConfigError("task=multimodal trains on source captions, but data.source has no 'captions' column.")
    source_ds = with_row_ids(sets["source"])
    target_ds = with_row_ids(sets["target"]) if has_target else None
    evals = {k: with_row_ids(v) for k, v in eval_sets(cfg, sets).items()}
    captions = captions_of(source_ds)
    items = sources.items(cfg.data.balance_sources, cfg.train.seed)
    image_frozen = not any(p.requires_grad for p in model.image_encoder.parameters())
    text_frozen = not any(p.requires_grad for p in model.text_encoder.parameters())
    cache = cfg.data.features.cache and image_frozen and not cfg.data.augment.enabled
    keep_tokens = task.where == "fused"
    bs, ebs, seed = cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.seed
    feature_dir = feature_folder(cfg)
    progress = accelerator.is_local_main_process and cfg.train.progress_bar

    # Zero-shot candidates: every class that occurs in an evaluation set (e.g. the unseen emoji).
    class_names, eval_labels = zero_shot_candidates(evals)
    candidate_names = [mm.prompt.format(n) for n in class_names]

    model.to(accelerator.device)
    text_cache, text_rows, name_feats = None, {}, None
    with accelerator.main_process_first():
        if text_frozen:
            text_cache, text_rows, name_feats = _frozen_text(model, captions, candidate_names, keep_tokens, feature_dir, progress)
        feats: dict[str, Any] = {}
        if cache:
            # Each source is cached on its own (its cache key is the same as in a single-source run), then pooled.
            parts = [with_row_ids(p) for p in sources.parts]
            for name, ds in ([(f"source/{i}", p) for i, p in enumerate(parts)] + ([("target", target_ds)] if has_target else [])
                             + [(f"eval/{k}", v) for k, v in evals.items()]):
                loader = make_loader(ds, ImageCollator(model.preprocessor), ebs)
                feats[name] = image_features(model.image_encoder, loader, len(ds), keep_tokens=keep_tokens and not name.startswith("eval/"),
                                             cache_dir=feature_dir, data_key=f"{ds._fingerprint}", progress=progress)
            pieces = [feats.pop(f"source/{i}") for i in range(len(parts))]
            feats["source"] = pieces[0] if len(pieces) == 1 else CachedFeatures(
                pooled=torch.cat([f.pooled for f in pieces]),  # (N, Di) in pooled-row order
                tokens=torch.cat([f.tokens for f in pieces]) if keep_tokens else None)  # (N, P, Di)
    target = None
    if cache:
        src_collate = CachedCaptionCollator(feats["source"], captions, text_cache, text_rows, model.tokenizer,
                                            model.text_encoder.config.max_length, train=True, seed=seed)
        source = _loader(items, with_rows(src_collate, sources), bs, True, seed, True)
        if has_target:
            target = _loader(list(range(len(target_ds))), CachedImages(feats["target"]), bs, True, seed + 1, True)
        eval_loaders = {k: _loader(list(range(len(v))), CachedImages(feats[f"eval/{k}"], eval_labels[k]), ebs, False, seed, False)
                        for k, v in evals.items()}
        logger.info("Frozen image tower: training on cached image features.")
    else:
        nw = cfg.train.num_workers
        train_ds = source_ds if len(items) == len(source_ds) else source_ds.select(items)
        source = make_loader(train_ds, with_rows(CaptionCollator.from_model(model, train=True, augment=cfg.data.augment, seed=seed), sources),
                             bs, shuffle=True, seed=seed, num_workers=nw, drop_last=True)
        if has_target:
            target = make_loader(target_ds, WithoutLabels(ImageCollator(model.preprocessor.with_augment(cfg.data.augment))),
                                 bs, shuffle=True, seed=seed + 1, num_workers=nw, drop_last=True)
        eval_loaders = {k: make_loader(v, MappedLabels(ImageCollator(model.preprocessor), eval_labels[k]), ebs, num_workers=nw)
                        for k, v in evals.items()}
    check_loaders(bs, source=source, target=target)
    train_loader = PairedLoader(source, target, steps="max", seed=seed)

    evaluate = ZeroShotEvaluation(name_feats, candidate_names)

    info = {"zero_shot_classes": len(class_names), "feature_cache": bool(cache), "sources": sources.names}
    return Built(task, train_loader, eval_loaders, evaluate, lambda t, d: t.model.save_pretrained(d), info)


def _frozen_text(model: Any, captions: list[list[str]], candidate_names: list[str], keep_tokens: bool, feature_dir: Path | None,
                 progress: bool) -> tuple[Any, dict[str, int], Any]:
    """A frozen text tower's features of every distinct caption (and each caption's row), and of the class prompts."""
    from ..features import text_features

    unique = sorted({c for caps in captions for c in caps})
    rows = {c: i for i, c in enumerate(unique)}
    cache = text_features(model.text_encoder, unique, keep_tokens=keep_tokens, cache_dir=feature_dir, progress=progress)
    names = text_features(model.text_encoder, candidate_names, keep_tokens=False, cache_dir=feature_dir, progress=progress)
    return cache, rows, names


def feature_folder(cfg: AdaptConfig) -> Path | None:
    if not cfg.data.features.persist:
        return None
    from ..data.config import cache_root

    return Path(cfg.data.features.folder) if cfg.data.features.folder else cache_root(cfg.data.source) / "features"
