"""Built-in set ``glyphs``: digits and letters drawn in many fonts, captioned with their names.

The emoji sets teach a model what things look like; they hold no digit or
letter shapes, so a model trained on them alone knows nothing that links the
word "seven" to a drawn 7. This set supplies that link from real typefaces:
every digit 0-9 and letter A-Z / a-z is drawn in each of the fonts that ship
with matplotlib (DejaVu Sans/Serif/Mono, STIX, Computer Modern; a dependency
already), in several deterministic views that vary the size, rotation,
offset, stroke weight, blur and colours, including digits over smooth colour
fields the way MNIST-M blends digits into photos. No handwriting is in it: a
model trained on it and tested on handwritten digits (``usps``, ``mnist_m``)
transfers from printed shapes and names only.

Splits by font, so held-out splits show typefaces never trained on:
``train`` (all but the validation and test fonts), ``validation`` and ``test``.
Digit classes are named like the digit sets' labels ("zero" ... "nine").
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DataConfig, DataError

if TYPE_CHECKING:
    from datasets import DatasetDict
    from PIL import Image

BUILDER_VERSION = 1
GLYPH_SPLITS = ("train", "validation", "test")
CANVAS = 64  # pixels; the encoders resize
VIEWS = {"train": 6, "validation": 2, "test": 2}
# Held-out typefaces (file stems in matplotlib's font folder); every other font trains.
VALIDATION_FONTS = ("DejaVuSansMono-Oblique", "STIXGeneralItalic", "cmss10")
TEST_FONTS = ("DejaVuSerif-Italic", "STIXGeneralBol", "cmtt10", "DejaVuSans-BoldOblique")
# Fonts of matplotlib's folder that draw no plain Latin digits and letters (symbols, sizes, fallbacks).
_SKIP = ("STIXNonUni", "STIXSiz", "cmex10", "cmsy10", "LastResort", "Display")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class GlyphClass:
    """One character class: the character, its label name and its captions."""

    char: str
    name: str
    captions: tuple[str, ...]


def glyph_classes() -> list[GlyphClass]:
    """Digits (named "zero".."nine", as the digit sets' labels), then capital and small letters.

    Example:
        >>> [c.name for c in glyph_classes()][:2], glyph_classes()[7].captions
        (['zero', 'one'], ('seven', 'the number seven', 'the digit 7'))
    """
    out = [GlyphClass(str(d), w, (w, f"the number {w}", f"the digit {d}")) for d, w in enumerate(DIGIT_WORDS)]
    for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        out.append(GlyphClass(c, f"capital letter {c}", (f"capital letter {c}", f"the uppercase letter {c}")))
    for c in "abcdefghijklmnopqrstuvwxyz":
        out.append(GlyphClass(c, f"small letter {c}", (f"small letter {c}", f"the lowercase letter {c}")))
    return out


def glyph_fonts() -> list[Path]:
    """The Latin text fonts that ship with matplotlib, sorted by name."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("The glyphs set draws with the fonts that ship with matplotlib: pip install matplotlib.") from None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    fonts = sorted(p for p in folder.glob("*.ttf") if not any(s in p.stem for s in _SKIP))
    if len(fonts) < len(VALIDATION_FONTS) + len(TEST_FONTS) + 2:
        raise DataError(f"matplotlib's font folder {folder} holds only {len(fonts)} text fonts; reinstall matplotlib.")
    return fonts


def split_of_font(font: Path) -> str:
    if font.stem in TEST_FONTS:
        return "test"
    if font.stem in VALIDATION_FONTS:
        return "validation"
    return "train"


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def render_glyph(char: str, font: Path, view: int, size: int = CANVAS) -> "Image.Image":
    """One deterministic view of ``char`` in ``font`` as an RGB ``size`` x ``size`` image.

    The ink is drawn with a random stroke weight and rotation, scaled to fill
    60-90% of the canvas, shifted a little and sometimes blurred; then coloured
    one of three ways: grey levels (white on black or black on white), two flat
    colours with noise, or the absolute difference between a smooth random
    colour field and the ink (as MNIST-M blends digits into photos).
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = _rng("mmtransfer-glyph", char, font.name, view)
    pil_font = ImageFont.truetype(str(font), rng.randint(36, 56))
    ink = Image.new("L", (2 * size, 2 * size), 0)
    stroke = rng.choice((0, 0, 1, 1, 2))
    ImageDraw.Draw(ink).text((size, size), char, font=pil_font, fill=255, anchor="mm", stroke_width=stroke, stroke_fill=255)
    ink = ink.rotate(rng.uniform(-15.0, 15.0), resample=Image.Resampling.BILINEAR)
    box = ink.getbbox()
    if box is None:
        raise DataError(f"The font {font} draws nothing for {char!r}.")
    ink = ink.crop(box)
    k = rng.uniform(0.6, 0.9) * size / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * k)), max(1, round(ink.height * k))), Image.Resampling.BILINEAR)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(ink, ((size - ink.width) // 2 + rng.randint(-4, 4), (size - ink.height) // 2 + rng.randint(-4, 4)))
    if rng.random() < 0.5:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    a = np.asarray(canvas, dtype=np.float32)[..., None] / 255  # (S, S, 1) ink coverage
    noise = np.random.default_rng(rng.randrange(2**32))
    style = rng.random()
    if style < 0.35:  # |colour field - ink|, the MNIST-M blend
        k = rng.choice((2, 4, 8))
        low = (noise.random((k, k, 3)) * 255).astype(np.uint8)
        field = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        field = field + noise.normal(0.0, rng.uniform(0.02, 0.12), field.shape)
        rgb = np.abs(np.clip(field, 0, 1) - a)
    elif style < 0.6:  # flat ink and background colours with noise
        ink_rgb, bg_rgb = noise.random(3), noise.random(3)
        rgb = a * ink_rgb + (1 - a) * bg_rgb + noise.normal(0.0, rng.uniform(0.0, 0.15), (size, size, 3))
    else:  # grey levels, mostly white on black like the digit sets
        grey = a if rng.random() < 0.7 else 1 - a
        rgb = np.repeat(grey, 3, axis=2)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _png(image: "Image.Image") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _build(fonts: list[Path], classes: list[GlyphClass], progress: bool | None) -> tuple["DatasetDict", dict[str, Any]]:
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

    from .finish import progress_bar

    columns: dict[str, dict[str, list[Any]]] = {s: {k: [] for k in ("image", "captions", "label", "font", "view")} for s in GLYPH_SPLITS}
    total = sum(VIEWS[split_of_font(f)] for f in fonts) * len(classes)
    bar = progress_bar(total, progress, "Rendering glyphs")
    for font in fonts:
        split = split_of_font(font)
        col = columns[split]
        for view in range(VIEWS[split]):
            for label, cls in enumerate(classes):
                col["image"].append({"bytes": _png(render_glyph(cls.char, font, view)), "path": None})
                col["captions"].append(list(cls.captions))
                col["label"].append(label)
                col["font"].append(font.stem)
                col["view"].append(view)
            if bar is not None:
                bar.update(len(classes))
    if bar is not None:
        bar.close()
    features = Features({
        "image": Image(),
        "captions": List(Value("string")),
        "label": ClassLabel(names=[c.name for c in classes]),
        "font": Value("string"),
        "view": Value("int8"),
        "domain": Value("string"),
        "image_id": Value("int64"),
    })
    parts, next_id = {}, 0
    for split in GLYPH_SPLITS:
        col = columns[split]
        n = len(col["label"])
        data = {**col, "domain": ["glyphs"] * n, "image_id": list(range(next_id, next_id + n))}
        next_id += n
        parts[split] = Dataset.from_dict(data, features=features)
    info = {"kind": "glyphs", "classes": len(classes), "fonts": {s: [f.stem for f in fonts if split_of_font(f) == s] for s in GLYPH_SPLITS},
            "rows": {s: len(d) for s, d in parts.items()}}
    return DatasetDict(parts), info


def build_glyph_set(config: DataConfig) -> tuple["DatasetDict", dict[str, Any]]:
    """The cached ``glyphs`` DatasetDict (rendered on first use) and its build info."""
    from importlib.metadata import version

    import PIL

    from .cache import cached_build, file_fingerprint
    from .config import cache_root

    fonts = glyph_fonts()
    classes = glyph_classes()
    inputs = {"builder": BUILDER_VERSION, "fonts": [file_fingerprint(f) for f in fonts], "views": VIEWS, "canvas": CANVAS,
              "validation_fonts": VALIDATION_FONTS, "test_fonts": TEST_FONTS, "classes": [c.char for c in classes],
              "pillow": PIL.__version__, "matplotlib": version("matplotlib")}
    return cached_build(cache_root(config), "glyphs", inputs, lambda: _build(fonts, classes, config.progress))
