"""Per-image preprocessing time: the fused scale-and-normalise step against torchvision's two steps.

The same images through the eval preprocessing of a tower (resize, centre crop, to tensor,
then either ``ToDtype(float32, scale=True)`` + ``Normalize`` or mmtransfer's
``ScaleNormalize``), the two pipelines interleaved image by image in one process on one
thread, so machine noise hits both alike. Prints ms per image for each and their ratio,
and the largest difference between their outputs.

Usage:
    python benchmarks/preprocess_normalize.py --data /tmp/openmoji_jpeg --image-tower vit_base_patch16_224
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="openmoji", help="a built-in set (train split) or an image folder")
    parser.add_argument("--image-tower", default="efficientnet-lite0")
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()

    from pathlib import Path

    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    import mmtransfer
    from mmtransfer.data import load, open_image, undecoded
    from mmtransfer.models.image import build_backbone
    from mmtransfer.models.preprocess import ScaleNormalize, to_rgb

    torch.set_num_threads(1)
    cfg = build_backbone(mmtransfer.ImageEncoderConfig(name=args.image_tower, pretrained=False))[1]
    ds = undecoded(load(args.data) if Path(args.data).is_dir() else load(args.data, split="train"))
    images = [to_rgb(open_image(ds[i % len(ds)]["image"]), cfg.background) for i in range(args.images)]
    front = T.Compose([T.Resize(cfg.resize_size, interpolation=InterpolationMode(cfg.interpolation), antialias=True),
                       T.CenterCrop(cfg.image_size), T.ToImage()])
    two_steps = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(list(cfg.mean), list(cfg.std))])
    fused = ScaleNormalize(cfg.mean, cfg.std)
    spent = {"torchvision ToDtype + Normalize": 0.0, "ScaleNormalize": 0.0}
    front_s, diff = 0.0, 0.0
    for im in images:
        start = time.perf_counter()
        x = front(im)
        front_s += time.perf_counter() - start
        outs = []
        for name, fn in (("torchvision ToDtype + Normalize", two_steps), ("ScaleNormalize", fused)):
            start = time.perf_counter()
            outs.append(fn(x))
            spent[name] += time.perf_counter() - start
        diff = max(diff, float((outs[0] - outs[1]).abs().max()))
    n = len(images)
    print(f"{n} images, {args.image_tower} preprocessing at {cfg.image_size} px, 1 thread; resize + crop + to tensor "
          f"{front_s / n * 1000:.3f} ms per image")
    for name, s in spent.items():
        print(f"{name}: {s / n * 1000:.3f} ms per image")
    a, b = spent.values()
    print(f"ScaleNormalize / torchvision: {b / a:.2f}; whole preprocessing {(front_s + b) / (front_s + a):.2f}; "
          f"largest output difference {diff:.1e}")


if __name__ == "__main__":
    main()
