"""Domain adaptation objectives: a task loss on the labelled (or captioned) source plus a domain loss.

Every domain loss is built by :func:`build_domain_loss` and called the same way
(features in, :class:`~mmtransfer.losses.domain.DomainLossOutput` out); the
gradient-reversal strength is a pure function of the step (:func:`grl_lambda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DROPOUT, ConfigError, above, at_least, check_ranges
from ..losses.contrastive import ContrastiveLoss
from ..losses.domain import (
    ConditionalDomainAdversarialLoss,
    CORALLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    DomainLossOutput,
    MultiDomainAdversarialLoss,
    MultipleKernelMMD,
    PairwiseDomainLoss,
    minimum_class_confusion,
)
from ..models.classifier import BackboneClassifier, ClassifierOutput
from ..schedules import dann_lambda
from .base import StepInfo, TaskOutput

METHODS = ("none", "dann", "cdan", "cdan+e", "mmd", "coral")

ADVERSARIAL = ("dann", "cdan", "cdan+e")


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
    # Weight of Minimum Class Confusion on the target predictions (classify: the classes;
    # multimodal: the batch's source captions), added to the method's loss (0: off; works
    # with every method, "none" included).
    mcc_weight: float = 0.0

    def __post_init__(self) -> None:
        check_ranges(self, weight=at_least(0), gamma=at_least(0), lambda_max=at_least(0), randomized_dim=at_least(1),
                     mmd_bandwidths=above(0), mcc_weight=at_least(0))


@dataclass
class EmbeddingDomainLossConfig:
    """The domain loss of a multi-task run: on the shared image embedding, weighted by ``tasks.domain.weight``.

    The keys of :class:`MethodConfig` that apply there; CDAN needs one classifier's
    predictions, which a multi-task run does not have.
    """

    # "dann" (adversarial, with the discriminator below), "mmd" (multi-kernel MMD) or "coral".
    name: Literal["dann", "mmd", "coral"] = "dann"
    # Gradient-reversal strength as a function of progress p in [0, 1]: "dann" is
    # lambda_max * (2 / (1 + exp(-gamma p)) - 1); "constant" is lambda_max.
    schedule: Literal["dann", "constant"] = "dann"
    # Steepness gamma of the "dann" schedule.
    gamma: float = 10.0
    # Final (or constant) gradient-reversal strength.
    lambda_max: float = 1.0
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    # MMD: Gaussian bandwidths sigma^2 as multiples of the batch's mean squared distance.
    mmd_bandwidths: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0, 2.0])

    def __post_init__(self) -> None:
        check_ranges(self, gamma=at_least(0), lambda_max=at_least(0))

    def method(self) -> MethodConfig:
        """The same loss as a :class:`MethodConfig` (for :func:`build_domain_loss` and :func:`grl_lambda`)."""
        return MethodConfig(name=self.name, schedule=self.schedule, gamma=self.gamma, lambda_max=self.lambda_max,
                            discriminator=self.discriminator, mmd_bandwidths=list(self.mmd_bandwidths))


def grl_lambda(method: MethodConfig, progress: float) -> float:
    """The gradient-reversal strength at training progress ``progress`` in [0, 1] (a pure function).

    Example:
        >>> grl_lambda(MethodConfig(), 0.0), round(grl_lambda(MethodConfig(), 1.0), 4)
        (0.0, 0.9999)
    """
    if method.schedule == "constant":
        return float(method.lambda_max)
    return float(method.lambda_max) * dann_lambda(progress, method.gamma)


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
        L = sum_i w_i CE(h(f_i), y_i) / sum_i w_i + weight * L_domain(f; lambda(p)) + mcc_weight * MCC(h(f_t)),
        w = 1 without re-weighting, lambda(p) from :func:`grl_lambda`, MCC from
        :func:`mmtransfer.losses.domain.minimum_class_confusion` on the target logits.
    """

    def __init__(self, model: BackboneClassifier, method: MethodConfig, seed: int = 0, num_sources: int = 1, with_target: bool = True) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.num_sources = num_sources
        self.multi = num_sources > 1
        use_pooled = method.features == "pooled"
        dim = int(model.backbone.width) if use_pooled else model.features_dim
        domains = num_sources + int(with_target) if self.multi else None
        self.domain_loss = build_domain_loss(method, dim, model.num_classes, seed, num_domains=domains)
        self.uses_target = (self.domain_loss is not None or method.mcc_weight > 0) and with_target

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
        if self.uses_target and self.method.mcc_weight > 0:
            mcc = minimum_class_confusion(out.logits[B:])
            loss = loss + self.method.mcc_weight * mcc
            metrics["mcc_loss"] = mcc.detach()
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
        L = InfoNCE_w(z_img_s, z_txt_s) + weight * L_domain(phi_s, phi_t; lambda(p)) + mcc_weight * MCC(s z_img_t z_txt_s^T),
        MCC over the batch's source captions as classes; phi = the normalised image embedding (default), the tower's pooled features,
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
        self.uses_target = (self.domain_loss is not None or method.mcc_weight > 0) and with_target
        # Unused parameters must not require gradients under DDP: the fusion stack only
        # serves fused adaptation here, and its matching head never does.
        if model.fusion is not None:
            model.fusion.requires_grad_(where == "fused" and self.domain_loss is not None)
            model.fusion.itm_head.requires_grad_(False)

    def image_features(self, batch: dict[str, Any]) -> Any:
        from ..models.outputs import ImageEncoderOutput

        if "image_pooled" in batch:
            return ImageEncoderOutput(tokens=batch.get("image_tokens"), pooled=batch["image_pooled"])
        return self.model.image_encoder(batch["pixel_values"])

    def text_features(self, batch: dict[str, Any]) -> Any:
        from ..models.outputs import TextEncoderOutput

        if "text_pooled" in batch:
            return TextEncoderOutput(tokens=batch.get("text_tokens"), attention_mask=batch["attention_mask"], pooled=batch["text_pooled"])
        return self.model.text_encoder(batch["input_ids"], batch["attention_mask"])

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        from .captions import caption_groups

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
        if self.uses_target:
            img_t = self.image_features(batch["target"])
            zi_t = model.project_image(img_t.pooled)  # (B', E)
            if self.method.mcc_weight > 0:
                # The batch's source captions are the classes a target image is confidently one of.
                mcc = minimum_class_confusion(scale * zi_t @ zt_s.T)  # (B', E) @ (E, B) -> (B', B)
                loss = loss + self.method.mcc_weight * mcc
                metrics["mcc_loss"] = mcc.detach()
        if self.domain_loss is not None:
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
