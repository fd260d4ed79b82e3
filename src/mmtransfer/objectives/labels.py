"""Label objectives: cross-entropy of a classifier on labelled batches.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from .base import StepInfo, TaskOutput


class ClassificationTask(nn.Module):
    """Cross-entropy of an :class:`~mmtransfer.transfer.ImageClassifier` on labelled batches.

    Batches hold ``pixel_values`` (B, 3, S, S) or cached ``image_pooled`` (B, Di), and ``labels`` (B,).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        z = self.classifier.embed(batch.get("pixel_values"), batch.get("image_pooled"))  # (B, E)
        logits = self.classifier.head(z)  # (B, C)
        loss = F.cross_entropy(logits.float(), batch["labels"])
        acc = (logits.argmax(1) == batch["labels"]).float().mean()
        return TaskOutput(loss=loss, metrics={"acc": acc})
