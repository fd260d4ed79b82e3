"""Evaluation: retrieval recall@K with several captions per image, gathered across processes."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch


def recall_at_k(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_index: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image recall@K, in percent.

    An image counts as retrieved at K when any of its captions is among the K
    texts most similar to it; a caption when its own image is among the K
    images most similar to it.

    Shapes:
        image_embeds: (N_i, E) normalised; text_embeds: (N_t, E) normalised;
        text_image_index: (N_t,) the image each caption belongs to.

    Example:
        >>> e = torch.eye(3)
        >>> recall_at_k(e, e, torch.arange(3), ks=(1,))
        {'i2t_R@1': 100.0, 't2i_R@1': 100.0}
    """
    sims = image_embeds.float() @ text_embeds.float().T  # (N_i, N_t)
    n_images = image_embeds.shape[0]
    owner = text_image_index.to(sims.device).long()
    correct = owner[None, :] == torch.arange(n_images, device=sims.device)[:, None]  # (N_i, N_t)
    # Rank of the best-placed correct caption for each image (0 = top).
    best_correct = sims.masked_fill(~correct, float("-inf")).max(1).values  # (N_i,)
    i2t_rank = (sims > best_correct[:, None]).sum(1)  # (N_i,)
    # Rank of the own image for each caption.
    own = sims.T.gather(1, owner[:, None])  # (N_t, 1)
    t2i_rank = (sims.T > own).sum(1)  # (N_t,)
    has_caption = correct.any(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t_rank[has_caption] < k).float().mean())
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float((t2i_rank < k).float().mean())
    return out


@torch.no_grad()
def embed_all(
    loader: Iterable[dict[str, Any]],
    embed: Callable[[dict[str, Any]], torch.Tensor],
    accelerator: Any = None,
    index_key: str = "image_index",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every batch of ``loader`` and gather (embeddings, ``batch[index_key]``) from all processes.

    ``gather_for_metrics`` drops the samples that even sharding repeated, so
    the result covers the dataset exactly once.

    Shapes:
        -> (N, E) embeddings on the CPU, (N,) indices.
    """
    embs, idx = [], []
    for batch in loader:
        z = embed(batch)
        i = batch[index_key]
        if accelerator is not None:
            z, i = accelerator.gather_for_metrics((z.contiguous(), i.contiguous()))
        embs.append(z.float().cpu())
        idx.append(i.cpu())
    return torch.cat(embs), torch.cat(idx)
