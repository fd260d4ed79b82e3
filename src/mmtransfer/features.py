"""Feature caching for frozen towers.

When a tower is frozen and its inputs are not augmented, its output for a
given image or caption never changes, so it is computed once and reused every
step: training the projections and the fusion layer then costs a fraction of
a forward pass through the towers. Caches live in memory and, with a folder,
on disk as safetensors keyed by the tower's weights, its preprocessing and
the data, so a changed model or data set never reads a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .data.collate import caption_form, caption_group, check_templates

logger = logging.getLogger(__name__)


@dataclass
class FeatureCacheConfig:
    """The ``data.features`` section of the caption and domain recipes: what frozen towers keep."""

    # Compute frozen, unaugmented towers once and reuse their features every step.
    cache: bool = True
    # Also keep cached features on disk, keyed by weights and data, for later runs.
    persist: bool = True
    # Folder of on-disk feature caches (None: "features" in the data cache folder,
    # $MMTRANSFER_CACHE_DIR or ~/.cache/mmtransfer).
    folder: str | None = None


@dataclass
class CachedFeatures:
    """Tower outputs for N items.

    Shapes:
        pooled: (N, D) float32.
        tokens: (N, P, D) float16 (halved to fit memory), or None when not kept.
        attention_mask: (N, T) for text, None for images.
        input_ids: (N, T) for text, None for images.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.to_dict().values())


def with_row_ids(dataset: Any) -> Any:
    """The dataset with ``image_id`` renumbered 0..N-1, so batch indices are row positions."""
    if "image_id" in dataset.column_names:
        dataset = dataset.remove_columns("image_id")
    return dataset.add_column("image_id", list(range(len(dataset))))


def module_fingerprint(module: nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes and values)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(folder: str | Path | None, kind: str, parts: dict[str, Any]) -> Path | None:
    if folder is None:
        return None
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(folder) / f"{kind}-{key}.safetensors"


def _load(path: Path | None) -> CachedFeatures | None:
    if path is None or not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        return CachedFeatures(**load_file(str(path)))
    except Exception as err:  # a damaged file is recomputed, not trusted
        logger.warning("Ignoring unreadable feature cache %s (%s); recomputing.", path, err)
        return None


def _save(path: Path | None, feats: CachedFeatures) -> None:
    if path is None:
        return
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in feats.to_dict().items()}, str(tmp))
    tmp.rename(path)


@torch.no_grad()
def image_features(
    encoder: nn.Module,
    loader: Any,
    num_items: int,
    keep_tokens: bool = True,
    cache_dir: str | Path | None = None,
    data_key: str = "",
    progress: bool = True,
    desc: str = "caching image features",
) -> CachedFeatures:
    """Run a frozen image tower once over ``loader`` (batches with ``pixel_values`` and ``image_index``).

    Args:
        encoder: an :class:`~mmtransfer.models.ImageEncoder`.
        loader: batches of ``{"pixel_values": (B, 3, S, S), "image_index": (B,)}`` covering 0..N-1.
        num_items: N.
        keep_tokens: keep the (N, P, D) tokens (needed by the fusion layer).
        cache_dir: folder for the on-disk cache (None: memory only).
        data_key: identifies the data (e.g. the dataset fingerprint and split).
    """
    from tqdm.auto import tqdm

    config = getattr(encoder, "config", None)  # pooling and model options change the output, not the weights
    parts = {"weights": module_fingerprint(encoder), "pre": repr(getattr(encoder, "preprocessor", None)),
             "pooling": getattr(config, "pooling", None), "model_kwargs": getattr(config, "model_kwargs", None),
             "data": data_key, "n": num_items, "tokens": keep_tokens}
    path = _cache_path(cache_dir, "image", parts)
    cached = _load(path)
    if cached is not None:
        logger.info("Image features loaded from %s", path)
        return cached
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    pooled: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    filled = torch.zeros(num_items, dtype=torch.bool)
    for batch in tqdm(loader, desc=desc, disable=not progress, dynamic_ncols=True):
        out = encoder(batch["pixel_values"].to(device))
        idx = batch["image_index"].cpu()
        if pooled is None:
            pooled = torch.empty(num_items, out.pooled.shape[-1])
            if keep_tokens:
                tokens = torch.empty(num_items, *out.tokens.shape[1:], dtype=torch.float16)
        pooled[idx] = out.pooled.float().cpu()
        if tokens is not None:
            tokens[idx] = out.tokens.to(torch.float16).cpu()
        filled[idx] = True
    encoder.train(was_training)
    if pooled is None or not filled.all():
        raise ValueError(f"The image loader covered {int(filled.sum())} of {num_items} images; it must yield each image_index once.")
    feats = CachedFeatures(pooled=pooled, tokens=tokens)
    _save(path, feats)
    logger.info("Cached %d image features (%.0f MB)%s", num_items, feats.nbytes / 2**20, f" in {path}" if path else "")
    return feats


@torch.no_grad()
def text_features(
    encoder: nn.Module,
    texts: Sequence[str],
    keep_tokens: bool = True,
    batch_size: int = 256,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> CachedFeatures:
    """Run a frozen text tower once over ``texts`` (padded to the longest tokenised text).

    Shapes:
        -> pooled (N, D), tokens (N, T, D) float16, attention_mask and input_ids (N, T).
    """
    from tqdm.auto import tqdm

    texts = list(texts)
    parts = {"weights": module_fingerprint(encoder), "texts": hashlib.sha256("\x1f".join(texts).encode()).hexdigest(),
             "max_length": encoder.config.max_length, "pooling": encoder.config.pooling, "tokens": keep_tokens}
    path = _cache_path(cache_dir, "text", parts)
    cached = _load(path)
    if cached is not None:
        logger.info("Text features loaded from %s", path)
        return cached
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    enc = encoder.tokenizer(texts, padding=True, truncation=True, max_length=encoder.config.max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (N, T)
    pooled, tokens = [], []
    for start in tqdm(range(0, len(texts), batch_size), desc="caching text features", disable=not progress, dynamic_ncols=True):
        sl = slice(start, start + batch_size)
        out = encoder(ids[sl].to(device), mask[sl].to(device))
        pooled.append(out.pooled.float().cpu())
        if keep_tokens:
            tokens.append(out.tokens.to(torch.float16).cpu())
    encoder.train(was_training)
    feats = CachedFeatures(pooled=torch.cat(pooled), tokens=torch.cat(tokens) if keep_tokens else None,
                           attention_mask=mask, input_ids=ids)
    _save(path, feats)
    return feats


class CachedCaptionCollator:
    """Image positions -> a caption batch built from cached image features.

    Each item is the position of an image; one of its captions is picked (at
    random with a seeded generator in training, the first in evaluation). With
    several cached copies of the image features (the plain one first, then
    augmented ones), training draws one copy per item the same way and
    evaluation reads the plain one. Text
    comes from cached text features when the text tower is frozen too, or is
    tokenised for the trainable text tower otherwise.

    Items may also be ``(position, draw)`` pairs, where ``draw`` is a random
    integer chosen by the sampler: in training, the copy is ``draw % copies``
    and the caption ``(draw // copies) % forms`` (forms: its captions, times the
    templates when there are any), so a batch is a pure function
    of its items and a resumed run draws exactly what an uninterrupted one does
    (see :class:`~mmtransfer.recipes.multitask.MixedBatchSampler`).

    Args:
        image_feats: cached image tower outputs for positions 0..N-1, or a list of
            such copies (plain first, then augmented).
        captions: per image, its captions.
        text_feats: cached text tower outputs for ``text_rows``' strings, or None.
        text_rows: caption string -> row of ``text_feats`` (with ``text_feats``).
        tokenizer, max_length: tokenise captions when ``text_feats`` is None.
        train: pick captions at random.
        labels: per image, its class label (added to batches as ``labels``), or None.
        templates: prompt templates; in training each caption is drawn in one of
            their forms (cached text must hold every form: :func:`~mmtransfer.data.collate.templated`).

    Shapes:
        -> image_pooled (B, Di), image_tokens (B, P, Di), input_ids and attention_mask (B, T),
        with cached text: text_pooled (B, Dt), text_tokens (B, T, Dt), with labels: labels (B,),
        with templates in training: caption_group (B,) (the caption before templating).
    """

    def __init__(
        self,
        image_feats: CachedFeatures | Sequence[CachedFeatures],
        captions: list[list[str]],
        text_feats: CachedFeatures | None = None,
        text_rows: dict[str, int] | None = None,
        tokenizer: Any = None,
        max_length: int = 64,
        train: bool = False,
        seed: int = 0,
        labels: Sequence[int] | None = None,
        templates: Sequence[str] | None = None,
    ) -> None:
        if text_feats is None and tokenizer is None:
            raise ValueError("Give either cached text features or a tokenizer.")
        self.copies = [image_feats] if isinstance(image_feats, CachedFeatures) else list(image_feats)
        if not self.copies:
            raise ValueError("Give at least one copy of the cached image features.")
        self.choices = len(self.copies)  # copies one row draws from: the plain one and every augmented one
        self.image_feats = self.copies[0]
        self.captions = captions
        self.text_feats = text_feats
        self.text_rows = text_rows or {}
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = train
        self.rng = random.Random(seed)
        self.labels = None if labels is None else torch.as_tensor(list(labels), dtype=torch.long)
        self.templates = check_templates(templates) if train else None

    def _pick(self, caps: list[str], draw: int | None = None) -> tuple[str, str]:
        """(text, caption): the caption drawn, in its drawn template's form."""
        forms = len(caps) * (len(self.templates) if self.templates else 1)
        if not self.train or forms == 1:
            i = 0
        elif draw is not None:
            i = (draw // self.choices) % forms
        else:
            i = self.rng.randrange(forms)
        return caption_form(caps, self.templates, i)

    def _images(self, idx: torch.Tensor, draws: list[int] | None = None) -> dict[str, torch.Tensor]:
        """image_pooled (B, Di) and image_tokens (B, P, Di), each item from its drawn copy."""
        if not self.train or len(self.copies) == 1:
            feats = self.image_feats
            out = {"image_pooled": feats.pooled[idx]}
            if feats.tokens is not None:
                out["image_tokens"] = feats.tokens[idx].float()
            return out
        n = self.choices
        picks = [d % n for d in draws] if draws is not None else [self.rng.randrange(n) for _ in range(len(idx))]
        which = torch.as_tensor(picks)  # (B,)
        first = self.image_feats
        pooled = torch.empty(len(idx), *first.pooled.shape[1:], dtype=first.pooled.dtype)
        tokens = None if first.tokens is None else torch.empty(len(idx), *first.tokens.shape[1:])
        for c, feats in enumerate(self.copies):
            rows = (which == c).nonzero().squeeze(1)
            pooled[rows] = feats.pooled[idx[rows]]
            if tokens is not None:
                tokens[rows] = feats.tokens[idx[rows]].float()
        return {"image_pooled": pooled} if tokens is None else {"image_pooled": pooled, "image_tokens": tokens}

    def __call__(self, positions: list[int] | list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        draws: list[int] | None = None
        if positions and isinstance(positions[0], (tuple, list)):
            positions, draws = [int(p) for p, _ in positions], [int(d) for _, d in positions]
        idx = torch.as_tensor(positions, dtype=torch.long)  # (B,)
        texts, captions = zip(*[self._pick(self.captions[p], None if draws is None else draws[i]) for i, p in enumerate(positions)])
        batch = {"image_index": idx, **self._images(idx, draws)}
        if self.labels is not None:
            batch["labels"] = self.labels[idx]  # (B,)
        if self.templates:  # templated forms of one caption are positives of each other
            batch["caption_group"] = torch.as_tensor([caption_group(c) for c in captions], dtype=torch.long)  # (B,)
        if self.text_feats is None:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            batch.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])  # (B, T)
            return batch
        t = torch.as_tensor([self.text_rows[c] for c in texts], dtype=torch.long)  # (B,)
        mask = self.text_feats.attention_mask[t]  # (N_t, T_max) -> (B, T_max)
        T = int(mask.sum(1).max())  # right padding: the first T columns hold every real token
        batch.update(
            input_ids=self.text_feats.input_ids[t, :T],  # (B, T)
            attention_mask=mask[:, :T],  # (B, T)
            text_pooled=self.text_feats.pooled[t],  # (B, Dt)
        )
        if self.text_feats.tokens is not None:
            batch["text_tokens"] = self.text_feats.tokens[t, :T].float()  # (B, T, Dt)
        return batch
