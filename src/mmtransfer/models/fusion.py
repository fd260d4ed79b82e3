"""Shared-space projections and the cross-attention fusion stack (ALBEF-style).

Text tokens attend to themselves and then to image tokens in each pre-norm
residual layer; optionally image tokens attend back to the text. The pooled
fused vector (masked mean over real text tokens) feeds the image-text
matching head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FusionConfig
from .outputs import FusionOutput


class Projection(nn.Module):
    """Tower width -> shared embedding width: linear, a 2-layer MLP with GELU, or none (identity).

    Shapes:
        (B, D_in) -> (B, E)
    """

    KINDS = ("linear", "mlp", "none")

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", dropout: float = 0.0) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim, bias=False)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        elif kind == "none":
            if in_dim != out_dim:
                raise ValueError(
                    f"projection 'none' keeps the tower's {in_dim}-d pooled vector, but the shared space is {out_dim}-d: "
                    f"set embed_dim={in_dim}, or use a 'linear' or 'mlp' projection."
                )
            self.net = nn.Identity()
        else:
            raise ValueError(f"Unknown projection '{kind}': use one of {', '.join(self.KINDS)}.")
        # Dropout on the MLP's input and hidden layer; kept outside `net` so that saved
        # weights do not depend on it.
        self.dropout = nn.Dropout(dropout) if kind == "mlp" and dropout > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is None:
            return self.net(x)
        first, act, last = self.net
        return last(self.dropout(act(first(self.dropout(x)))))


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context``, with a key padding mask.

    Shapes:
        x: (B, Tq, W), context: (B, Tk, W), key_mask: (B, Tk) True for real keys.
        -> out (B, Tq, W), weights (B, H, Tq, Tk) when ``need_weights`` else None.
    """

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"fusion.num_heads ({num_heads}) must divide the fusion width ({width}).")
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        context_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``context_index`` (B,) picks a context row per query row, so keys and values are
        computed once per distinct context (B_ctx, Tk, W) and shared by the rows that use it."""
        B, Tq, W = x.shape
        Bc, Tk = context.shape[:2]
        q = self.q(x).view(B, Tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, d)
        k, v = self.kv(context).view(Bc, Tk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (Bc, H, Tk, d)
        if context_index is not None:
            k, v = k[context_index], v[context_index]  # 2 x (B, H, Tk, d)
        mask = key_mask[:, None, None, :].bool() if key_mask is not None else None  # (B, 1, 1, Tk)
        drop = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, Tq, Tk)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(-1)
            out = F.dropout(weights, drop, self.training) @ v  # (B, H, Tq, d)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)  # (B, H, Tq, d)
        out = out.transpose(1, 2).reshape(B, Tq, W)  # (B, Tq, W)
        return self.out(out), weights


class MLP(nn.Sequential):
    def __init__(self, width: int, ratio: float, dropout: float) -> None:
        hidden = int(width * ratio)
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))


class FusionLayer(nn.Module):
    """One pre-norm residual layer: text self-attention, text->image cross-attention, MLP.

    With ``bidirectional``, image tokens then attend to the updated text tokens
    and pass through their own MLP.
    """

    def __init__(self, config: FusionConfig, width: int) -> None:
        super().__init__()
        h, p, r = config.num_heads, config.dropout, config.mlp_ratio
        self.norm_self, self.self_attn = nn.LayerNorm(width), Attention(width, h, p)
        self.norm_cross, self.norm_ctx, self.cross_attn = nn.LayerNorm(width), nn.LayerNorm(width), Attention(width, h, p)
        self.norm_mlp, self.mlp = nn.LayerNorm(width), MLP(width, r, p)
        self.drop = nn.Dropout(p)
        self.bidirectional = config.bidirectional
        if self.bidirectional:
            self.norm_img, self.norm_img_ctx = nn.LayerNorm(width), nn.LayerNorm(width)
            self.img_attn = Attention(width, h, p)
            self.norm_img_mlp, self.img_mlp = nn.LayerNorm(width), MLP(width, r, p)

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        need_weights: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        t = self.norm_self(text)
        text = text + self.drop(self.self_attn(t, t, text_mask)[0])  # (B, T, W)
        cross, weights = self.cross_attn(self.norm_cross(text), self.norm_ctx(image), None, need_weights, image_index)
        text = text + self.drop(cross)  # (B, T, W)
        text = text + self.drop(self.mlp(self.norm_mlp(text)))
        if self.bidirectional:
            back, _ = self.img_attn(self.norm_img(image), self.norm_img_ctx(text), text_mask)
            image = image + self.drop(back)  # (B, P, W)
            image = image + self.drop(self.img_mlp(self.norm_img_mlp(image)))
        return text, image, weights


class Fusion(nn.Module):
    """Project tower tokens to the fusion width, run the layers, pool, and score matching.

    Args:
        config: depth, width, heads and direction of the stack.
        text_width, image_width: token widths of the two towers.
        width: fusion width (``config.width`` or the shared embedding width).

    Shapes:
        text_tokens (B, T, D_t), text_mask (B, T), image_tokens (B, P, D_i)
        -> tokens (B, T, W), pooled (B, W), itm_logits (B, 2).
    """

    def __init__(self, config: FusionConfig, text_width: int, image_width: int, width: int) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_width, width)
        self.image_in = nn.Linear(image_width, width)
        self.bidirectional = config.bidirectional
        self.layers = nn.ModuleList(FusionLayer(config, width) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 2)

    def forward(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        output_attentions: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> FusionOutput:
        text = self.text_in(text_tokens)  # (B, T, W)
        image = self.image_in(image_tokens)  # (B_img, P, W)
        return self.fuse_projected(text, text_mask, image, output_attentions, image_index)

    def fuse_projected(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        output_attentions: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> FusionOutput:
        """The layers on tokens already projected to the fusion width: (B, T, W), (B, T), (B_img, P, W).

        ``image_index`` (B,) pairs text row b with image row ``image_index[b]``.
        Image-text matching fuses every image three times (with its caption, with
        a negative caption, as a negative image); sharing the image rows saves
        their projections, norms, keys and values. Without it, B_img = B.
        """
        if image_index is not None and self.bidirectional:
            image, image_index = image[image_index], None  # image tokens change per pair: expand
        attentions = []
        for layer in self.layers:
            text, image, weights = layer(text, text_mask, image, output_attentions, image_index)
            if output_attentions:
                attentions.append(weights)  # (B, H, T, P)
        tokens = self.norm(text)  # (B, T, W)
        mask = text_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, W)
        return FusionOutput(
            tokens=tokens,
            pooled=pooled,
            itm_logits=self.itm_head(pooled),  # (B, 2)
            attentions=tuple(attentions) if output_attentions else None,
        )
