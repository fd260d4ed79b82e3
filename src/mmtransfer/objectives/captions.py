"""Tasks: a model plus its loss modules, mapping a batch to a loss.

A task is what the trainer wraps (one DDP module, one backward per step). It
reads tower features from the batch when they were cached, or computes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import at_least, check_ranges
from ..evaluate import embed_all, recall_at_k, rerank_recall_at_k
from ..losses import ContrastiveLoss, MatchingLoss
from ..models.multimodal import MultimodalModel
from ..models.outputs import ImageEncoderOutput, TextEncoderOutput
from .base import StepInfo, TaskOutput

_HASH_MOD = (1 << 61) - 1


def caption_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """An id per distinct token sequence, equal across processes (a polynomial hash).

    Rows with the same caption get the same id, so the losses treat them as
    positives of each other rather than as negatives.

    Shapes:
        (B, T), (B, T) -> (B,) int64
    """
    weights = _hash_weights(input_ids.shape[1], input_ids.device)  # (T,)
    return ((input_ids.long() + 1) * attention_mask.long() * weights).sum(1)  # (B,); wraps deterministically


@functools.lru_cache(maxsize=16)
def _hash_weights(length: int, device: torch.device) -> torch.Tensor:
    """The hash's position weights, copied to the device once: a copy every step would wait for the GPU."""
    return torch.tensor([pow(1_000_003, t, _HASH_MOD) for t in range(length)], dtype=torch.long, device=device)


@dataclass
class CaptionObjectiveConfig:
    """Weights of the caption fine-tuning losses."""

    # Symmetric InfoNCE between image and text embeddings.
    contrastive_weight: float = 1.0
    # Image-text matching through the fusion layer with hard negatives (0 disables fusion training).
    itm_weight: float = 1.0
    # Which pairs of a batch count as positives of each other besides each image and its own
    # caption: "caption" = pairs with the same caption text (before data.caption_templates
    # put it in a template's words); "label" = pairs whose images have
    # the same class label (for sets that caption a class several ways, e.g. glyphs: "seven",
    # "the digit 7"; needs a label column in the training data).
    positives: Literal["caption", "label"] = "caption"

    def __post_init__(self) -> None:
        check_ranges(self, contrastive_weight=at_least(0), itm_weight=at_least(0))


def image_features(model: MultimodalModel, batch: dict[str, Any]) -> ImageEncoderOutput:
    """The image tower's output for a batch: read from cached ``image_pooled``/``image_tokens``, or computed from ``pixel_values``."""
    if "image_pooled" in batch:
        return ImageEncoderOutput(tokens=batch.get("image_tokens"), pooled=batch["image_pooled"])
    return model.image_encoder(batch["pixel_values"])


def text_features(model: MultimodalModel, batch: dict[str, Any]) -> TextEncoderOutput:
    """The text tower's output for a batch: read from cached ``text_pooled``/``text_tokens``, or computed from token ids."""
    if "text_pooled" in batch:
        return TextEncoderOutput(tokens=batch.get("text_tokens"), attention_mask=batch["attention_mask"], pooled=batch["text_pooled"])
    return model.text_encoder(batch["input_ids"], batch["attention_mask"])


class CaptionObjective(nn.Module):
    """Contrastive alignment plus ALBEF-style image-text matching, over a model passed in.

    Holds only its loss modules (no model), so several objectives can share one
    model inside one task (see :class:`~mmtransfer.recipes.multitask.MultiTask`).

    Batches hold either pixels and token ids, or cached tower features:
    ``pixel_values`` (B, 3, S, S) or ``image_tokens`` (B, P, Di) + ``image_pooled`` (B, Di);
    ``input_ids``/``attention_mask`` (B, T), plus ``text_tokens`` (B, T, Dt) and
    ``text_pooled`` (B, Dt) when the text tower is cached.

    Objective:
        L = contrastive_weight * InfoNCE(z_img, z_txt) + itm_weight * ITM(fused pairs, hard negatives).

    Example:
        >>> objective = CaptionObjective(CaptionObjectiveConfig(itm_weight=0), use_itm=False)
        >>> out = objective(model, batch, StepInfo(0, 100))   # TaskOutput(loss, metrics)
    """

    def __init__(self, config: CaptionObjectiveConfig, use_itm: bool) -> None:
        super().__init__()
        self.config = config
        self.use_itm = use_itm
        self.contrastive = ContrastiveLoss()
        self.matching = MatchingLoss()

    @staticmethod
    def uses_itm(model: MultimodalModel, config: CaptionObjectiveConfig) -> bool:
        """Whether image-text matching trains: a positive weight and a fusion stack to train it on."""
        return config.itm_weight > 0 and model.fusion is not None

    def positive_groups(self, batch: dict[str, Any]) -> torch.Tensor:
        """An id per row; rows with the same id are positives of each other. Shapes: -> (B,)"""
        if self.config.positives == "label":
            if "labels" not in batch:
                raise ValueError("objective.positives=label needs class labels in the training batches: "
                                 "the training data has no integer 'label' column.")
            return batch["labels"]
        if "caption_group" in batch:  # templated captions: grouped by the caption before templating
            return batch["caption_group"]
        return caption_groups(batch["input_ids"], batch["attention_mask"])

    def forward(self, model: MultimodalModel, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        img = image_features(model, batch)
        txt = text_features(model, batch)
        zt = model.project_text(txt.pooled)  # (B, E)
        scale = model.get_logit_scale()
        groups = self.positive_groups(batch)  # (B,)
        zi = model.project_image(img.pooled)  # (B, E)
        con = self.contrastive(zi, zt, scale, groups)
        con_loss = con.loss
        loss = self.config.contrastive_weight * con_loss
        metrics: dict[str, torch.Tensor | float] = {
            "contrastive": con_loss.detach(),
            "acc_i2t": con.accuracy_i2t,
            "acc_t2i": con.accuracy_t2i,
            "logit_scale": scale.detach(),
        }
        if self.use_itm:
            sim = (zi @ zt.T).detach() * scale.detach()  # (B, B) local pairs, for mining hard negatives
            fusion = model.fusion
            # Project tokens to the fusion width once; the matching loss indexes them three ways.
            text_w = fusion.text_in(txt.tokens)  # (B, T, W)
            image_w = fusion.image_in(img.tokens)  # (B, P, W)
            itm = self.matching(fusion.fuse_projected, image_w, text_w, txt.attention_mask, sim, groups)
            loss = loss + self.config.itm_weight * itm.loss
            metrics.update(itm=itm.loss.detach(), itm_acc=itm.accuracy)
        return TaskOutput(loss=loss, metrics=metrics)


class CaptionTask(nn.Module):
    """Contrastive alignment plus ALBEF-style image-text matching on captioned images.

    The model and a :class:`CaptionObjective`: what the trainer wraps for a
    caption-only run. Batches are those of :class:`CaptionObjective`.
    """

    def __init__(self, model: MultimodalModel, config: CaptionObjectiveConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.use_itm = CaptionObjective.uses_itm(model, config)
        self.objective = CaptionObjective(config, self.use_itm)
        if model.fusion is not None and not self.use_itm:
            # Unused parameters must not require gradients under DDP.
            model.fusion.requires_grad_(False)

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        return self.objective(self.model, batch, info)

    def evaluate_retrieval(self, accelerator: Any, images: Any, captions: Any, rerank_k: int = 0) -> dict[str, float]:
        """Recall@1/5/10 both ways (see :func:`evaluate_retrieval`)."""
        return evaluate_retrieval(self.model, accelerator, images, captions, rerank_k)


@torch.no_grad()
def evaluate_retrieval(model: MultimodalModel, accelerator: Any, images: Any, captions: Any, rerank_k: int = 0) -> dict[str, float]:
    """Recall@1/5/10 both ways over an image loader and a caption loader (several captions per image).

    With ``rerank_k > 0`` and a fusion layer, also report recall after re-ranking
    each query's top ``rerank_k`` candidates by the image-text matching score
    (keys prefixed ``itm_``), as ALBEF retrieves.
    """
    rerank = rerank_k > 0 and model.fusion is not None
    T = model.text_encoder.config.max_length
    img_tok: list[torch.Tensor] = []
    txt_tok: list[torch.Tensor] = []
    txt_mask: list[torch.Tensor] = []

    def embed_images(b: dict[str, Any]) -> torch.Tensor:
        f = image_features(model, b)
        if rerank:
            img_tok.append(_gather(accelerator, f.tokens.float()))
        return model.project_image(f.pooled)

    def embed_texts(b: dict[str, Any]) -> torch.Tensor:
        f = text_features(model, b)
        if rerank:  # pad to a fixed length so batches (and processes) concatenate
            pad = T - f.tokens.shape[1]
            txt_tok.append(_gather(accelerator, F.pad(f.tokens.float(), (0, 0, 0, pad))))
            txt_mask.append(_gather(accelerator, F.pad(f.attention_mask, (0, pad))))
        return model.project_text(f.pooled)

    zi, ii = embed_all(images, embed_images, accelerator)
    zt, ti = embed_all(captions, embed_texts, accelerator)
    order = ii.argsort()
    if not torch.equal(ii[order], torch.arange(len(ii))):
        raise ValueError("The image loader must yield every image_index from 0 to N-1 exactly once.")
    out = recall_at_k(zi[order], zt, ti)
    if rerank:
        tokens_i = torch.cat(img_tok)[order]  # (N_i, P, Di)
        tokens_t, masks_t = torch.cat(txt_tok), torch.cat(txt_mask)  # (N_t, T, Dt), (N_t, T)
        device = model.device

        def pair_scores(image_idx: torch.Tensor, text_idx: torch.Tensor) -> torch.Tensor:
            uniq, inv = image_idx.unique(return_inverse=True)
            logits = model.fusion(tokens_t[text_idx].to(device), masks_t[text_idx].to(device),
                                  tokens_i[uniq].to(device), image_index=inv.to(device)).itm_logits.float()
            return (logits[:, 1] - logits[:, 0]).cpu()

        sims = zi[order] @ zt.T  # (N_i, N_t)
        out.update({f"itm_{k}": v for k, v in rerank_recall_at_k(sims, ti, pair_scores, k=rerank_k).items()})
    return out


def _gather(accelerator: Any, x: torch.Tensor) -> torch.Tensor:
    return (accelerator.gather_for_metrics(x.contiguous()) if accelerator is not None else x).cpu()
