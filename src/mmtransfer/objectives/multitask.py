"""Multi-task objectives: captions, labels and a domain loss on one mixed batch, weighted into one loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from .base import StepInfo, TaskOutput

TASKS = ("captions", "labels", "domain")


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
        from .captions import image_features

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
        from .captions import image_features

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
        from .captions import image_features

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
