"""mmtransfer: move knowledge between text and images.

Public API::

    import mmtransfer
    model = mmtransfer.create_model("minilm-l6-efficientnet-lite0")   # real packaged weights, offline
    emb = model.encode_text(["a photo of a cat"])                      # (1, 256)
    model.save_pretrained("my-model"); model = mmtransfer.load("my-model")

Importing this package is light: torch, transformers and timm are imported
only when a model is built or loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError, FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from .registry import DEFAULT_PRESET, ModelFileError, UnknownModelError, describe_models, list_models

if TYPE_CHECKING:
    from .models.factory import create_model, ensemble, load
    from .models.multimodal import MultimodalModel
    from .transfer import zero_shot_classifier

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET",
    "ConfigError",
    "FusionConfig",
    "ImageEncoderConfig",
    "ModelConfig",
    "ModelFileError",
    "MultimodalModel",
    "TextEncoderConfig",
    "UnknownModelError",
    "create_model",
    "describe_models",
    "ensemble",
    "list_models",
    "load",
    "zero_shot_classifier",
]

# Built on first use, so that importing the package does not import torch.
_LAZY = {
    "MultimodalModel": "mmtransfer.models.multimodal",
    "create_model": "mmtransfer.models.factory",
    "ensemble": "mmtransfer.models.factory",
    "load": "mmtransfer.models.factory",
    "zero_shot_classifier": "mmtransfer.transfer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmtransfer' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
