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
from .registry import DEFAULT_PRESET, UnknownModelError, describe_models, list_models

if TYPE_CHECKING:
    from .models.multimodal import MultimodalModel

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET",
    "ConfigError",
    "FusionConfig",
    "ImageEncoderConfig",
    "ModelConfig",
    "MultimodalModel",
    "TextEncoderConfig",
    "UnknownModelError",
    "create_model",
    "describe_models",
    "list_models",
    "load",
]


def create_model(name_or_config: "str | ModelConfig | dict[str, Any]" = DEFAULT_PRESET, pretrained: bool = True) -> "MultimodalModel":
    """Build a :class:`MultimodalModel` from a preset name or a configuration.

    Args:
        name_or_config: a preset from :func:`list_models`, a :class:`ModelConfig`,
            or a mapping of its fields.
        pretrained: load the towers' pretrained weights (False: random weights).

    Example:
        >>> model = create_model("tiny-random")
        >>> model.encode_text(["a red apple"]).shape
        torch.Size([1, 32])
    """
    from .config import from_dict
    from .models.multimodal import MultimodalModel
    from .registry import get_preset

    if isinstance(name_or_config, str):
        config = get_preset(name_or_config)
    elif isinstance(name_or_config, dict):
        config = from_dict(ModelConfig, name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        config = name_or_config
    else:
        raise TypeError(f"create_model takes a preset name, a ModelConfig or a dict, not {type(name_or_config).__name__}.")
    return MultimodalModel.from_config(config, pretrained=pretrained)


def load(directory: str, map_location: str = "cpu") -> "MultimodalModel":
    """Load a model saved with ``save_pretrained`` (alias of ``MultimodalModel.from_pretrained``)."""
    from .models.multimodal import MultimodalModel

    return MultimodalModel.from_pretrained(directory, map_location=map_location)


def __getattr__(name: str) -> Any:
    if name == "MultimodalModel":
        from .models.multimodal import MultimodalModel

        return MultimodalModel
    raise AttributeError(f"module 'mmtransfer' has no attribute '{name}'")
