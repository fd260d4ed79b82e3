"""Image-text matching through the fusion layer, with hard negatives (ALBEF)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.outputs import FusionOutput


@dataclass
class MatchingOutput:
    """Loss and diagnostics of one image-text matching step.

    Shapes:
        loss: () cross-entropy over 3B fused pairs (B positives, 2B hard negatives).
        accuracy: () share of those pairs classified correctly.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor


def sample_hard_negatives(
    similarity: torch.Tensor, group_ids: torch.Tensor | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row, draw a column with probability softmax(similarity) over the row's negatives.

    Columns in the same group as the row (its own pair, duplicate captions) are
    never drawn. A row with no negative in the batch at all draws uniformly.

    Shapes:
        similarity: (B, B) logits; group_ids: (B,) or None -> (B,) column indices.
    """
    B = similarity.shape[0]
    if group_ids is None:
        group_ids = torch.arange(B, device=similarity.device)
    same = group_ids[:, None] == group_ids[None, :]  # (B, B)
    logits = similarity.detach().float().masked_fill(same, float("-inf"))  # (B, B)
    logits = logits.masked_fill(same.all(1, keepdim=True), 0.0)  # a row with no negative in the batch (degenerate): uniform
    weights = logits.softmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class MatchingLoss(nn.Module):
    """ALBEF image-text matching: fused positive pairs against hard negatives.

    For every image a negative text, and for every text a negative image, is
    sampled in proportion to their contrastive similarity (excluding its own
    group), so the fusion layer learns the distinctions the dual encoder finds
    hardest. The labels are [match] * B + [no match] * 2B.

    Args of ``forward``:
        fuse: callable (text_tokens (3B, T, D), text_mask (3B, T), image_tokens (B, P, D),
            image_index=(3B,)) -> FusionOutput, e.g. ``fusion.fuse_projected`` on tokens
            already at the fusion width.
        image_tokens (B, P, Di), text_tokens (B, T, Dt), text_mask (B, T);
        sim_i2t: (B, B) contrastive logits of local images against local texts;
        group_ids: (B,) or None.
    """

    def forward(
        self,
        fuse: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], FusionOutput],  # (text, mask, image)
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        sim_i2t: torch.Tensor,
        group_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MatchingOutput:
        B = image_tokens.shape[0]
        neg_text = sample_hard_negatives(sim_i2t, group_ids, generator)  # (B,) a text for each image
        neg_image = sample_hard_negatives(sim_i2t.T, group_ids, generator)  # (B,) an image for each text
        own = torch.arange(B, device=image_tokens.device)
        image_index = torch.cat([own, own, neg_image])  # (3B,) rows of image_tokens, shared not copied
        texts = torch.cat([text_tokens, text_tokens[neg_text], text_tokens], dim=0)  # (3B, T, Dt)
        masks = torch.cat([text_mask, text_mask[neg_text], text_mask], dim=0)  # (3B, T)
        logits = fuse(texts, masks, image_tokens, image_index=image_index).itm_logits.float()  # (3B, 2)
        labels = (torch.arange(3 * B, device=logits.device) < B).long()  # (3B,): 1 for the B positives, made on the device
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == labels).float().mean()
        return MatchingOutput(loss=loss, accuracy=accuracy)
