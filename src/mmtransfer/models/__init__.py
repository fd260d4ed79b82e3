"""Model parts: text and image towers, fusion, the multimodal model and its outputs."""

from .image import ImageEncoder
from .multimodal import MultimodalModel
from .outputs import FusionOutput, ImageEncoderOutput, MultimodalOutput, TextEncoderOutput
from .text import TextEncoder

__all__ = [
    "FusionOutput",
    "ImageEncoder",
    "ImageEncoderOutput",
    "MultimodalModel",
    "MultimodalOutput",
    "TextEncoder",
    "TextEncoderOutput",
]
