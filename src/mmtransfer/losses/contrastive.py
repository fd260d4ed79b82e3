"""Symmetric InfoNCE (CLIP) over image and text embeddings, gathered across processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import all_gather_no_grad, all_gather_with_grad, world


@dataclass
class ContrastiveOutput:
    """Loss and diagnostics of one contrastive step.

    Shapes:
        loss: () the mean of the image->text and text->image cross-entropies.
        logits_per_image: (B, W*B) local images against all gathered texts.
        accuracy_i2t, accuracy_t2i: () share of local rows whose top match is a positive.
    """

    loss: torch.Tensor
    logits_per_image: torch.Tensor
    accuracy_i2t: torch.Tensor
    accuracy_t2i: torch.Tensor


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE with an all-gather that keeps gradients across processes.

    Each process scores its B local images against the W*B gathered texts and its
    B local texts against the W*B gathered images. The mean over processes of
    the returned loss equals the single-process loss on the global batch, and
    so do the gradients once DDP averages them.

    ``group_ids`` marks pairs that share a caption (or a class): every text of
    the same group counts as a positive for an image, with the target spread
    evenly over them, so duplicates in a batch are not pushed apart.

    ``weights`` (importance weights of the pairs, e.g. p_target/p_source of
    their images) turn both means into weighted means over the *global* batch:
    each process returns W * sum_local(w l) / sum_all(w), so the mean over
    processes is still the single-process loss on the global batch.

    Objective:
        L = 1/2 [ CE(s * I T^T, Q) + CE(s * T I^T, Q) ],  s = clamped logit scale,
        Q_ij = 1/|group(i)| if group(i) = group(j) else 0; with weights, each row's
        cross-entropy counts w_i / sum(w) instead of 1/N.

    Shapes:
        image_embeds, text_embeds: (B, E), L2-normalised; logit_scale: ();
        group_ids: (B,) int or None (then only the diagonal is positive);
        weights: (B,) non-negative, or None (plain means).

    Example:
        >>> loss = ContrastiveLoss()(F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1), torch.tensor(10.0))
        >>> loss.loss.shape
        torch.Size([])
    """

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor,
        group_ids: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> ContrastiveOutput:
        rank, size = world()
        B = image_embeds.shape[0]
        all_images = all_gather_with_grad(image_embeds)  # (N, E), N = W*B
        all_texts = all_gather_with_grad(text_embeds)  # (N, E)
        logits_i2t = logit_scale * image_embeds @ all_texts.T  # (B, N)
        logits_t2i = logit_scale * text_embeds @ all_images.T  # (B, N)
        if group_ids is None:
            group_ids = torch.arange(B, device=image_embeds.device) + rank * B
        all_groups = all_gather_no_grad(group_ids)  # (N,)
        positives = (group_ids[:, None] == all_groups[None, :]).to(logits_i2t.dtype)  # (B, N)
        targets = positives / positives.sum(1, keepdim=True)
        rows_i2t = torch.sum(-targets * F.log_softmax(logits_i2t.float(), dim=-1), dim=-1)  # (B,)
        rows_t2i = torch.sum(-targets * F.log_softmax(logits_t2i.float(), dim=-1), dim=-1)  # (B,)
        if weights is None:
            loss_i2t, loss_t2i = rows_i2t.mean(), rows_t2i.mean()
        else:
            w = weights.detach().float()  # (B,)
            scale = size / all_gather_no_grad(w).sum().clamp_min(1e-12)  # W / sum of the global batch's weights
            loss_i2t, loss_t2i = (w * rows_i2t).sum() * scale, (w * rows_t2i).sum() * scale
        with torch.no_grad():
            hit_i2t = positives.gather(1, logits_i2t.argmax(1, keepdim=True)).mean()
            hit_t2i = positives.gather(1, logits_t2i.argmax(1, keepdim=True)).mean()
        return ContrastiveOutput(
            loss=(loss_i2t + loss_t2i) / 2,
            logits_per_image=logits_i2t,
            accuracy_i2t=hit_i2t,
            accuracy_t2i=hit_t2i,
        )
