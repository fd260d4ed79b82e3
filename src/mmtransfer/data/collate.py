"""Batching: caption and label collators, paired source/target loading, retrieval flattening.

Collators are plain picklable objects, so ``DataLoader(num_workers=N)`` can
copy them into worker processes. They decode images themselves when the data
set's image column is not decoded (see :func:`make_loader`), so that a file
that went bad after loading fails with a message naming it rather than a
stack trace from inside ``datasets``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

from .config import DataError

if TYPE_CHECKING:
    import torch
    from datasets import Dataset
    from PIL import Image
    from torch.utils.data import DataLoader

    from ..models.preprocess import AugmentConfig, ImagePreprocessor


def _image(row: dict[str, Any], position: int) -> "Image.Image":
    from PIL import Image

    from .images import open_image

    value = row.get("image")
    if value is None:
        raise DataError(f"Batch row {position} has no 'image' value; the data set needs an image column (load() names it 'image').")
    if isinstance(value, Image.Image):
        return value
    where = f"image_id {row['image_id']}" if "image_id" in row else f"batch row {position}"
    return open_image(value, where)


def _row_id(row: dict[str, Any], position: int) -> int:
    value = row.get("image_id")
    return int(value) if value is not None else position


def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def check_templates(templates: Sequence[str] | None, where: str = "caption_templates") -> tuple[str, ...] | None:
    """``templates`` as a tuple, after checking that each holds one ``{}`` (where the caption goes)."""
    if templates is None:
        return None
    if isinstance(templates, str):
        templates = [templates]
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad or not templates:
        raise DataError(f"{where} must be a non-empty list of texts with one '{{}}' each, where the caption goes "
                        f"(e.g. ['{{}}', 'an emoji of {{}}.']); these are not: {bad or templates}.")
    return tuple(templates)


def templated(captions: Sequence[str], templates: Sequence[str] | None) -> list[str]:
    """Every caption in every template's form, caption-major: index ``i`` is caption ``i // T`` in template ``i % T``."""
    return list(captions) if not templates else [t.format(c) for c in captions for t in templates]


def caption_form(captions: Sequence[str], templates: Sequence[str] | None, i: int) -> tuple[str, str]:
    """(text, caption): form ``i`` of :func:`templated` without building the others, and the caption it puts in words."""
    per_caption = len(templates) if templates else 1
    caption = captions[i // per_caption]
    return (templates[i % per_caption].format(caption) if templates else caption), caption


def caption_group(caption: str) -> int:
    """A stable int64 id of a caption string, equal across processes: templated forms of one caption share it."""
    return int.from_bytes(hashlib.blake2b(caption.encode(), digest_size=8).digest(), "big", signed=True)


class CaptionCollator:
    """Rows with ``image`` and ``captions`` -> a batch for contrastive image-text training.

    One caption is picked per image: at random in training (a generator seeded
    from ``seed`` and, inside a DataLoader worker, the worker's seed, which the
    loader's seeded generator makes deterministic), the first one in evaluation.

    Args:
        tokenizer: a Hugging Face tokenizer (``model.tokenizer``).
        preprocessor: the image tower's :class:`ImagePreprocessor` (``model.preprocessor``).
        max_length: captions longer than this many tokens are truncated.
        train: pick captions at random and apply ``augment``.
        augment: train-time augmentation, applied through ``preprocessor.with_augment``.
        seed: seed of the caption choice.
        pad_to_max_length: pad every batch to ``max_length`` (static shapes) instead of its longest caption.
        templates: prompt templates (``'an emoji of {}.'``); in training each caption is
            drawn in one of them at random, so the text side sees what a zero-shot
            classifier built from the same templates will ask. None: captions as written.

    Shapes:
        -> ``pixel_values`` (B, 3, S, S) float32, ``input_ids`` (B, T) int64,
        ``attention_mask`` (B, T) int64, ``image_index`` (B,) int64 (the rows' ``image_id``),
        ``labels`` (B,) int64 when every row has an integer ``label``, and with templates in
        training ``caption_group`` (B,) int64 (:func:`caption_group` of the caption before templating).

    Example:
        >>> m = mmtransfer.create_model("tiny-random")
        >>> collate = CaptionCollator.from_model(m, train=True)
        >>> batch = collate([ds[0], ds[1]])
        >>> batch["pixel_values"].shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocessor: "ImagePreprocessor",
        max_length: int = 64,
        train: bool = False,
        augment: "AugmentConfig | None" = None,
        seed: int = 0,
        pad_to_max_length: bool = False,
        templates: Sequence[str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.templates = check_templates(templates) if train else None
        self.preprocessor = preprocessor.with_augment(augment) if (train and augment is not None) else preprocessor
        self.max_length = max_length
        self.train = train
        self.seed = seed
        self.pad_to_max_length = pad_to_max_length
        self._rng: random.Random | None = None

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "CaptionCollator":
        """The tokenizer, preprocessor and max length of a :class:`MultimodalModel`."""
        kwargs.setdefault("max_length", model.text_encoder.config.max_length)
        return cls(model.tokenizer, model.preprocessor, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rng"] = None  # each process seeds its own generator
        return state

    def _generator(self) -> random.Random:
        if self._rng is None:
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            self._rng = random.Random(_stable_seed("captions", self.seed, info.seed if info is not None else "main"))
        return self._rng

    def pick(self, captions: Sequence[str], position: int) -> tuple[str, str]:
        """(text, caption): one caption of a row, in one template's form when templates are set."""
        if isinstance(captions, str):
            captions = [captions]
        if not captions:
            raise DataError(
                f"Batch row {position} has no caption. Load the data with mmtransfer.data.load (it checks captions), "
                "or drop rows with empty 'captions'."
            )
        forms = len(captions) * (len(self.templates) if self.templates else 1)
        return caption_form(captions, self.templates, self._generator().randrange(forms) if self.train and forms > 1 else 0)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        for i, row in enumerate(rows):
            if "captions" not in row:
                raise DataError(f"Batch row {i} has no 'captions' column; this collator needs captioned data (columns: {', '.join(row)}).")
        texts, captions = zip(*[self.pick(row["captions"], i) for i, row in enumerate(rows)])
        pixels = self.preprocessor([_image(row, i) for i, row in enumerate(rows)])  # (B, 3, S, S)
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if self.pad_to_max_length else True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {
            "pixel_values": pixels,
            "input_ids": enc["input_ids"],  # (B, T)
            "attention_mask": enc["attention_mask"],  # (B, T)
            "image_index": torch.tensor([_row_id(r, i) for i, r in enumerate(rows)], dtype=torch.long),  # (B,)
        }
        if all(isinstance(r.get("label"), int) for r in rows):  # labelled captions: the class of each image
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)  # (B,)
        if self.templates:  # templated forms of one caption are positives of each other
            batch["caption_group"] = torch.tensor([caption_group(c) for c in captions], dtype=torch.long)  # (B,)
        return batch


class LabelCollator:
    """Rows with ``image`` and ``label`` -> ``{"pixel_values": (B, 3, S, S), "labels": (B,)}``.

    Args:
        preprocessor: the image tower's :class:`ImagePreprocessor`.
        train: apply ``augment``.
        augment: train-time augmentation.
        require_labels: False lets unlabelled rows through with label -1 (adaptation targets).

    Example:
        >>> collate = LabelCollator(model.preprocessor)
        >>> collate([ds[0]])["labels"].shape
        torch.Size([1])
    """

    def __init__(self, preprocessor: "ImagePreprocessor", train: bool = False, augment: "AugmentConfig | None" = None, require_labels: bool = True) -> None:
        self.preprocessor = preprocessor.with_augment(augment) if (train and augment is not None) else preprocessor
        self.require_labels = require_labels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        labels = []
        for i, row in enumerate(rows):
            value = row.get("label")
            if value is None or value < 0:
                if self.require_labels:
                    raise DataError(
                        f"Batch row {i} ({'image_id ' + str(row['image_id']) if 'image_id' in row else 'no image_id'}) has no label. "
                        "Use a labelled data set, or LabelCollator(require_labels=False) for unlabelled target data."
                    )
                value = -1
            labels.append(int(value))
        return {
            "pixel_values": self.preprocessor([_image(row, i) for i, row in enumerate(rows)]),  # (B, 3, S, S)
            "labels": torch.tensor(labels, dtype=torch.long),  # (B,)
        }


class ImageCollator:
    """Rows -> ``{"pixel_values": (B, 3, S, S), "image_index": (B,)}`` (for encoding images in evaluation)."""

    def __init__(self, preprocessor: "ImagePreprocessor") -> None:
        self.preprocessor = preprocessor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, "torch.Tensor"]:
        import torch

        return {
            "pixel_values": self.preprocessor([_image(row, i) for i, row in enumerate(rows)]),  # (B, 3, S, S)
            "image_index": torch.tensor([_row_id(r, i) for i, r in enumerate(rows)], dtype=torch.long),  # (B,)
        }


def undecoded(dataset: "Dataset") -> "Dataset":
    """The data set with its image column left as ``{"path", "bytes"}``: the collators decode (and name bad files)."""
    from datasets import Image

    if "image" in dataset.column_names and isinstance(dataset.features["image"], Image) and dataset.features["image"].decode:
        return dataset.cast_column("image", Image(decode=False))
    return dataset


def make_loader(
    dataset: "Dataset",
    collate_fn: Callable[[list[dict[str, Any]]], Any],
    batch_size: int = 32,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    **kwargs: Any,
) -> "DataLoader":
    """A DataLoader over a loaded data set with a seeded generator (deterministic order and worker seeds).

    Images are decoded in the collator (in the workers), not by ``datasets``. With a GPU present,
    batches are pinned (page-locked), so that the loop's copy to the device does not block.

    Example:
        >>> loader = make_loader(load("openmoji"), CaptionCollator.from_model(m, train=True), 64, shuffle=True)
    """
    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator()
    generator.manual_seed(seed)
    if num_workers > 0:
        kwargs.setdefault("persistent_workers", False)
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    return DataLoader(
        undecoded(dataset), batch_size=batch_size, shuffle=shuffle, collate_fn=collate_fn,
        num_workers=num_workers, drop_last=drop_last, generator=generator, **kwargs,
    )


# ----------------------------------------------------------------------------- domain adaptation


class PairedLoader:
    """Labelled source batches and unlabelled target batches, together: ``{"source": ..., "target": ...}``.

    A plain iterable over two loaders, so a training loop can ``accelerator.prepare``
    each loader and pass the prepared ones here. An epoch lasts ``steps`` batches:
    "max" (default) the longer loader's length, cycling the shorter one; "min"
    the shorter's; "source"/"target" that loader's; or a number. Each epoch starts
    both loaders afresh. ``target=None`` pairs with nothing: batches are
    ``{"source": ...}`` alone (training on labelled sources only, e.g. domain
    generalisation), and an epoch is the source loader's length.

    Determinism: at every (re)start of a loader, its order is re-seeded from
    ``(seed, epoch, which loader, pass)``: through ``set_epoch`` when the loader
    has one (Accelerate's prepared loaders) or its ``generator`` (plain DataLoaders,
    e.g. from :func:`make_loader`). The epoch advances after each full pass;
    :meth:`set_epoch` sets it (e.g. on resume).

    Example:
        >>> pairs = PairedLoader(make_loader(src, LabelCollator(pre), 32, shuffle=True),
        ...                      make_loader(tgt, LabelCollator(pre, require_labels=False), 32, shuffle=True))
        >>> for batch in pairs:
        ...     batch["source"]["labels"], batch["target"]["pixel_values"]
    """

    def __init__(self, source: Iterable[Any], target: Iterable[Any] | None, steps: int | Literal["max", "min", "source", "target"] = "max",
                 seed: int = 0) -> None:
        self.source = source
        self.target = target
        if isinstance(steps, str) and steps not in ("max", "min", "source", "target"):
            raise DataError(f"steps must be a number of batches or one of max, min, source, target; got '{steps}'.")
        if isinstance(steps, int) and steps < 1:
            raise DataError(f"steps must be at least 1, got {steps}.")
        self.steps = steps
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        if isinstance(self.steps, int):
            return self.steps
        if self.target is None:
            if self.steps == "target":
                raise DataError("steps='target' needs a target loader; this PairedLoader has none.")
            return _length(self.source, "source")
        ns, nt = _length(self.source, "source"), _length(self.target, "target")
        return {"max": max(ns, nt), "min": min(ns, nt), "source": ns, "target": nt}[self.steps]

    def prepare_with(self, accelerator: Any) -> None:
        """Let ``accelerator`` shard the source and target loaders each on its own (the training loop calls this)."""
        if self.target is None:  # labelled sources only
            self.source = accelerator.prepare(self.source)
        else:
            self.source, self.target = accelerator.prepare(self.source, self.target)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))

    def _start(self, loader: Iterable[Any], role: str, epoch: int, pass_index: int) -> Iterator[Any]:
        seed = _stable_seed("paired", self.seed, role, epoch, pass_index) % (2**63)
        # Plain DataLoaders shuffle with their generator; Accelerate's keep it (or a seedable
        # sampler that set_epoch reseeds). Seeding every generator found gives the same order
        # in a straight run and after a resume, on every process.
        for generator in _generators(loader):
            generator.manual_seed(seed)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch * 100_003 + pass_index)  # type: ignore[attr-defined]
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        steps = len(self)
        loaders = {"source": self.source, "target": self.target}
        roles = [role for role in ("source", "target") if loaders[role] is not None]
        passes = {role: 0 for role in roles}
        iters = {role: self._start(loaders[role], role, epoch, 0) for role in roles}
        for _ in range(steps):
            batch = {}
            for role in roles:
                try:
                    batch[role] = next(iters[role])
                except StopIteration:
                    passes[role] += 1
                    iters[role] = self._start(loaders[role], role, epoch, passes[role])
                    try:
                        batch[role] = next(iters[role])
                    except StopIteration:
                        raise DataError(f"The {role} loader yields no batches (empty data set, or drop_last with fewer rows than a batch).") from None
            yield batch
        self.epoch = epoch + 1


def _generators(loader: Any) -> list[Any]:
    """The torch generators that decide a loader's order (its own, its sampler's, Accelerate's)."""
    import torch

    found: list[Any] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    base = getattr(loader, "base_dataloader", None)
    for owner in (loader, sampler, getattr(batch_sampler, "sampler", None), batch_sampler, base, getattr(base, "sampler", None)):
        for name in ("generator", "synchronized_generator"):
            gen = getattr(owner, name, None) if owner is not None else None
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
    return found


def _length(loader: Iterable[Any], role: str) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"The {role} loader has no length; pass steps=<number of batches per epoch>.") from None


# ----------------------------------------------------------------------------- retrieval


@dataclass
class RetrievalSet:
    """Images and all their captions, flattened for recall@K with several captions per image.

    ``caption_to_image[c]`` is the image (position in ``dataset``) that caption
    ``c`` describes; ``image_to_captions[i]`` lists the captions of image ``i``.
    Text->image recall@K: is ``caption_to_image[c]`` among the K nearest images.
    Image->text recall@K: is any of ``image_to_captions[i]`` among the K nearest captions.

    Shapes:
        captions: C strings; caption_to_image: (C,) int64; image_to_captions: N lists.
    """

    dataset: "Dataset"
    captions: list[str]
    caption_to_image: "torch.Tensor"
    image_to_captions: list[list[int]] = field(repr=False)

    @property
    def num_images(self) -> int:
        return len(self.image_to_captions)

    def image_loader(self, preprocessor: "ImagePreprocessor", batch_size: int = 64, num_workers: int = 0) -> "DataLoader":
        """Images in dataset order: batches of ``{"pixel_values": (B, 3, S, S), "image_index": (B,)}``."""
        return make_loader(self.dataset, ImageCollator(preprocessor), batch_size, shuffle=False, num_workers=num_workers)

    def caption_batches(self, batch_size: int = 256) -> Iterator[list[str]]:
        for start in range(0, len(self.captions), batch_size):
            yield self.captions[start : start + batch_size]


def retrieval_set(dataset: "Dataset") -> RetrievalSet:
    """Flatten a captioned data set: every caption, and which image it belongs to.

    Example:
        >>> rs = retrieval_set(load("openmoji", split="test"))
        >>> rs.caption_to_image.shape[0] == len(rs.captions)
        True
    """
    import torch

    if "captions" not in dataset.column_names:
        raise DataError(f"Retrieval needs a 'captions' column; this data set has {', '.join(dataset.column_names)}.")
    captions: list[str] = []
    owner: list[int] = []
    per_image: list[list[int]] = []
    for i, caps in enumerate(dataset.select_columns(["captions"]).to_dict()["captions"]):
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        if not caps:
            raise DataError(f"Row {i} has no caption; retrieval needs at least one per image (validate() lists such rows).")
        per_image.append(list(range(len(captions), len(captions) + len(caps))))
        captions.extend(caps)
        owner.extend([i] * len(caps))
    return RetrievalSet(dataset, captions, torch.tensor(owner, dtype=torch.long), per_image)
