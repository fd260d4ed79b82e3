"""Opening images safely: every failure becomes one sentence naming the file.

PIL's decompression-bomb *warning* (an image above ``PIL.Image.MAX_IMAGE_PIXELS``)
is treated as an error here, locally, without changing PIL's global limit.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import TYPE_CHECKING, Any, Literal

from .config import DataError

if TYPE_CHECKING:
    from PIL import Image

# datasets' Image feature stores {"path": ..., "bytes": ...}; a path string or raw bytes also work.
ImageSource = Any


def describe_source(source: ImageSource) -> str:
    """A short name of an image source for messages: its path, or "<N bytes in the data set>"."""
    if isinstance(source, dict):
        if source.get("path"):
            return str(source["path"])
        data = source.get("bytes")
        return f"<{len(data) if data is not None else 0} bytes in the data set>"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _open(source: ImageSource) -> "Image.Image":
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        data = source.get("bytes")
        if data is not None:
            if len(data) == 0:
                raise _Bad("the image is empty (0 bytes)")
            return Image.open(io.BytesIO(data))
        source = source.get("path")
        if source is None:
            raise _Bad("the row holds neither image bytes nor a path")
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise _Bad("the image is empty (0 bytes)")
        return Image.open(io.BytesIO(source))
    path = os.fspath(source)
    if not os.path.exists(path):
        raise _Bad("the file does not exist")
    if os.path.isdir(path):
        raise _Bad("this is a folder, not an image file")
    if os.path.getsize(path) == 0:
        raise _Bad("the file is empty (0 bytes)")
    return Image.open(path)


class _Bad(Exception):
    """Internal: a reason an image cannot be used."""


def _bomb_reason(err: Exception) -> str:
    from PIL import Image

    return (
        f"the image is too large to open safely ({err}). PIL refuses images above "
        f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS:,} pixels as possible decompression bombs; "
        "if the file is genuine, downscale it before using it"
    )


def load_image(source: ImageSource, verify: Literal["full", "header"] = "full") -> "Image.Image":
    """Open an image and check it, raising ``_Bad`` with a reason a person can act on.

    ``full`` decodes every pixel and converts it with :func:`to_rgb` (returning RGB);
    ``header`` only opens it (returning the lazily decoded image).
    """
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Only inside this block: PIL's global MAX_IMAGE_PIXELS and warning filters stay as they are.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = _open(source)
            if image.width <= 0 or image.height <= 0:
                raise _Bad(f"the image has no pixels ({image.width}x{image.height})")
            if verify == "header":
                return image
            image.load()
            from ..models.preprocess import to_rgb

            return to_rgb(image)
        except _Bad:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise _Bad(_bomb_reason(err)) from None
        except UnidentifiedImageError:
            raise _Bad("PIL cannot identify it as an image (not an image file, or its header is corrupt)") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as err:
            text = str(err) or type(err).__name__
            if "truncated" in text or isinstance(err, EOFError):
                raise _Bad(f"the image is truncated or corrupt ({text}); re-export or re-download it") from None
            raise _Bad(f"the image cannot be decoded ({type(err).__name__}: {text})") from None


def image_problem(source: ImageSource, verify: Literal["full", "header"] = "full") -> str | None:
    """Why ``source`` cannot be used as an image, or None when it can.

    Example:
        >>> image_problem(b"")
        'the image is empty (0 bytes)'
    """
    try:
        load_image(source, verify)
    except _Bad as bad:
        return str(bad)
    return None


def open_image(source: ImageSource, where: str | None = None) -> "Image.Image":
    """Open, fully decode and convert an image to RGB, or raise :class:`DataError` naming it.

    Args:
        source: a path, raw bytes, a ``{"path", "bytes"}`` dict as stored by the
            ``datasets`` Image feature, or a PIL image.
        where: the row it comes from, for the message (e.g. ``"row 17"``).

    Example:
        >>> from PIL import Image
        >>> open_image(Image.new("LA", (4, 4))).mode
        'RGB'
    """
    try:
        return load_image(source, "full")
    except _Bad as bad:
        place = f"{where}: " if where else ""
        raise DataError(
            f"{place}image {describe_source(source)}: {bad}. "
            "Fix or remove it (python scripts/validate_data.py <data> lists every bad sample), "
            "or load the data with on_bad_sample='skip' and verify='full' to leave such images out before training."
        ) from None
