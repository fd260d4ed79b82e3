"""A backbone image classifier: a LeNet or any timm / torchvision backbone, a bottleneck and a linear head.

Saved and loaded like the multimodal model (``save_pretrained`` / ``mmtransfer.load``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DROPOUT, ImageEncoderConfig, at_least, check_ranges, to_dict
from .lenet import LeNet, LeNetConfig
from .preprocess import ImagePreprocessor


@dataclass
class ClassifierConfig:
    """An image classifier: backbone -> pooled features -> bottleneck -> linear head."""

    # "lenet" (a small CNN trained from scratch, for digits), or an image encoder: any
    # timm name, a packaged alias (efficientnet-lite0) or torchvision:resnet50.
    backbone: str = "lenet"
    # The LeNet's layers, colour handling and input preprocessing (backbone "lenet").
    lenet: LeNetConfig = field(default_factory=LeNetConfig)
    # Image encoders: load pretrained weights (trained at optim.tower_lr).
    pretrained: bool = True
    # Image encoders: input side in pixels (None: the weights' own).
    image_size: int | None = None
    # Image encoders: extra keyword arguments for timm.create_model.
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Width of the bottleneck (Linear -> [BatchNorm] -> ReLU -> Dropout) between the
    # pooled features and the head; the domain losses act on its output. 0: no bottleneck.
    bottleneck_dim: int = 500
    # Batch norm in the bottleneck.
    bottleneck_batch_norm: bool = False
    # Dropout after the bottleneck.
    dropout: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(self, image_size=at_least(1), bottleneck_dim=at_least(0), dropout=DROPOUT)


@dataclass
class ClassifierOutput:
    """One pass of :class:`BackboneClassifier`.

    Shapes:
        pooled: (B, D) backbone features; features: (B, F) the head's input
        (bottleneck output, or ``pooled`` without a bottleneck); logits: (B, C).
    """

    pooled: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


class _EncoderPooled(nn.Module):
    """An :class:`ImageEncoder` reduced to its pooled vector (B, D)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.width = encoder.width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).pooled  # (B, D)


class BackboneClassifier(nn.Module):
    """Backbone -> pooled features -> bottleneck -> linear head.

    Args:
        config: backbone and head.
        num_classes: C.
        class_names: the names of the C classes (saved with the model).

    Shapes:
        (B, 3, S, S) -> :class:`ClassifierOutput` with logits (B, C).

    Example:
        >>> clf = BackboneClassifier(ClassifierConfig(), num_classes=10)
        >>> clf(torch.zeros(2, 3, 32, 32)).logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, config: ClassifierConfig, num_classes: int, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        if config.backbone == "lenet":
            self.backbone: nn.Module = LeNet(config.lenet)
            self.preprocess = config.lenet.preprocess_config()
        else:
            from .image import ImageEncoder

            enc = ImageEncoder.from_config(ImageEncoderConfig(
                name=config.backbone, pretrained=config.pretrained, image_size=config.image_size, model_kwargs=dict(config.model_kwargs)))
            self.backbone = _EncoderPooled(enc)
            self.preprocess = enc.preprocessor.config
        width = int(self.backbone.width)
        if config.bottleneck_dim > 0:
            layers: list[nn.Module] = [nn.Linear(width, config.bottleneck_dim)]
            if config.bottleneck_batch_norm:
                layers.append(nn.BatchNorm1d(config.bottleneck_dim))
            layers.append(nn.ReLU(inplace=True))
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            self.bottleneck: nn.Module = nn.Sequential(*layers)
            width = config.bottleneck_dim
        else:
            self.bottleneck = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.features_dim = width
        self.head = nn.Linear(width, num_classes)
        self.num_classes = num_classes

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return ImagePreprocessor(self.preprocess)

    def forward(self, pixel_values: torch.Tensor) -> ClassifierOutput:
        pooled = self.backbone(pixel_values)  # (B, D)
        features = self.bottleneck(pooled)  # (B, F)
        return ClassifierOutput(pooled=pooled, features=features, logits=self.head(features))  # logits (B, C)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``classifier.json`` (config, class names) and ``model.safetensors``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {"model_type": "mmtransfer-image-classifier", "config": to_dict(self.config),
                "num_classes": self.num_classes, "class_names": self.class_names}
        (directory / "classifier.json").write_text(json.dumps(meta, indent=2))
        save_model(self, str(directory / "model.safetensors"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "BackboneClassifier":
        """Load a classifier written by :meth:`save_pretrained` (image encoders are rebuilt without downloading)."""
        from ..config import from_dict
        from .files import load_weights, read_json

        directory = Path(directory)
        path = directory / "classifier.json"
        if not path.is_file():
            raise FileNotFoundError(f"'{directory}' holds no saved image classifier (no classifier.json); train one with scripts/domain_adapt.py.")
        meta = read_json(path)
        config = from_dict(ClassifierConfig, {**meta["config"], "pretrained": False})
        model = cls(config, meta["num_classes"], meta["class_names"])
        load_weights(model, directory / "model.safetensors")
        return model.eval()
