"""Typed outputs: every model call returns exactly one of these dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEncoderOutput:
    """Text tower output.

    Shapes:
        tokens: (B, T, D_text) last hidden states.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
        pooled: (B, D_text) CLS or masked mean, by config.
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    pooled: torch.Tensor


@dataclass
class ImageEncoderOutput:
    """Image tower output.

    Shapes:
        tokens: (B, P, D_image) grid cells of a CNN (P = H*W) or the tokens of a
            ViT (class/register tokens first, then patches).
        pooled: (B, D_image).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


@dataclass
class FusionOutput:
    """Cross-attention fusion output.

    Shapes:
        tokens: (B, T, W) fused text tokens.
        pooled: (B, W) masked mean of the fused text tokens.
        itm_logits: (B, 2) image-text matching logits [no match, match].
        attentions: one (B, heads, T, P) text-to-image attention map per layer,
            or None when not requested.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    itm_logits: torch.Tensor
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MultimodalOutput:
    """Full forward pass of :class:`~mmtransfer.MultimodalModel`.

    Shapes:
        image_embeds: (B, E) normalised image embeddings in the shared space.
        text_embeds: (B, E) normalised text embeddings.
        logits_per_image: (B, B) scaled cosine similarities, image i vs text j.
        logits_per_text: (B, B) its transpose.
        logit_scale: () the clamped inverse temperature used.
        image: the image tower output (tokens feed the fusion).
        text: the text tower output.
        fusion: the fusion output for the aligned pairs, or None when fusion is
            disabled or not requested.
    """

    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    logits_per_image: torch.Tensor
    logits_per_text: torch.Tensor
    logit_scale: torch.Tensor
    image: ImageEncoderOutput
    text: TextEncoderOutput
    fusion: FusionOutput | None = None
