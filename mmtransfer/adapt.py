"""Unsupervised domain adaptation: the recipe behind ``scripts/domain_adapt.py``.

A labelled (or captioned) *source* domain and an unlabelled *target* domain
train together, one batch of each per step. Two tasks:

- ``classify``: an image classifier (a LeNet-style CNN from scratch, or any
  timm / torchvision backbone) learns the source labels; a domain loss
  (DANN, CDAN, CDAN+E, MK-MMD or CORAL) acts on its features so that they stop
  telling the domains apart. Accuracy is measured on labelled target images.
- ``multimodal``: a :class:`~mmtransfer.MultimodalModel` learns from source
  captions with the contrastive loss; a domain loss acts on the shared image
  embedding (or the image tower's pooled features, or fused image-text
  features). Accuracy is zero-shot top-1: images against their class names.

Two extensions of the same recipe:

- **Importance re-weighting** (``reweight``): before training, the density
  ratio p_target(x) / p_source(x) is estimated on features (a logistic domain
  classifier or kernel mean matching, :mod:`mmtransfer.losses.reweight`); the
  clipped, normalised weights ride with the source rows and weight the source
  cross-entropy or the contrastive loss, alone or with a domain loss.
- **Several labelled sources** (``data.extra_sources``): domain generalisation.
  The sources are pooled (balanced by default); the domain loss becomes a
  K-way discriminator or CORAL/MMD between every pair of training domains, the
  target, if any, being one more domain; ``data.target_test`` is a domain never
  trained on. ``method.name: none`` is the pooled baseline.

Everything goes through the one training loop: one optimizer, one backward
per step, the gradient-reversal strength a pure function of the step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import DROPOUT, ConfigError, ImageEncoderConfig, ModelConfig, above, at_least, check_ranges, to_dict
from .data.config import DataConfig
from .finetune import FreezeConfig
from .losses.contrastive import ContrastiveLoss
from .losses.domain import (
    ConditionalDomainAdversarialLoss,
    CORALLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    DomainLossOutput,
    MultiDomainAdversarialLoss,
    MultipleKernelMMD,
    PairwiseDomainLoss,
)
from .losses.reweight import ImportanceWeights
from .models.lenet import LeNet, LeNetConfig
from .models.preprocess import AugmentConfig, ImagePreprocessor
from .schedules import dann_lambda
from .train import OptimConfig, StepInfo, TaskOutput, TrainConfig, fast_dev_slice

logger = logging.getLogger(__name__)

METHODS = ("none", "dann", "cdan", "cdan+e", "mmd", "coral")
ADVERSARIAL = ("dann", "cdan", "cdan+e")


# ----------------------------------------------------------------------------- configs


@dataclass
class ClassifierConfig:
    """An image classifier: backbone -> pooled features -> bottleneck -> linear head."""

    # "lenet" (a small CNN trained from scratch, for digits), or an image encoder: any
    # timm name, a packaged alias (efficientnet-lite0) or torchvision:resnet50.
    backbone: str = "lenet"
    # The LeNet's layers, colour handling and input preprocessing (backbone "lenet").
    lenet: LeNetConfig = field(default_factory=LeNetConfig)
    # Image encoders: load pretrained weights (trained at optim.tower_lr).
    pretrained: bool = True
    # Image encoders: input side in pixels (None: the weights' own).
    image_size: int | None = None
    # Image encoders: extra keyword arguments for timm.create_model.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Width of the bottleneck (Linear -> [BatchNorm] -> ReLU -> Dropout) between the
    # pooled features and the head; the domain losses act on its output. 0: no bottleneck.
    bottleneck_dim: int = 500
    # Batch norm in the bottleneck.
    bottleneck_batch_norm: bool = False
    # Dropout after the bottleneck.
    dropout: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(self, image_size=at_least(1), bottleneck_dim=at_least(0), dropout=DROPOUT)


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
    from .config import FusionConfig

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
    # Labelled target images for the target accuracy (None: none measured). For the
    # multimodal task a captioned folder without a label column works too: each image's
    # first caption is its class name.
    target_test: DataConfig | None = field(default_factory=lambda: DataConfig(name="usps", split="test"))
    # Labelled source images for the source accuracy (None: the source training images).
    source_test: DataConfig | None = None
    # Train-time augmentation of source and target images (classify task).
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Preprocess every image once and keep the tensors in memory (fast for small images
    # such as digits; turn off for large image folders). Needs augmentation off.
    in_memory: bool = True
    # Multimodal task: compute frozen, unaugmented towers once and train on their features.
    cache_features: bool = True
    # Also keep cached features on disk, keyed by weights and data.
    persist_features: bool = True
    # Folder of on-disk feature caches (None: "features" in the data cache folder).
    feature_cache_dir: str | None = None
    # Batch size of evaluation and feature caching.
    eval_batch_size: int = 256
    # Evaluate on at most this many images of each evaluation set (None: all).
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        check_ranges(self, eval_batch_size=at_least(1), max_eval_samples=at_least(1))


@dataclass
class DiscriminatorConfig:
    """The domain discriminator of the adversarial methods (an MLP returning logits)."""

    # Width of each hidden layer.
    hidden_dim: int = 1024
    # Hidden layers (0: a linear probe).
    num_layers: int = 2
    # Batch norm in the hidden layers (source and target are normalised together).
    batch_norm: bool = True
    # Dropout after each hidden layer.
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, hidden_dim=at_least(1), num_layers=at_least(0), dropout=DROPOUT)


@dataclass
class MethodConfig:
    """Which domain loss, where it acts, how strong."""

    # "none" (source only), "dann", "cdan", "cdan+e" (entropy-conditioned CDAN), "mmd"
    # (multi-kernel MMD) or "coral".
    name: Literal["none", "dann", "cdan", "cdan+e", "mmd", "coral"] = "dann"
    # Where it acts. "auto": the classifier's input features (the bottleneck output)
    # for classify, the shared image embedding for multimodal. "pooled": the image
    # backbone's pooled features. "embedding": the shared image-text space
    # (multimodal). "fused": fused image-text features (multimodal with fusion layers;
    # target images are paired with the source caption nearest to them in the batch).
    features: Literal["auto", "pooled", "embedding", "fused"] = "auto"
    # Weight of the domain loss added to the task loss.
    weight: float = 1.0
    # Gradient-reversal strength as a function of progress p in [0, 1]: "dann" is
    # lambda_max * (2 / (1 + exp(-gamma p)) - 1); "constant" is lambda_max.
    schedule: Literal["dann", "constant"] = "dann"
    # Steepness gamma of the "dann" schedule.
    gamma: float = 10.0
    # Final (or constant) gradient-reversal strength.
    lambda_max: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # CDAN: randomized multilinear map (None: when features x classes exceeds 4096).
    randomized: bool | None = None
    # CDAN: output width of the randomized map.
    randomized_dim: int = 1024
    # MMD: Gaussian bandwidths sigma^2 as multiples of the batch's mean squared distance.
    mmd_bandwidths: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0])

    def __post_init__(self) -> None:
        check_ranges(self, weight=at_least(0), gamma=at_least(0), lambda_max=at_least(0), randomized_dim=at_least(1),
                     mmd_bandwidths=above(0))


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
    # model's features, from model_dir: an ImageClassifier's bottleneck, or a
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
    plot: PlotConfig = field(default_factory=PlotConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/domain_adapt", trackers=[]))
    optim: OptimConfig = field(default_factory=OptimConfig)


def grl_lambda(method: MethodConfig, progress: float) -> float:
    """The gradient-reversal strength at training progress ``progress`` in [0, 1] (a pure function).

    Example:
        >>> grl_lambda(MethodConfig(), 0.0), round(grl_lambda(MethodConfig(), 1.0), 4)
        (0.0, 0.9999)
    """
    if method.schedule == "constant":
        return float(method.lambda_max)
    return float(method.lambda_max) * dann_lambda(progress, method.gamma)


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


# ----------------------------------------------------------------------------- classifier


@dataclass
class ClassifierOutput:
    """One pass of :class:`ImageClassifier`.

    Shapes:
        pooled: (B, D) backbone features; features: (B, F) the head's input
        (bottleneck output, or ``pooled`` without a bottleneck); logits: (B, C).
    """

    pooled: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


class _EncoderPooled(nn.Module):
    """An :class:`ImageEncoder` reduced to its pooled vector (B, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.width = encoder.width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).pooled  # (B, D)


class ImageClassifier(nn.Module):
    """Backbone -> pooled features -> bottleneck -> linear head.

    Args:
        config: backbone and head.
        num_classes: C.
        class_names: the names of the C classes (saved with the model).

    Shapes:
        (B, 3, S, S) -> :class:`ClassifierOutput` with logits (B, C).

    Example:
        >>> clf = ImageClassifier(ClassifierConfig(), num_classes=10)
        >>> clf(torch.zeros(2, 3, 32, 32)).logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ClassifierConfig, num_classes: int, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if config.backbone == "lenet":
            self.backbone: nn.Module = LeNet(config.lenet)
            self.preprocess = config.lenet.preprocess_config()
        else:
            from .models.image import ImageEncoder

            enc = ImageEncoder.from_config(ImageEncoderConfig(
                name=config.backbone, pretrained=config.pretrained, image_size=config.image_size, model_kwargs=dict(config.model_kwargs)))
            self.backbone = _EncoderPooled(enc)
            self.preprocess = enc.preprocessor.config
        width = int(self.backbone.width)
        if config.bottleneck_dim > 0:
            layers: list[nn.Module] = [nn.Linear(width, config.bottleneck_dim)]
            if config.bottleneck_batch_norm:
                layers.append(nn.BatchNorm1d(config.bottleneck_dim))
            layers.append(nn.ReLU(inplace=True))
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            self.bottleneck: nn.Module = nn.Sequential(*layers)
            width = config.bottleneck_dim
        else:
            self.bottleneck = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.features_dim = width
        self.head = nn.Linear(width, num_classes)
        self.num_classes = num_classes

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(self.preprocess)

    def forward(self, pixel_values: torch.Tensor) -> ClassifierOutput:
        pooled = self.backbone(pixel_values)  # (B, D)
        features = self.bottleneck(pooled)  # (B, F)
        return ClassifierOutput(pooled=pooled, features=features, logits=self.head(features))  # logits (B, C)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``classifier.json`` (config, class names) and ``model.safetensors``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model_type": "mmtransfer-image-classifier", "config": to_dict(self.config),
                "num_classes": self.num_classes, "class_names": self.class_names}
        (directory / "classifier.json").write_text(json.dumps(meta, indent=2))
        save_model(self, str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImageClassifier":
        """Load a classifier written by :meth:`save_pretrained` (image encoders are rebuilt without downloading)."""
        from .config import from_dict
        from .models.files import load_weights, read_json

        directory = Path(directory)
        path = directory / "classifier.json"
        if not path.is_file():
            raise FileNotFoundError(f"'{directory}' holds no saved image classifier (no classifier.json); train one with scripts/domain_adapt.py.")
        meta = read_json(path)
        config = from_dict(ClassifierConfig, {**meta["config"], "pretrained": False})
        model = cls(config, meta["num_classes"], meta["class_names"])
        load_weights(model, directory / "model.safetensors")
        return model.eval()


# ----------------------------------------------------------------------------- domain losses


def build_domain_loss(method: MethodConfig, features_dim: int, num_classes: int = 0, seed: int = 0,
                      num_domains: int | None = None) -> nn.Module | None:
    """The loss module of ``method.name`` for ``features_dim``-wide features (None for "none").

    ``num_domains`` (K, several sources): the multi-domain form, called as
    ``loss(features, domain_ids, lambda_)``: a K-way discriminator for "dann",
    CORAL or MMD averaged over every pair of domains for "coral" and "mmd".
    """
    d = method.discriminator
    name = method.name
    if name == "none":
        return None
    if num_domains is not None:
        if name == "dann":
            disc = DomainDiscriminator(features_dim, d.hidden_dim, d.num_layers, d.batch_norm, d.dropout, num_outputs=num_domains)
            return MultiDomainAdversarialLoss(disc, num_domains)
        if name in ("coral", "mmd"):
            pair = CORALLoss() if name == "coral" else MultipleKernelMMD(method.mmd_bandwidths)
            return PairwiseDomainLoss(pair, num_domains)
        raise ConfigError(f"method.name={name} has no multi-domain form; use dann, coral or mmd with several sources.")
    if name == "dann":
        return DomainAdversarialLoss(DomainDiscriminator(features_dim, d.hidden_dim, d.num_layers, d.batch_norm, d.dropout))
    if name in ("cdan", "cdan+e"):
        if num_classes < 2:
            raise ConfigError(f"method.name={name} needs class predictions from a classifier with at least 2 classes.")
        randomized = method.randomized if method.randomized is not None else features_dim * num_classes > 4096
        in_dim = ConditionalDomainAdversarialLoss.map_dim(features_dim, num_classes, randomized, method.randomized_dim)
        return ConditionalDomainAdversarialLoss(
            DomainDiscriminator(in_dim, d.hidden_dim, d.num_layers, d.batch_norm, d.dropout), features_dim, num_classes,
            entropy_conditioning=name == "cdan+e", randomized=randomized, randomized_dim=method.randomized_dim, seed=seed,
        )
    if name == "mmd":
        return MultipleKernelMMD(method.mmd_bandwidths)
    if name == "coral":
        return CORALLoss()
    raise ConfigError(f"Unknown method.name '{name}'; known: {', '.join(METHODS)}.")


def _apply_domain_loss(
    loss: nn.Module, name: str, f_s: torch.Tensor, f_t: torch.Tensor, lambda_: float,
    logits_s: torch.Tensor | None = None, logits_t: torch.Tensor | None = None,
) -> DomainLossOutput:
    if name in ("cdan", "cdan+e"):
        return loss(logits_s, f_s, logits_t, f_t, lambda_)
    return loss(f_s, f_t, lambda_)


def _log_metrics(transfer: DomainLossOutput | None, weighted: torch.Tensor | None = None,
                 total: torch.Tensor | None = None) -> dict[str, torch.Tensor | float]:
    """The domain loss's logged numbers; ``domain_share`` = |weight * L_domain| / |L| (how much of the loss it is)."""
    if transfer is None:
        return {}
    out = {"transfer_loss": transfer.loss.detach(), **transfer.metrics()}
    if weighted is not None and total is not None:
        out["domain_share"] = (weighted.detach().abs() / total.detach().abs().clamp_min(1e-12)).float()
    return out


# Below this mean share of the training loss, method.weight * L_domain barely moves the model
# (e.g. CORAL on L2-normalised 256-d embeddings is ~1e-7, so weight 1000 adds ~1e-4 to a loss near 1).
NEGLIGIBLE_DOMAIN_SHARE = 1e-3


def domain_share(run_dir: Path) -> float | None:
    """The mean ``train/domain_share`` over a run's metrics.jsonl (None when not logged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    values = []
    for line in path.read_text().splitlines():
        try:
            v = json.loads(line).get("train/domain_share")
        except json.JSONDecodeError:
            continue
        if v is not None:
            values.append(float(v))
    return sum(values) / len(values) if values else None


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """sum(w v) / sum(w) over the batch (the plain mean without weights): the importance-weighted risk.

    Shapes:
        values: (B,), weights: (B,) or None -> ().

    Example:
        >>> float(weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])))
        1.5
    """
    if weights is None:
        return values.mean()
    w = weights.detach().to(values.dtype)
    return (w * values).sum() / w.sum().clamp_min(1e-12)


def _domain_ids(source: dict[str, Any], n_target: int, target_id: int) -> torch.Tensor:
    """Domain ids of a [source; target] batch: the source rows' own, then ``target_id`` for the target rows."""
    ids = source.get("domain")
    if ids is None:
        raise ValueError("A multi-source batch must carry 'domain' ids for its source rows (the loader adds them).")
    if n_target == 0:
        return ids
    return torch.cat([ids, torch.full((n_target,), target_id, dtype=ids.dtype, device=ids.device)])  # (B + B',)


# ----------------------------------------------------------------------------- tasks


class ClassifyAdaptTask(nn.Module):
    """Source cross-entropy plus a domain loss on the classifier's features.

    Batches: ``{"source": {"pixel_values": (B, 3, S, S), "labels": (B,)}, "target": {"pixel_values": (B', 3, S, S)}}``;
    the source may carry ``weight`` (B,) importance weights and, with several
    sources, ``domain`` (B,) ids. Source and target go through the network as
    one concatenated batch (one forward, one backward; batch norm sees both
    domains). Source-only (``method.name="none"``) never touches the target batch.

    Args:
        model: the classifier.
        method: the domain loss.
        num_sources: labelled source domains (> 1: the multi-domain losses over
            sources 0..S-1 and, with ``with_target``, the target as domain S).
        with_target: whether batches have an unlabelled target part.

    Objective:
        L = sum_i w_i CE(h(f_i), y_i) / sum_i w_i + weight * L_domain(f; lambda(p)),
        w = 1 without re-weighting, lambda(p) from :func:`grl_lambda`.
    """

    def __init__(self, model: ImageClassifier, method: MethodConfig, seed: int = 0, num_sources: int = 1, with_target: bool = True) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_sources = num_sources
        self.multi = num_sources > 1
        use_pooled = method.features == "pooled"
        dim = int(model.backbone.width) if use_pooled else model.features_dim
        domains = num_sources + int(with_target) if self.multi else None
        self.domain_loss = build_domain_loss(method, dim, model.num_classes, seed, num_domains=domains)
        self.uses_target = self.domain_loss is not None and with_target

    @property
    def adapts(self) -> bool:
        return self.domain_loss is not None

    def adapted_features(self, out: ClassifierOutput) -> torch.Tensor:
        return out.pooled if self.method.features == "pooled" else out.features

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        src = batch["source"]
        xs, ys = src["pixel_values"], src["labels"]
        B = xs.shape[0]
        if self.uses_target:
            xt = batch["target"]["pixel_values"]
            out = self.model(torch.cat([xs, xt], dim=0))  # (B + B', ...) one pass over both domains
        else:
            out = self.model(xs)
        logits_s = out.logits[:B]  # (B, C)
        cls_loss = weighted_mean(F.cross_entropy(logits_s.float(), ys, reduction="none"), src.get("weight"))
        loss = cls_loss
        metrics: dict[str, torch.Tensor | float] = {"cls_loss": cls_loss.detach(),
                                                    "source_acc": (logits_s.argmax(1) == ys).float().mean().detach()}
        if self.adapts:
            f = self.adapted_features(out)
            lam = grl_lambda(self.method, info.progress)
            if self.multi:
                transfer = self.domain_loss(f, _domain_ids(src, f.shape[0] - B, self.num_sources), lam)
            else:
                transfer = _apply_domain_loss(self.domain_loss, self.method.name, f[:B], f[B:], lam, out.logits[:B], out.logits[B:])
            weighted = self.method.weight * transfer.loss
            loss = loss + weighted
            metrics.update(_log_metrics(transfer, weighted, loss))
        return TaskOutput(loss=loss, metrics=metrics)

    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Adapted features, logits and labels of an evaluation batch."""
        out = self.model(batch["pixel_values"])
        return {"features": self.adapted_features(out), "logits": out.logits, "labels": batch["labels"]}

    @torch.no_grad()
    def domain_accuracy(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float | None:
        """The discriminator's balanced accuracy on evaluation features (None when not adversarial or multi-domain)."""
        if self.method.name not in ADVERSARIAL or self.multi:
            return None
        source, target = _to_module(self.domain_loss, source), _to_module(self.domain_loss, target)
        out = _apply_domain_loss(self.domain_loss, self.method.name, source["features"], target["features"], 0.0,
                                 source["logits"].float(), target["logits"].float())
        return float(out.domain_accuracy)


class MultimodalAdaptTask(nn.Module):
    """Contrastive image-caption loss on the source plus a domain loss on image features.

    Batches: ``source`` with cached ``image_pooled`` (B, Di) or ``pixel_values``,
    and ``input_ids``/``attention_mask`` (B, T) (+ ``text_pooled`` when the text
    tower is cached); ``target`` with ``image_pooled`` (B', Di) or ``pixel_values``.

    The source may carry ``weight`` (B,) importance weights (a weighted InfoNCE)
    and, with several sources, ``domain`` (B,) ids; ``num_sources`` and
    ``with_target`` as in :class:`ClassifyAdaptTask`.

    Objective:
        L = InfoNCE_w(z_img_s, z_txt_s) + weight * L_domain(phi_s, phi_t; lambda(p)),
        phi = the normalised image embedding (default), the tower's pooled features,
        or fused features. For fused features a target image, having no caption, is
        fused with the source caption of the batch nearest to it in the shared space.
    """

    def __init__(self, model: Any, method: MethodConfig, seed: int = 0, num_sources: int = 1, with_target: bool = True) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_sources = num_sources
        self.multi = num_sources > 1
        self.contrastive = ContrastiveLoss()
        where = "embedding" if method.features == "auto" else method.features
        self.where = where
        if where == "fused" and model.fusion is None:
            raise ConfigError("method.features=fused needs fusion layers: set multimodal.model.fusion.num_layers >= 1.")
        if where == "pooled" and not any(p.requires_grad for p in model.image_encoder.parameters()):
            raise ConfigError(
                "method.features=pooled adapts the image tower's pooled features, but the image tower is frozen; "
                "unfreeze it (multimodal.freeze.image=false or image_keep_last) or adapt features=embedding."
            )
        dims = {"embedding": model.config.embed_dim, "pooled": model.image_encoder.width,
                "fused": model.fusion.norm.normalized_shape[0] if model.fusion is not None else 0}
        domains = num_sources + int(with_target) if self.multi else None
        self.domain_loss = build_domain_loss(method, dims[where], 0, seed, num_domains=domains)
        self.uses_target = self.domain_loss is not None and with_target
        # Unused parameters must not require gradients under DDP: the fusion stack only
        # serves fused adaptation here, and its matching head never does.
        if model.fusion is not None:
            model.fusion.requires_grad_(where == "fused" and self.domain_loss is not None)
            model.fusion.itm_head.requires_grad_(False)

    def image_features(self, batch: dict[str, Any]) -> Any:
        from .models.outputs import ImageEncoderOutput

        if "image_pooled" in batch:
            return ImageEncoderOutput(tokens=batch.get("image_tokens"), pooled=batch["image_pooled"])
        return self.model.image_encoder(batch["pixel_values"])

    def text_features(self, batch: dict[str, Any]) -> Any:
        from .models.outputs import TextEncoderOutput

        if "text_pooled" in batch:
            return TextEncoderOutput(tokens=batch.get("text_tokens"), attention_mask=batch["attention_mask"], pooled=batch["text_pooled"])
        return self.model.text_encoder(batch["input_ids"], batch["attention_mask"])

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        from .objectives import caption_groups

        model = self.model
        src = batch["source"]
        img_s = self.image_features(src)
        txt_s = self.text_features(src)
        zi_s = model.project_image(img_s.pooled)  # (B, E)
        zt_s = model.project_text(txt_s.pooled)  # (B, E)
        scale = model.get_logit_scale()
        con = self.contrastive(zi_s, zt_s, scale, caption_groups(src["input_ids"], src["attention_mask"]), weights=src.get("weight"))
        loss = con.loss
        metrics: dict[str, torch.Tensor | float] = {"contrastive": con.loss.detach(), "acc_i2t": con.accuracy_i2t,
                                                    "logit_scale": scale.detach()}
        if self.domain_loss is not None:
            if self.uses_target:
                img_t = self.image_features(batch["target"])
                zi_t = model.project_image(img_t.pooled)  # (B', E)
            if self.where == "embedding":
                f_s, f_t = zi_s, (zi_t if self.uses_target else None)
            elif self.where == "pooled":
                f_s, f_t = img_s.pooled, (img_t.pooled if self.uses_target else None)
            else:
                f_s, f_t = self._fused(img_s.tokens, img_t.tokens if self.uses_target else None, txt_s,
                                       zi_t if self.uses_target else None, zt_s)
            lam = grl_lambda(self.method, info.progress)
            if self.multi:
                f = f_s if f_t is None else torch.cat([f_s, f_t])  # (B + B', D)
                transfer = self.domain_loss(f, _domain_ids(src, f.shape[0] - f_s.shape[0], self.num_sources), lam)
            else:
                transfer = _apply_domain_loss(self.domain_loss, self.method.name, f_s, f_t, lam)
            weighted = self.method.weight * transfer.loss
            loss = loss + weighted
            metrics.update(_log_metrics(transfer, weighted, loss))
        return TaskOutput(loss=loss, metrics=metrics)

    def _fused(self, tokens_s: torch.Tensor, tokens_t: torch.Tensor | None, txt_s: Any, zi_t: torch.Tensor | None,
               zt_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tokens_s is None or (zi_t is not None and tokens_t is None) or txt_s.tokens is None:
            raise ConfigError("method.features=fused needs image and text tokens; the feature cache must keep them.")
        fused_s = self.model.fuse(tokens_s, txt_s.tokens, txt_s.attention_mask).pooled  # (B, W)
        if zi_t is None:
            return fused_s, None
        nearest = (zi_t @ zt_s.T).detach().argmax(dim=1)  # (B', E) @ (E, B) -> (B', B) -> (B',)
        fused_t = self.model.fuse(tokens_t, txt_s.tokens[nearest], txt_s.attention_mask[nearest]).pooled  # (B', W)
        return fused_s, fused_t

    @torch.no_grad()
    def embed(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Normalised image embeddings and labels of an evaluation batch."""
        z = self.model.project_image(self.image_features(batch).pooled)  # (B, E)
        return {"features": z, "labels": batch["labels"]}

    @torch.no_grad()
    def domain_accuracy(self, source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float | None:
        if self.method.name not in ADVERSARIAL or self.where != "embedding" or self.multi:
            return None
        source, target = _to_module(self.domain_loss, source), _to_module(self.domain_loss, target)
        return float(self.domain_loss(source["features"], target["features"], 0.0).domain_accuracy)


def _to_module(module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluation features (gathered on the CPU) moved to the device of ``module``'s weights."""
    device = next(module.parameters()).device
    return {k: v.to(device) for k, v in tensors.items()}


# ----------------------------------------------------------------------------- data


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

    from .data.collate import ImageCollator, make_loader

    loader = make_loader(dataset, ImageCollator(preprocessor), batch_size)
    parts = [b["pixel_values"] for b in tqdm(loader, desc="preprocessing images", disable=not progress, dynamic_ncols=True)]
    return torch.cat(parts)  # (N, 3, S, S)


def _labels(dataset: Any) -> torch.Tensor:
    if "label" not in dataset.column_names:
        raise ConfigError(f"This data set has no 'label' column ({', '.join(dataset.column_names)}); evaluation and source training need labels.")
    return torch.tensor(dataset.select_columns(["label"])["label"], dtype=torch.long)


def _class_names(dataset: Any, what: str) -> list[str]:
    feature = dataset.features.get("label")
    names = getattr(feature, "names", None)
    if not names:
        raise ConfigError(f"The {what} data has no class names (a ClassLabel 'label' column); domain adaptation needs labelled source data.")
    return list(names)


def _subset(dataset: Any, limit: int | None, seed: int) -> Any:
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def _loader(items: Any, collate: Any, batch_size: int, shuffle: bool, seed: int, drop_last: bool, num_workers: int = 0) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       collate_fn=collate, generator=generator, num_workers=num_workers)


# ----------------------------------------------------------------------------- evaluation


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


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


# ----------------------------------------------------------------------------- embedding plot


def plot_embeddings(panels: list[tuple[str, dict[str, Any]]], path: Path, method: str = "tsne", seed: int = 0) -> Path:
    """Draw source and target features in 2-D, one column per panel: coloured by domain (top) and by class (bottom).

    Args:
        panels: (title, {"source": (N, D), "target": (M, D), "source_labels": (N,), "target_labels": (M,)}).
        method: "tsne" or "pca" (scikit-learn).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError("The embedding plot needs scikit-learn (pip install scikit-learn), or set plot.enabled=false.") from None

    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8.6), squeeze=False)
    for col, (title, data) in enumerate(panels):
        xs, xt = np.asarray(data["source"], dtype=np.float32), np.asarray(data["target"], dtype=np.float32)
        x = np.concatenate([xs, xt])  # (N + M, D)
        if method == "pca" or x.shape[0] < 8:
            xy = PCA(n_components=2, random_state=seed).fit_transform(x)
        else:
            perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
            xy = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x)
        n = xs.shape[0]
        ax = axes[0, col]
        ax.scatter(xy[:n, 0], xy[:n, 1], s=5, alpha=0.6, label="source", c="tab:blue")
        ax.scatter(xy[n:, 0], xy[n:, 1], s=5, alpha=0.6, label="target", c="tab:red")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, markerscale=3)
        labels = np.concatenate([np.asarray(data["source_labels"]), np.asarray(data["target_labels"])])
        ax = axes[1, col]
        cmap = "tab10" if labels.max(initial=0) < 10 else "hsv"
        ax.scatter(xy[:n, 0], xy[:n, 1], s=6, c=labels[:n], cmap=cmap, marker="o", alpha=0.6)
        ax.scatter(xy[n:, 0], xy[n:, 1], s=8, c=labels[n:], cmap=cmap, marker="x", alpha=0.6)
        ax.set_title("by class (o source, x target)", fontsize=9)
        for a in axes[:, col]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"source vs target features ({method.upper()})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_points(feats: dict[str, dict[str, torch.Tensor]], max_points: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for role in ("source", "target"):
        f, y = feats[role]["features"], feats[role]["labels"]
        keep = torch.randperm(f.shape[0], generator=g)[:max_points]
        out[role], out[f"{role}_labels"] = f[keep].numpy(), y[keep].numpy()
    return out


def _save_points(points: dict[str, Any], path: Path) -> None:
    import numpy as np

    np.savez_compressed(path, **points)


def _load_points(path: str | Path) -> dict[str, Any]:
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plot.before: '{path}' does not exist; point it at another run's embeddings_final.npz.")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------- building


# Builds the task around a freshly built model: (model, accelerator) -> task.
TaskFactory = Callable[[nn.Module, Any], nn.Module]


@dataclass
class _Built:
    """What the two tasks hand to the trainer."""

    task: nn.Module
    train_loader: Any
    eval_loaders: dict[str, Any]
    evaluate: Callable[[nn.Module, Any, dict[str, Any]], dict[str, float]]
    export: Callable[[nn.Module, Path], None]
    info: dict[str, Any]


@dataclass
class _Sources:
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


def _with_rows(collate: Any, sources: _Sources) -> Any:
    values = sources.row_values()
    return RowValues(collate, values) if values else collate


def _fast_dev(cfg: AdaptConfig) -> None:
    # A balanced sample of 64 rows per section: the first 64 digits are all one class.
    fast_dev_slice(cfg.train, (cfg.data.source, *cfg.data.extra_sources, cfg.data.target, cfg.data.target_test,
                               cfg.data.source_test), 64)
    cfg.data.max_eval_samples = min(cfg.data.max_eval_samples or 64, 64)
    cfg.train.batch_size = min(cfg.train.batch_size, 16)
    cfg.plot.max_points = min(cfg.plot.max_points, 64)
    cfg.reweight.folds = min(cfg.reweight.folds, 3)


def _load_sets(cfg: AdaptConfig, accelerator: Any) -> tuple[dict[str, Any], dict[str, Any], _Sources]:
    from . import data as mmdata

    sets: dict[str, Any] = {}
    reports: dict[str, Any] = {}
    sources = [cfg.data.source, *cfg.data.extra_sources]
    sections = {("source" if i == 0 else f"source{i}"): s for i, s in enumerate(sources)}
    sections.update({"target": cfg.data.target, "target_test": cfg.data.target_test, "source_test": cfg.data.source_test})
    with accelerator.main_process_first():
        for name, section in sections.items():
            if section is None:
                continue
            loaded = mmdata.load_with_report(section)
            sets[name], reports[name] = loaded.dataset, loaded.report.to_dict()
            logger.info("%s: %d images (%s, split %s)", name, len(loaded.dataset), section.name, section.split)
    parts = [sets.pop(name) for name in list(sections)[: len(sources)]]
    names = [f"{s.name}:{s.split}" if s.split else s.name for s in sources]
    pooled, domain = pool_sources(parts, names, need_labels=cfg.task == "classify")
    sets["source"] = pooled
    return sets, reports, _Sources(parts, names, pooled, domain)


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


def _eval_sets(cfg: AdaptConfig, sets: dict[str, Any]) -> dict[str, Any]:
    """Evaluation sets named by domain: 'source' (source_test or the source images) and 'target' (target_test)."""
    out = {"source": _subset(sets.get("source_test", sets["source"]), cfg.data.max_eval_samples, cfg.train.seed)}
    if "target_test" in sets:
        out["target"] = _subset(sets["target_test"], cfg.data.max_eval_samples, cfg.train.seed)
    return out


def _check_loaders(bs: int, **loaders: Any) -> None:
    for role, loader in loaders.items():
        if loader is not None and len(loader) == 0:
            raise ConfigError(f"The {role} data has fewer images than one batch of {bs}: lower train.batch_size.")


def _build_classify(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: _Sources,
                    make_task: TaskFactory | None = None) -> _Built:
    from .data.collate import LabelCollator, PairedLoader, make_loader
    from .features import with_row_ids

    names = _class_names(sets["source"], "source")
    for key in ("target_test", "source_test"):
        if key in sets:
            other = _class_names(sets[key], key)
            if other != names:
                raise ConfigError(
                    f"data.{key} has classes {other[:5]}... but the source has {names[:5]}...: both must list the same "
                    "classes in the same order (set class_names on the data sections)."
                )
    model = ImageClassifier(cfg.classifier, len(names), names)
    task = (make_task(model, accelerator) if make_task else
            ClassifyAdaptTask(model, cfg.method, seed=cfg.train.seed, num_sources=sources.count, with_target="target" in sets))
    pre = model.preprocessor
    bs, ebs, seed = cfg.train.batch_size, cfg.data.eval_batch_size, cfg.train.seed
    evals = _eval_sets(cfg, sets)
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
        source = _loader(items, _with_rows(TensorBatches(pixels["source"], _labels(sets["source"])), sources), bs, True, seed, True)
        if "target" in sets:
            target = _loader(list(range(len(sets["target"]))), TensorBatches(pixels["target"], None), bs, True, seed + 1, True)
        eval_loaders = {k: _loader(list(range(len(v))), TensorBatches(pixels[f"eval/{k}"], _labels(v)), ebs, False, seed, False)
                        for k, v in evals.items()}
    else:
        aug = cfg.data.augment
        nw = cfg.train.num_workers
        source_ds = sets["source"]
        if sources.row_values() or len(items) != len(source_ds):
            source_ds = with_row_ids(source_ds)
            source_ds = source_ds if len(items) == len(source_ds) else source_ds.select(items)
        source = make_loader(source_ds, _with_rows(LabelCollator(pre, train=True, augment=aug), sources), bs, shuffle=True, seed=seed,
                             num_workers=nw, drop_last=True)
        if "target" in sets:
            target = make_loader(sets["target"], WithoutLabels(LabelCollator(pre, train=True, augment=aug, require_labels=False)),
                                 bs, shuffle=True, seed=seed + 1, num_workers=nw, drop_last=True)
        eval_loaders = {k: make_loader(v, LabelCollator(pre), ebs, num_workers=nw) for k, v in evals.items()}
    _check_loaders(bs, source=source, target=target)
    train_loader = PairedLoader(source, target, steps="max", seed=seed)

    def evaluate(task: ClassifyAdaptTask, acc: Any, loaders: dict[str, Any]) -> dict[str, float]:
        feats = {name: collect(loader, task.embed, acc) for name, loader in loaders.items()}
        out = {f"{name}_acc": _accuracy(f["logits"], f["labels"]) for name, f in feats.items()}
        if "source" in feats and "target" in feats:
            dacc = task.domain_accuracy(feats["source"], feats["target"])
            if dacc is not None:
                out["domain_acc"] = 100.0 * dacc
        return out

    info = {"num_classes": len(names), "class_names": names, "parameters": sum(p.numel() for p in model.parameters()),
            "preprocess": to_dict(model.preprocess), "in_memory": in_memory, "sources": sources.names}
    return _Built(task, train_loader, eval_loaders, evaluate, lambda t, d: t.model.save_pretrained(d), info)


def labels_and_names(dataset: Any) -> tuple[torch.Tensor, list[str]]:
    """Class ids (N,) and class names of a labelled set, or, without a label column, of its first captions.

    A captioned image folder with no label column is labelled by caption: each
    distinct first caption is a class (names sorted).

    Example:
        >>> labels_and_names(folder_with_captions_only)            # doctest: +SKIP
        (tensor([1, 0, 1]), ['cat face', 'grinning face'])
    """
    if "label" in dataset.column_names:
        return _labels(dataset), _class_names(dataset, "evaluation")
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


def _build_multimodal(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: _Sources,
                      make_task: TaskFactory | None = None) -> _Built:
    import mmtransfer

    from .data.collate import CaptionCollator, ImageCollator, PairedLoader, make_loader
    from .features import CachedCaptionCollator, CachedFeatures, image_features, text_features, with_row_ids
    from .finetune import _captions

    mm = cfg.multimodal
    model = mmtransfer.load(mm.init_from) if mm.init_from else mmtransfer.create_model(mm.model)
    if mm.init_from:
        mm.model = model.config
    if mm.freeze.text:
        model.freeze("text", mm.freeze.text_keep_last)
    if mm.freeze.image:
        model.freeze("image", mm.freeze.image_keep_last)
    has_target = "target" in sets
    task = (make_task(model, accelerator) if make_task else
            MultimodalAdaptTask(model, cfg.method, seed=cfg.train.seed, num_sources=sources.count, with_target=has_target))
    if "captions" not in sets["source"].column_names:
        raise ConfigError("task=multimodal trains on source captions, but data.source has no 'captions' column.")
    source_ds = with_row_ids(sets["source"])
    target_ds = with_row_ids(sets["target"]) if has_target else None
    evals = {k: with_row_ids(v) for k, v in _eval_sets(cfg, sets).items()}
    captions = _captions(source_ds)
    items = sources.items(cfg.data.balance_sources, cfg.train.seed)
    image_frozen = not any(p.requires_grad for p in model.image_encoder.parameters())
    text_frozen = not any(p.requires_grad for p in model.text_encoder.parameters())
    cache = cfg.data.cache_features and image_frozen and not cfg.data.augment.enabled
    keep_tokens = task.where == "fused"
    bs, ebs, seed = cfg.train.batch_size, cfg.data.eval_batch_size, cfg.train.seed
    feature_dir = _feature_dir(cfg)
    progress = accelerator.is_local_main_process and cfg.train.progress_bar

    # Zero-shot candidates: every class that occurs in an evaluation set (e.g. the unseen emoji).
    class_names, eval_labels = zero_shot_candidates(evals)
    candidate_names = [mm.prompt.format(n) for n in class_names]

    model.to(accelerator.device)
    text_cache, text_rows = None, {}
    name_feats = None
    with accelerator.main_process_first():
        if text_frozen:
            unique = sorted({c for caps in captions for c in caps})
            text_rows = {c: i for i, c in enumerate(unique)}
            text_cache = text_features(model.text_encoder, unique, keep_tokens=keep_tokens, cache_dir=feature_dir, progress=progress)
            name_feats = text_features(model.text_encoder, candidate_names, keep_tokens=False, cache_dir=feature_dir, progress=progress)
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
        source = _loader(items, _with_rows(src_collate, sources), bs, True, seed, True)
        if has_target:
            target = _loader(list(range(len(target_ds))), CachedImages(feats["target"]), bs, True, seed + 1, True)
        eval_loaders = {k: _loader(list(range(len(v))), CachedImages(feats[f"eval/{k}"], eval_labels[k]), ebs, False, seed, False)
                        for k, v in evals.items()}
        logger.info("Frozen image tower: training on cached image features.")
    else:
        nw = cfg.train.num_workers
        train_ds = source_ds if len(items) == len(source_ds) else source_ds.select(items)
        source = make_loader(train_ds, _with_rows(CaptionCollator.from_model(model, train=True, augment=cfg.data.augment, seed=seed), sources),
                             bs, shuffle=True, seed=seed, num_workers=nw, drop_last=True)
        if has_target:
            target = make_loader(target_ds, WithoutLabels(ImageCollator(model.preprocessor.with_augment(cfg.data.augment))),
                                 bs, shuffle=True, seed=seed + 1, num_workers=nw, drop_last=True)
        eval_loaders = {k: make_loader(v, _MappedLabels(ImageCollator(model.preprocessor), eval_labels[k]), ebs, num_workers=nw)
                        for k, v in evals.items()}
    _check_loaders(bs, source=source, target=target)
    train_loader = PairedLoader(source, target, steps="max", seed=seed)

    def class_embeddings(task: MultimodalAdaptTask) -> torch.Tensor:
        m = task.model
        if name_feats is not None:
            return m.project_text(name_feats.pooled.to(m.device))  # (K, E)
        return torch.cat([m.encode_text(candidate_names[i:i + 256]) for i in range(0, len(candidate_names), 256)])

    def evaluate(task: MultimodalAdaptTask, acc: Any, loaders: dict[str, Any]) -> dict[str, float]:
        zc = class_embeddings(task).float().cpu()  # (K, E)
        feats_ = {name: collect(loader, task.embed, acc) for name, loader in loaders.items()}
        out = {f"{name}_acc": _accuracy(f["features"] @ zc.T, f["labels"]) for name, f in feats_.items()}  # (N, E) @ (E, K)
        if "source" in feats_ and "target" in feats_:
            dacc = task.domain_accuracy(feats_["source"], feats_["target"])
            if dacc is not None:
                out["domain_acc"] = 100.0 * dacc
        return out

    info = {"zero_shot_classes": len(class_names), "feature_cache": bool(cache), "sources": sources.names}
    return _Built(task, train_loader, eval_loaders, evaluate, lambda t, d: t.model.save_pretrained(d), info)


def _feature_dir(cfg: AdaptConfig) -> Path | None:
    if not cfg.data.persist_features:
        return None
    from .data.config import cache_root

    return Path(cfg.data.feature_cache_dir) if cfg.data.feature_cache_dir else cache_root(cfg.data.source) / "features"


class _MappedLabels:
    """Adds ``labels`` (positions among the zero-shot candidates, by row) to an image collator's batches."""

    def __init__(self, collate: Any, labels: torch.Tensor) -> None:
        self.collate, self.labels = collate, labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate(rows)
        batch["labels"] = self.labels[batch["image_index"]]
        return batch


# ----------------------------------------------------------------------------- importance weights


WEIGHTS_FILE = "source_weights.safetensors"


@torch.no_grad()
def ratio_features(cfg: AdaptConfig, dataset: Any, progress: bool = False) -> torch.Tensor:
    """The features ``reweight.features`` names, for every row of ``dataset``: (N, D) float32 on the CPU."""
    from .data.collate import ImageCollator, make_loader
    from .features import with_row_ids
    from .models.preprocess import PreprocessConfig

    r = cfg.reweight
    if r.features == "pixels":
        pre = ImagePreprocessor(PreprocessConfig(image_size=r.pixel_size, crop_pct=1.0, interpolation="bilinear",
                                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
        return preprocess_all(dataset, pre, progress=progress).flatten(1)  # (N, 3 * s * s)
    ds = with_row_ids(dataset)
    if r.features == "encoder":
        from .features import image_features
        from .models.image import ImageEncoder

        encoder = ImageEncoder.from_config(ImageEncoderConfig(name=r.encoder, pretrained=True))
        loader = make_loader(ds, ImageCollator(encoder.preprocessor), cfg.data.eval_batch_size)
        return image_features(encoder, loader, len(ds), keep_tokens=False, cache_dir=_feature_dir(cfg),
                              data_key=f"{ds._fingerprint}", progress=progress, desc="features for the density ratio").pooled
    folder = Path(str(r.model_dir))
    if (folder / "classifier.json").is_file():
        clf = ImageClassifier.from_pretrained(folder)
        loader = make_loader(ds, ImageCollator(clf.preprocessor), cfg.data.eval_batch_size)
        return collect(loader, lambda b: {"f": clf(b["pixel_values"]).features})["f"]  # (N, F) the bottleneck
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"reweight.model_dir '{folder}' holds neither a saved classifier (classifier.json) nor a "
                                "multimodal model (config.json); point it at a run's model/ folder.")
    import mmtransfer

    mm = mmtransfer.load(folder).eval()
    loader = make_loader(ds, ImageCollator(mm.preprocessor), cfg.data.eval_batch_size)
    return collect(loader, lambda b: {"f": mm.project_image(mm.image_encoder(b["pixel_values"]).pooled)})["f"]  # (N, E)


def importance_weights(cfg: AdaptConfig, source: Any, target: Any, progress: bool = False) -> ImportanceWeights:
    """Estimate the source rows' importance weights p_target/p_source as ``cfg.reweight`` says (no caching)."""
    from .losses.reweight import estimate_importance_weights

    r = cfg.reweight
    started = time.perf_counter()
    f_s = ratio_features(cfg, source, progress)
    target = _subset(target, r.max_target, cfg.train.seed)
    f_t = ratio_features(cfg, target, progress)
    if r.method == "classifier":
        options: dict[str, Any] = {"l2_grid": list(r.l2_grid), "folds": r.folds, "calibrate": r.calibrate, "pca_dim": r.pca_dim}
    else:
        options = {"bandwidth_scale": r.kmm_bandwidth_scale, "bound": r.kmm_bound, "iterations": r.kmm_iterations, "pca_dim": r.pca_dim}
    iw = estimate_importance_weights(f_s, f_t, r.method, r.clip_max, r.power, seed=cfg.train.seed, **options)
    iw.info.update({"features": r.features, "source_rows": int(f_s.shape[0]), "target_rows": int(f_t.shape[0]),
                    "seconds": round(time.perf_counter() - started, 1)})
    return iw


def _source_weights(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: _Sources) -> dict[str, Any] | None:
    """Compute (or, on resume, restore) the source weights, put them on ``sources`` and return their summary.

    The weights are estimated once, on the main process, and written to the run
    folder with a histogram; a resumed run (``train.resume``) reads them back
    from there instead of estimating them again, so they cannot change.
    """
    from safetensors.torch import load_file, save_file

    from .losses.reweight import plot_weights

    r = cfg.reweight
    if r.method == "none":
        return None
    run_dir = Path(cfg.train.output_dir)
    path = run_dir / WEIGHTS_FILE
    n = len(sources.pooled)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (cfg.train.resume and path.is_file()):
            iw = importance_weights(cfg, sources.pooled, sets["target"], accelerator.is_local_main_process and cfg.train.progress_bar)
            stats = iw.stats(r.clip_max)
            labels = _labels(sources.pooled) if "label" in sources.pooled.column_names else None
            if labels is not None and labels.numel() and int(labels.max()) < 30:
                counts = torch.bincount(labels).double().clamp_min(1)
                stats["mean_weight_by_class"] = (torch.zeros(len(counts), dtype=torch.float64).index_add_(0, labels, iw.weights.double())
                                                 / counts).round(decimals=3).tolist()
            if sources.count > 1:
                stats["mean_weight_by_source"] = {name: float(iw.weights[sources.domain == i].mean()) for i, name in enumerate(sources.names)}
            run_dir.mkdir(parents=True, exist_ok=True)
            meta = {"method": iw.method, "stats": json.dumps(stats), "info": json.dumps(iw.info)}
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"weights": iw.weights.contiguous(), "ratio": iw.ratio.contiguous()}, str(tmp), metadata=meta)
            tmp.rename(path)
            names = _class_names(sources.pooled, "source") if labels is not None else None
            plot_weights(iw, run_dir / "source_weights.png", labels, names, r.clip_max)
            logger.info("Importance weights (%s on %s features, %.0f s): min %.3f, max %.2f, ESS %.0f of %d (%.0f%%).",
                        iw.method, r.features, iw.info["seconds"], stats["min"], stats["max"], stats["ess"], n, 100 * stats["ess_fraction"])
        elif accelerator.is_main_process:
            logger.info("Resuming: importance weights restored from %s (not estimated again).", path)
    if not path.is_file():
        raise FileNotFoundError(f"The importance weights {path} were not written; is train.output_dir shared by every process?")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    weights = load_file(str(path))["weights"]
    if weights.shape != (n,):
        raise ConfigError(f"The importance weights in {path} cover {weights.shape[0]} source rows, but the source now has {n}: "
                          "the data changed since the run started. Start a new run (another train.output_dir).")
    sources.weight = weights
    return {"method": meta.get("method"), "file": str(path), **json.loads(meta.get("stats", "{}")),
            "estimator": json.loads(meta.get("info", "{}"))}


# ----------------------------------------------------------------------------- the recipe


def run(cfg: AdaptConfig, fast_dev_run: bool = False, make_task: TaskFactory | None = None) -> dict[str, Any]:
    """Train and evaluate per ``cfg``; returns the summary (also in the run folder's summary.json).

    ``make_task(model, accelerator)`` replaces the adaptation task built around the new
    model (distillation passes its own, see :mod:`mmtransfer.distill`).
    """
    from .train import Trainer, make_accelerator

    if fast_dev_run:
        _fast_dev(cfg)
    check_config(cfg)
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.train)
    sets, reports, sources = _load_sets(cfg, accelerator)
    reweight = _source_weights(cfg, accelerator, sets, sources)
    built = (_build_classify if cfg.task == "classify" else _build_multimodal)(cfg, accelerator, sets, sources, make_task)
    if accelerator.is_main_process:
        n_train = sum(p.numel() for p in built.task.parameters() if p.requires_grad)
        logger.info("Task %s, method %s: %s trainable parameters.", cfg.task, cfg.method.name, f"{n_train:,}")
    summary_extra = {"data": reports, "task_info": built.info}
    if reweight is not None:
        summary_extra["reweight"] = reweight
    trainer = Trainer(built.task, built.train_loader, cfg.train, cfg.optim, evaluate=built.evaluate,
                      eval_loaders=built.eval_loaders, run_config=cfg, export=built.export,
                      summary_extra=summary_extra, accelerator=accelerator)
    if sources.weight is not None and "tensorboard" in cfg.train.trackers and not cfg.train.fast_dev_run and accelerator.is_main_process:
        accelerator.get_tracker("tensorboard", unwrap=True).add_histogram("reweight/source_weights", sources.weight, 0)
    plot_needed = cfg.plot.enabled and "target" in trainer.eval_loaders

    def points() -> dict[str, Any] | None:
        if not plot_needed:
            return None
        task = accelerator.unwrap_model(trainer.task)
        was_training = task.training
        task.eval()
        with torch.no_grad(), accelerator.autocast():
            feats = {role: collect(trainer.eval_loaders[role], task.embed, accelerator) for role in ("source", "target")}
        task.train(was_training)
        return _sample_points(feats, cfg.plot.max_points, cfg.train.seed)

    before = points() if cfg.plot.before is None else None
    result = trainer.fit()
    after = points()
    summary: dict[str, Any] = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
                               "steps": result.step, "method": cfg.method.name, "task": cfg.task, "sources": sources.names,
                               "metrics": {k.split("/", 1)[-1]: v for k, v in result.metrics.items()}}
    if reweight is not None:
        summary["reweight"] = reweight
    if accelerator.is_main_process:
        run_dir = result.run_dir
        share = domain_share(run_dir) if cfg.method.name != "none" else None
        if share is not None:
            summary["domain_share"] = share
            if share < NEGLIGIBLE_DOMAIN_SHARE:
                logger.warning(
                    "method.weight * the %s loss was on average %.2g of the training loss: it barely changed the model "
                    "(a run without it ends the same). Raise method.weight (the loss's scale depends on the features: "
                    "log train/transfer_loss) or drop the method.", cfg.method.name, share)
        if after is not None:
            _save_points(after, run_dir / "embeddings_final.npz")
            if before is not None:
                _save_points(before, run_dir / "embeddings_step0.npz")
                panels = [("step 0", before), (f"after {result.step} steps ({cfg.method.name})", after)]
            else:
                where = "/".join(Path(cfg.plot.before).parent.parts[-2:])
                panels = [(f"before adaptation ({where})", _load_points(cfg.plot.before)),
                          (f"after adaptation ({cfg.method.name})", after)]
            summary["embedding_plot"] = str(plot_embeddings(panels, run_dir / "embeddings.png", cfg.plot.method, cfg.train.seed))
        summary["minutes"] = round((time.perf_counter() - started) / 60, 2)
        path = run_dir / "summary.json"
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.update({"metrics": summary["metrics"], "minutes_total": summary["minutes"],
                     "embedding_plot": summary.get("embedding_plot")})
        if "domain_share" in summary:
            data["domain_share"] = summary["domain_share"]
        path.write_text(json.dumps(data, indent=2))
    return summary
