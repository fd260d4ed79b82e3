"""A LeNet-style CNN for small images (digits), trained from scratch.

    pixels (B, 3, S, S) -> [colour: rgb | gray] -> [input_norm] -> (conv 5x5 -> [BN] -> ReLU -> maxpool 2) x L
    -> flatten -> pooled features (B, C_L * s * s)

Colour handling and per-image normalisation live inside the network, as
parameter-free layers, so the standard :class:`ImagePreprocessor` (resize and a
fixed mean/std) stays the only preprocessing and the model is self-contained
when saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import DROPOUT, at_least, check_ranges
from .preprocess import PreprocessConfig

# ITU-R BT.601 luma weights: RGB -> gray.
_LUMA = (0.299, 0.587, 0.114)


@dataclass
class LeNetConfig:
    """A small CNN and the preprocessing of its input."""

    # Output channels of each 5x5 convolution, each followed by 2x2 max pooling.
    # [20, 50] is Transfer-Learning-Library's LeNet; the DANN paper's MNIST-M net is [32, 48].
    channels: list[int] = field(default_factory=lambda: [20, 50])
    # Convolution kernel side (no padding).
    kernel_size: int = 5
    # Batch norm after every convolution.
    batch_norm: bool = False
    # Channel dropout (Dropout2d) before the last pooling, as in Transfer-Learning-Library's LeNet.
    dropout: float = 0.0
    # A fully connected layer after the convolutions (Linear -> ReLU -> Dropout at `dropout`),
    # as in Transfer-Learning-Library's LeNet (500); 0: the flattened maps are the features.
    fc_dim: int = 0
    # Input colour: "rgb" keeps three channels; "gray" converts to luminance first
    # (one channel; removes colour differences between domains).
    color: Literal["rgb", "gray"] = "rgb"
    # Normalisation of each image inside the network: "none" keeps the preprocessor's
    # fixed mean/std; "image" standardises each image over all its pixels and channels;
    # "channel" standardises each channel of each image (also removes colour casts).
    input_norm: Literal["none", "image", "channel"] = "none"
    # Input side in pixels (digits are resized to it).
    image_size: int = 28
    # Per-channel mean and std applied by the preprocessor after scaling to [0, 1].
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        check_ranges(self, channels=at_least(1), kernel_size=at_least(1), dropout=DROPOUT, fc_dim=at_least(0),
                     image_size=at_least(1))

    def preprocess_config(self) -> PreprocessConfig:
        """Resize to ``image_size`` (no crop: digits fill the frame), then the fixed mean/std."""
        return PreprocessConfig(image_size=self.image_size, crop_pct=1.0, interpolation="bilinear",
                                mean=tuple(self.mean), std=tuple(self.std), background=(0, 0, 0))


class LeNet(nn.Module):
    """LeNet-style feature extractor: convolutions and pooling, flattened.

    Args:
        config: layers, colour handling and input normalisation.

    Shapes:
        (B, 3, S, S) -> (B, width), width = fc_dim, or channels[-1] * s^2 with s the final map side
        (S = 28 and two 5x5 layers: 28 -> 24 -> 12 -> 8 -> 4, so s = 4 and width = 50 * 16 = 800).

    Example:
        >>> net = LeNet(LeNetConfig(channels=[20, 50], image_size=28))
        >>> net(torch.zeros(2, 3, 28, 28)).shape, net.width
        (torch.Size([2, 800]), 800)
    """

    is_pretrained_tower = False

    def __init__(self, config: LeNetConfig) -> None:
        super().__init__()
        if not config.channels:
            raise ValueError("lenet.channels needs at least one convolution width, e.g. [32, 64].")
        self.config = config
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        layers: list[nn.Module] = []
        c_in = 1 if config.color == "gray" else 3
        side = config.image_size
        for i, c_out in enumerate(config.channels):
            layers.append(nn.Conv2d(c_in, c_out, config.kernel_size))
            side = side - config.kernel_size + 1
            if config.batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            if config.dropout > 0 and i == len(config.channels) - 1:
                layers.append(nn.Dropout2d(config.dropout))
            layers += [nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            side //= 2
            c_in = c_out
            if side < 1:
                raise ValueError(
                    f"lenet: {len(config.channels)} layers of {config.kernel_size}x{config.kernel_size} convolutions and "
                    f"pooling shrink a {config.image_size} px image to nothing; use fewer layers or a larger image_size."
                )
        self.width = c_in * side * side
        if config.fc_dim:
            layers += [nn.Flatten(1), nn.Linear(self.width, config.fc_dim), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
            self.width = config.fc_dim
        self.features = nn.Sequential(*layers)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Colour conversion and per-image normalisation: (B, 3, S, S) -> (B, 1 or 3, S, S)."""
        x = pixels
        if self.config.color == "gray":
            x = (x * self.luma.to(x.dtype)).sum(1, keepdim=True)  # (B, 3, S, S) -> (B, 1, S, S)
        if self.config.input_norm == "image":
            dims = (1, 2, 3)
        elif self.config.input_norm == "channel":
            dims = (2, 3)
        else:
            return x
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True)
        return (x - mean) / (std + 1e-5)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"LeNet takes pixels of shape (B, 3, S, S); got {tuple(pixels.shape)}.")
        x = self.features(self.prepare(pixels))  # (B, C, s, s), or (B, fc_dim)
        return x.flatten(1)  # (B, width)
