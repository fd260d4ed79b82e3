"""Small own-data folders of real images (coloured shapes), laid out the way users lay out theirs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: tuple[int, int, int], rng: random.Random, background: tuple[int, int, int] = (255, 255, 255),
               size: int = 64) -> Image.Image:
    """One shape of random position and size on a plain background."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 8, size // 4)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image


def shapes_caption_folder(root: Path, sizes: tuple[tuple[str, int], ...] = (("train", 48), ("validation", 16)), seed: int = 0) -> Path:
    """``root/<split>/`` image folders with a metadata.jsonl of captions ("a red circle")."""
    rng = random.Random(seed)
    for split, n in sizes:
        rows = []
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            (root / split).mkdir(parents=True, exist_ok=True)
            draw_shape(shape, COLOURS[colour], rng).save(root / split / f"{i:03d}.png")
            rows.append({"file_name": f"{i:03d}.png", "text": f"a {colour} {shape}"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def shapes_class_folder(root: Path, background: tuple[int, int, int], per_class: int, seed: int = 0,
                        unlabelled: bool = False) -> Path:
    """``root/<shape>/NNN.png`` (one sub-folder per class), or ``root/unlabeled/`` for unlabelled target images."""
    rng = random.Random(seed)
    for shape in SHAPES:
        folder = root / ("unlabeled" if unlabelled else shape)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(shape, rng.choice(list(COLOURS.values())), rng, background).save(folder / f"{shape}_{i:03d}.png")
    return root
