"""Evaluation: retrieval recall@K with several captions per image, gathered across processes."""

from __future__ import annotations

import math
from pathlib import Path
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


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy, macro precision/recall/F1 (percent), and a per-class table.

    Classes absent from ``labels`` are left out of the macro averages.

    Shapes:
        logits: (N, C); labels: (N,) in [0, C).
    """
    n, C = logits.shape
    pred = logits.argmax(1)
    k = min(5, C)
    topk = logits.topk(k, dim=1).indices  # (N, k)
    conf = confusion_matrix(pred, labels, C)  # (C, C) rows = true
    tp = conf.diag().float()
    support = conf.sum(1).float()
    predicted = conf.sum(0).float()
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros_like(tp))
    present = support > 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(C)]
    per_class = [
        {"class": names[c], "support": int(support[c]), "precision": 100 * float(precision[c]),
         "recall": 100 * float(recall[c]), "f1": 100 * float(f1[c])}
        for c in range(C) if present[c]
    ]
    return {
        "top1": 100.0 * float((pred == labels).float().mean()),
        f"top{k}": 100.0 * float((topk == labels[:, None]).any(1).float().mean()),
        "macro_precision": 100.0 * float(precision[present].mean()),
        "macro_recall": 100.0 * float(recall[present].mean()),
        "macro_f1": 100.0 * float(f1[present].mean()),
        "n": int(n),
        "per_class": per_class,
    }


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion(conf: torch.Tensor, class_names: Sequence[str], path: Any, max_classes: int = 40, title: str = "") -> Any:
    """A row-normalised confusion-matrix PNG (the most frequent ``max_classes`` classes when there are more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = conf.float()
    keep = conf.sum(1).argsort(descending=True)[:max_classes].sort().values
    sub = conf[keep][:, keep]
    norm = sub / sub.sum(1, keepdim=True).clamp_min(1)
    names = [class_names[i] for i in keep.tolist()]
    size = max(4.0, 0.28 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion (row-normalised, {len(names)} of {conf.shape[0]} classes)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def rerank_recall_at_k(
    sims: torch.Tensor,
    text_image_index: torch.Tensor,
    pair_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int = 10,
    ks: Sequence[int] = (1, 5, 10),
    batch_pairs: int = 512,
) -> dict[str, float]:
    """Recall@K after re-ranking each query's top ``k`` candidates with a pair scorer (ALBEF).

    The dual encoder proposes the top ``k`` candidates by cosine similarity;
    ``pair_scores(image_idx, text_idx)`` (the fusion layer's matching logit)
    re-orders them. Only R@K for K <= ``k`` is reported (beyond it the order is
    the dual encoder's, see :func:`recall_at_k`).

    Shapes:
        sims: (N_i, N_t); text_image_index: (N_t,); pair_scores: (n,), (n,) -> (n,).
    """
    n_img, n_txt = sims.shape
    k = min(k, n_img, n_txt)
    owner = text_image_index.long()

    def reranked_hits(cand: torch.Tensor, score_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      correct: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """For each query (row of ``cand``, its top-k candidates): rank of the first correct one after re-ranking."""
        q = torch.arange(cand.shape[0]).repeat_interleave(k)  # (Q*k,)
        c = cand.reshape(-1)  # (Q*k,)
        scores = torch.cat([score_rows(q[i:i + batch_pairs], c[i:i + batch_pairs]) for i in range(0, len(q), batch_pairs)])
        order = scores.view(-1, k).argsort(dim=1, descending=True)  # (Q, k)
        reordered = cand.gather(1, order)  # (Q, k)
        ok = correct(torch.arange(cand.shape[0])[:, None].expand_as(reordered), reordered)  # (Q, k) bool
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((cand.shape[0],), k))  # k = not in top-k
        return first

    # Image -> text: candidates are texts.
    i2t_cand = sims.topk(k, dim=1).indices  # (N_i, k)
    i2t_rank = reranked_hits(i2t_cand, lambda q, c: pair_scores(q, c), lambda q, c: owner[c] == q)
    # Text -> image: candidates are images.
    t2i_cand = sims.T.topk(k, dim=1).indices  # (N_t, k)
    t2i_rank = reranked_hits(t2i_cand, lambda q, c: pair_scores(c, q), lambda q, c: c == owner[q])
    out: dict[str, float] = {}
    has_caption = torch.zeros(n_img, dtype=torch.bool)
    has_caption[owner] = True
    for kk in ks:
        if kk <= k:
            out[f"i2t_R@{kk}"] = 100.0 * float((i2t_rank[has_caption] < kk).float().mean())
    for kk in ks:
        if kk <= k:
            out[f"t2i_R@{kk}"] = 100.0 * float((t2i_rank < kk).float().mean())
    return out


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """One PNG with a panel per logged metric (training loss first), against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in ("step", "time") and k not in keys and isinstance(r[k], (int, float))]
    keys = sorted(keys, key=lambda k: (not k.startswith("train/loss"), not k.startswith("train/"), k))[:12]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def sample_points(feats: dict[str, dict[str, torch.Tensor]], max_points: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for role in ("source", "target"):
        f, y = feats[role]["features"], feats[role]["labels"]
        keep = torch.randperm(f.shape[0], generator=g)[:max_points]
        out[role], out[f"{role}_labels"] = f[keep].numpy(), y[keep].numpy()
    return out


def save_points(points: dict[str, Any], path: Path) -> None:
    import numpy as np

    np.savez_compressed(path, **points)


def load_points(path: str | Path) -> dict[str, Any]:
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plot.before: '{path}' does not exist; point it at another run's embeddings_final.npz.")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
