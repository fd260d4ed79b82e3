"""Language -> vision transfer: zero-shot classifiers, text-initialised heads, WiSE-FT.

A class is described by its name; a prompt ensemble embeds the name in the
shared space, and an image is classified by its nearest class embedding.
The same class embeddings initialise a linear head that can then be
fine-tuned (linear probe, full fine-tuning, LP-FT), and WiSE-FT interpolates
between the zero-shot and the fine-tuned weights.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

# A compact, general ensemble (after CLIP's ImageNet prompts): plain name, photo, icon and drawing styles.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo of {}.",
    "a picture of {}.",
    "an icon of {}.",
    "a drawing of {}.",
    "an emoji of {}.",
    "a close-up photo of {}.",
    "a rendering of {}.",
)


@torch.no_grad()
def class_embeddings(
    model: Any, class_names: Sequence[str], templates: Sequence[str] | None = None, batch_size: int = 512
) -> torch.Tensor:
    """Normalised prompt-ensemble embedding of each class name.

    Every template is filled with the name, embedded and normalised; the
    per-class mean is normalised again (CLIP's ensembling).

    Shapes:
        -> (C, E) for C class names.

    Example:
        >>> w = class_embeddings(model, ["cat", "dog"], ["a photo of a {}."])
        >>> w.shape
        torch.Size([2, 256])
    """
    templates = list(templates or DEFAULT_TEMPLATES)
    if not class_names:
        raise ValueError("class_names is empty: give at least one class name.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"Every template needs a '{{}}' where the class name goes; these have none: {bad}.")
    prompts = [t.format(name) for name in class_names for t in templates]  # C * K
    was_training = model.training
    model.eval()
    chunks = [model.encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    model.train(was_training)
    emb = torch.cat(chunks).view(len(class_names), len(templates), -1)  # (C, K, E)
    return F.normalize(emb.mean(1), dim=-1)  # (C, E)


@torch.no_grad()
def hub_penalty(class_emb: torch.Tensor, reference: torch.Tensor, k: int = 10) -> torch.Tensor:
    """How strongly each class attracts images at large: the mean of its k highest cosines to reference images.

    In a shared space some class embeddings are hubs, near many images, and take
    the predictions of classes that no image reaches; subtracting a share of this
    score from every class (CSLS, Conneau et al. 2018) evens them out. The
    reference images are ones the model was trained on (not the test images), so
    the classifier stays inductive.

    Shapes:
        class_emb (C, E), reference (N, E) (both normalised) -> (C,)
    """
    if k < 1:
        raise ValueError(f"hub_k must be at least 1, got {k}.")
    if reference.ndim != 2 or reference.shape[1] != class_emb.shape[1] or len(reference) == 0:
        raise ValueError(f"The hub reference must be (N, {class_emb.shape[1]}) image embeddings with N > 0; got {tuple(reference.shape)}.")
    k = min(k, len(reference))
    sims = reference.to(class_emb) @ class_emb.T  # (N, C)
    return sims.topk(k, dim=0).values.mean(0)  # (C,)


class LinearHead(nn.Module):
    """A linear classifier over shared-space embeddings: logits = scale * z W^T + b.

    The rows of ``W`` start at unit length (class-name embeddings, or random
    directions) and ``scale`` is a fixed buffer (the model's logit scale) that
    sets the range of the logits. A text-initialised head and a random one
    therefore take optimizer steps of the same relative size and differ only in
    where they start; folding the scale into ``W`` instead would make a
    text-initialised head ~100x longer than a random one and all but freeze it
    under Adam.

    Shapes:
        (B, E) -> (B, C)
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone() if bias is not None else torch.zeros(weight.shape[0]))
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def from_text(cls, model: Any, class_names: Sequence[str], templates: Sequence[str] | None = None,
                  reference: torch.Tensor | None = None, hub_k: int = 10, hub_weight: float = 0.25) -> "LinearHead":
        """Rows = class-name embeddings, scale = the model's logit scale: the zero-shot classifier as a trainable head.

        With ``reference`` image embeddings (N, E), the bias subtracts ``hub_weight``
        times each class's :func:`hub_penalty` (in cosine units, times the scale).
        """
        weight = class_embeddings(model, class_names, templates)  # (C, E)
        scale = float(model.get_logit_scale().detach())
        bias = None if reference is None or hub_weight == 0 else -scale * hub_weight * hub_penalty(weight, reference, hub_k)
        return cls(weight, bias, scale=scale)

    @classmethod
    def random(cls, num_classes: int, dim: int, seed: int = 0, scale: float = 1.0) -> "LinearHead":
        """Random unit-length rows (the baseline for text initialisation), with the same ``scale``."""
        g = torch.Generator().manual_seed(seed)
        return cls(F.normalize(torch.randn(num_classes, dim, generator=g), dim=-1), scale=scale)  # (C, E)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(z, self.weight) + self.bias  # (B, C)


class ImageClassifier(nn.Module):
    """Image tower -> shared-space projection -> (normalised) -> linear head.

    With the text-initialised head this is exactly the zero-shot classifier,
    and every part can then be trained.

    Args:
        model: a :class:`~mmtransfer.MultimodalModel` (only its image side is kept).
        head: the classifier over (B, E) embeddings.
        class_names: names of the C classes, in head order.

    Shapes:
        pixel_values (B, 3, S, S) or a list of PIL images -> logits (B, C).
    """

    def __init__(self, model: Any, head: LinearHead, class_names: Sequence[str]) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.image_projection = model.image_projection
        self.head = head
        self.class_names = list(class_names)

    @property
    def preprocessor(self) -> Any:
        return self.image_encoder.preprocessor

    def embed(self, pixel_values: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) normalised embeddings, from pixels or from cached pooled tower features (B, Di)."""
        if pooled is None:
            pooled = self.image_encoder(pixel_values).pooled  # (B, Di)
        return F.normalize(self.image_projection(pooled), dim=-1)  # (B, E)

    def forward(self, images: Any) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            images = self.preprocessor(images).to(self.head.weight.device)
        return self.head(self.embed(images))  # (B, C)

    @torch.no_grad()
    def predict(self, images: Any) -> list[str]:
        """Class names of the most likely classes."""
        return [self.class_names[i] for i in self(images).argmax(-1).tolist()]


def zero_shot_classifier(model: Any, class_names: Sequence[str], templates: Sequence[str] | None = None,
                         reference: torch.Tensor | None = None, hub_k: int = 10, hub_weight: float = 0.25) -> ImageClassifier:
    """A classifier over ``class_names`` built from text alone: the prompt ensemble of each name in the shared space.

    Returns an :class:`ImageClassifier` mapping pixel tensors or PIL images to (B, C)
    logits; ``.predict(images)`` gives names. With ``reference`` ((N, E) normalised
    image embeddings, e.g. of the caption training images), class names that lie near
    many images are marked down by ``hub_weight`` times their :func:`hub_penalty`.

    Example:
        >>> clf = mmtransfer.zero_shot_classifier(model, ["cat", "dog"], ["a photo of a {}."])
        >>> clf.predict([image])
        ['cat']
    """
    head = LinearHead.from_text(model, class_names, templates, reference, hub_k, hub_weight)
    return ImageClassifier(model, head, class_names)


def wise_ft(zero_shot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: (1 - alpha) * zero-shot + alpha * fine-tuned, for every floating-point tensor.

    alpha = 0 gives the zero-shot weights, 1 the fine-tuned ones. Integer
    buffers (e.g. batch-norm counters) are taken from the fine-tuned model.

    Example:
        >>> wise_ft({"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.25)["w"]
        tensor([0.2500, 0.2500])
    """
    if zero_shot.keys() != finetuned.keys():
        missing = sorted(set(zero_shot) ^ set(finetuned))[:5]
        raise ValueError(f"WiSE-FT needs two state dicts of the same model; keys differ: {missing}.")
    out = {}
    for k, ft in finetuned.items():
        zs = zero_shot[k]
        out[k] = torch.lerp(zs.float(), ft.float(), alpha).to(ft.dtype) if ft.is_floating_point() else ft.clone()
    return out


def interpolated(classifier: ImageClassifier, zero_shot: dict[str, torch.Tensor], alpha: float) -> ImageClassifier:
    """A copy of ``classifier`` with WiSE-FT weights at mixing coefficient ``alpha``."""
    out = copy.deepcopy(classifier)
    out.load_state_dict(wise_ft(zero_shot, classifier.state_dict(), alpha))
    return out


@dataclass
class ClassSet:
    """Class names and where the data's label ids go.

    Shapes:
        lookup: (L,) for the data set's L label ids: position among ``names``, or -1.
    """

    names: list[str]
    lookup: torch.Tensor

    @classmethod
    def present(cls, datasets: Sequence[Any], what: str) -> "ClassSet":
        """The classes that occur in ``datasets`` (sorted by label id), named by the first one's ClassLabel."""
        feature = datasets[0].features.get("label")
        all_names = list(getattr(feature, "names", None) or [])
        if not all_names:
            raise ConfigError(f"The {what} data has no class names (a ClassLabel 'label' column); labels and zero-shot need them.")
        ids = sorted(set().union(*(set(_labels(d, what).tolist()) for d in datasets)))
        lookup = torch.full((len(all_names),), -1, dtype=torch.long)
        lookup[torch.tensor(ids)] = torch.arange(len(ids))
        return cls([all_names[i] for i in ids], lookup)

    def prompts(self, templates: Sequence[str]) -> list[str]:
        return [t.format(name) for name in self.names for t in templates]


def name_embeddings(model: Any, names: Sequence[str], templates: Sequence[str],
                    text_cache: Any = None, text_rows: dict[str, int] | None = None) -> torch.Tensor:
    """Normalised prompt-ensemble embedding of each class name, in the model's shared space.

    From cached text features of the filled templates when given (frozen text
    tower), else through :func:`mmtransfer.transfer.class_embeddings`.

    Shapes:
        -> (C, E) for C names.
    """
    from .transfer import class_embeddings

    if text_cache is None:
        return class_embeddings(model, names, templates)
    prompts = [t.format(n) for n in names for t in templates]
    rows = torch.tensor([text_rows[p] for p in prompts])  # (C*K,)
    z = model.project_text(text_cache.pooled[rows].to(model.device))  # (C*K, E)
    return F.normalize(z.view(len(names), len(templates), -1).mean(1), dim=-1)  # (C, E)


@torch.no_grad()
def classify_split(model: Any, loader: Any, labels: torch.Tensor, classifiers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
                   accelerator: Any = None) -> dict[str, float]:
    """Top-1/top-5 (%) of each classifier over the embedded images of ``loader``.

    Rows whose label is -1 (a class the classifiers do not cover) are left out.

    Args:
        loader: image batches with ``image_index`` (cached ``image_pooled`` or ``pixel_values``).
        labels: (N,) class position of each image_index, or -1.
        classifiers: name -> fn mapping (N, E) embeddings to (N, C) logits.
    """
    from .evaluate import embed_all
    from .objectives.captions import image_features

    z, idx = embed_all(loader, lambda b: model.project_image(image_features(model, b).pooled), accelerator)  # (N, E), (N,)
    y = labels[idx]
    keep = y >= 0
    z, y = z[keep], y[keep]
    out: dict[str, float] = {}
    for name, fn in classifiers.items():
        logits = fn(z.to(model.device)).float().cpu()  # (N, C)
        k = min(5, logits.shape[1])
        out[f"{name}top1"] = 100.0 * float((logits.argmax(1) == y).float().mean())
        out[f"{name}top{k}"] = 100.0 * float((logits.topk(k, dim=1).indices == y[:, None]).any(1).float().mean())
    return out

HEAD_WEIGHTS = "label_head.safetensors"

HEAD_CONFIG = "label_head.json"


def save_label_head(head: nn.Module, class_names: Sequence[str], folder: str | Path) -> None:
    """Write the label head beside a saved model: ``label_head.safetensors`` and ``label_head.json`` (class names)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu().contiguous()},
              str(folder / HEAD_WEIGHTS))
    (folder / HEAD_CONFIG).write_text(json.dumps({"class_names": list(class_names)}, indent=2))


def load_classifier(folder: str | Path) -> Any:
    """A model folder written by a multi-task run with a label head, as an image classifier.

    Returns a :class:`~mmtransfer.transfer.ImageClassifier`: images (PIL or a pixel
    tensor) -> (B, C) logits over the trained classes; ``.predict(images)`` gives names.

    Example:
        >>> clf = load_classifier("runs/multitask_openmoji/model")
        >>> clf.predict([Image.open("emoji.png")])   # from PIL import Image
        ['grinning face']
    """
    from safetensors.torch import load_file

    from .models.factory import load
    from .transfer import ImageClassifier, LinearHead

    folder = Path(folder)
    if not (folder / HEAD_WEIGHTS).is_file():
        raise FileNotFoundError(f"'{folder}' has no {HEAD_WEIGHTS}: train a multi-task run with tasks.labels.enabled=true, "
                                "or load the model alone with mmtransfer.load.")
    model = load(folder)
    weights = load_file(str(folder / HEAD_WEIGHTS))
    names = json.loads((folder / HEAD_CONFIG).read_text())["class_names"]
    return ImageClassifier(model, LinearHead(weights["weight"], weights["bias"]), names).eval()


def _labels(dataset: Any, what: str) -> torch.Tensor:
    if "label" not in dataset.column_names:
        raise ConfigError(f"The {what} data has no 'label' column (columns: {', '.join(dataset.column_names)}); it must be labelled.")
    return torch.tensor(dataset.select_columns(["label"])["label"], dtype=torch.long)
