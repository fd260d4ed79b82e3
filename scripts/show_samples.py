"""Write a montage PNG of a data set's samples with their captions underneath, for a person to look at.

Usage:
    python scripts/show_samples.py openmoji --split test --out samples.png
    python scripts/show_samples.py noto-emoji --split unseen --out noto.png --n 48 --cols 8
    python scripts/show_samples.py path/to/images --out mine.png caption_column=text

Extra ``key=value`` arguments are :class:`mmtransfer.data.DataConfig` options.
"""

from __future__ import annotations

import argparse
import random
import sys
import textwrap
from typing import Any

from mmtransfer.cli import parse_options
from mmtransfer.config import ConfigError
from mmtransfer.data import DataError, load


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:  # DejaVu (shipped with matplotlib) covers accents and most scripts in names
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans", fallback_to_default=True), size)
    except Exception:  # noqa: BLE001 - any font will do for a preview
        return ImageFont.load_default(size=size)


def montage(rows: list[dict[str, Any]], label_names: list[str] | None, cols: int, tile: int = 160) -> Any:
    """Tiles of ``tile`` px with up to three lines of caption under each."""
    from PIL import Image, ImageDraw

    from mmtransfer.data import open_image

    font = _font(12)
    line_h = 15
    text_h = 3 * line_h + 6
    n = len(rows)
    grid_rows = (n + cols - 1) // cols
    pad = 6
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, grid_rows * (tile + text_h + pad) + pad), (200, 200, 200))
    draw = ImageDraw.Draw(sheet)
    for k, row in enumerate(rows):
        image = open_image(row["image"])
        scale = tile / max(image.size)
        # Small images (digits) are enlarged without blurring, large ones shrunk smoothly.
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
        x = pad + (k % cols) * (tile + pad)
        y = pad + (k // cols) * (tile + text_h + pad)
        sheet.paste((255, 255, 255), (x, y, x + tile, y + tile + text_h))
        sheet.paste(image, (x + (tile - image.width) // 2, y + (tile - image.height) // 2))
        captions = row.get("captions") or []
        text = captions[0] if captions else ""
        if len(captions) > 1:
            text += f" (+{len(captions) - 1})"
        if label_names is not None and row.get("label") is not None and row["label"] >= 0:
            name = label_names[row["label"]]
            if name != (captions[0] if captions else None):
                text = f"[{name}] {text}"
        lines = textwrap.wrap(text, width=24)[:3] or [""]
        for j, line in enumerate(lines):
            draw.text((x + 3, y + tile + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a built-in set (openmoji, noto-emoji, mnist5k, usps, mnist_m) or a path")
    parser.add_argument("--split", default=None, help="split to show (default: the source's default)")
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--n", type=int, default=36, help="number of samples")
    parser.add_argument("--cols", type=int, default=6, help="tiles per row")
    parser.add_argument("--seed", type=int, default=0, help="which samples (a random but repeatable choice)")
    parser.add_argument("options", nargs="*", help="DataConfig options as key=value")
    args = parser.parse_args(argv)
    try:
        ds = load(args.name, split=args.split, **parse_options(args.options))
    except (DataError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from datasets import ClassLabel, Image

    ds = ds.cast_column("image", Image(decode=False))
    picks = sorted(random.Random(args.seed).sample(range(len(ds)), min(args.n, len(ds))))
    label = ds.features.get("label")
    names = label.names if isinstance(label, ClassLabel) else None
    sheet = montage([ds[i] for i in picks], names, args.cols)
    sheet.save(args.out)
    print(f"wrote {args.out}: {len(picks)} of {len(ds)} samples of '{args.name}'" + (f" [{args.split}]" if args.split else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
