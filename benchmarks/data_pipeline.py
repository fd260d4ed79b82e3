"""Images per second of the training data pipeline, and its headroom over the model.

DataLoader over the built-in ``openmoji`` train split (160 px PNGs) or any data the
data layer reads (``--data``: e.g. a folder of JPEG files), the caption collator with
the MiniLM tokenizer and an image tower's preprocessing (default EfficientNet-Lite0:
resize 256, centre crop 224, scale to [-1, 1]), batch 64, with and without train-time
augmentation, for several worker counts. Prints a small table.

Given the model's training rate (``--model-rate`` images/s, or ``--model-results``: the
results.json of benchmarks/gpu_throughput.py, whose "ours" row is read), each row also
gives the headroom = loader images/s / model images/s (at least 1.1 keeps the GPU fed).
``--pin-memory`` pins batches as a CUDA run does; ``--gpu-decode`` adds a row for
``torchvision.io.decode_jpeg`` on the GPU (file bytes read by the workers, decoded,
resized and cropped on the device), the way out if CPU decoding is the limit.

Usage:
    python benchmarks/data_pipeline.py                      # workers 0 and 2; one warm-up epoch, one timed epoch
    python benchmarks/data_pipeline.py --workers 0 1 2 --epochs 2 --batch-size 128
    python scripts/render_emoji_font.py <glyf_colr0.ttf> --out /tmp/openmoji_jpeg --splits train --image-size 224 --format jpeg
    python benchmarks/data_pipeline.py --data /tmp/openmoji_jpeg --image-tower vit_base_patch16_224 --batch-size 256 \
        --workers 4 8 16 --augment-only --pin-memory --gpu-decode --model-results results/gpu/results.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks workers; keep the tokenizer single-threaded


def components(ds, collate, batch_size: int) -> dict[str, float]:
    """Seconds per image of each stage, in this process."""
    from mmtransfer.data import open_image

    rows = [ds[i] for i in range(batch_size)]
    start = time.perf_counter()
    images = [open_image(r["image"]) for r in rows]
    decode = time.perf_counter() - start
    start = time.perf_counter()
    collate.preprocessor(images)
    pre = time.perf_counter() - start
    start = time.perf_counter()
    collate.tokenizer([r["captions"][0] for r in rows], padding=True, truncation=True, max_length=collate.max_length, return_tensors="pt")
    tok = time.perf_counter() - start
    return {"decode": decode / batch_size, "preprocess": pre / batch_size, "tokenize": tok / batch_size}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (Linux /proc), so that throughput per CPU-second can be
    reported even when other jobs share the machine."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def run(ds, collate, batch_size: int, workers: int, epochs: int, pin: bool = False) -> tuple[int, float, float]:
    """Steady-state throughput: one untimed epoch first, then ``epochs`` timed ones.

    The untimed epoch absorbs worker start-up and first-touch memory costs (large
    on a fresh VM, where a process's first few hundred MB of page faults are slow);
    workers persist across epochs (the steady rate; the training loop starts its workers
    with each epoch, which :func:`first_batch_seconds` prices). Returns images, wall
    seconds and CPU seconds (main process and workers).
    """
    from mmtransfer.data import make_loader

    loader = make_loader(ds, collate, batch_size=batch_size, shuffle=True, seed=0, num_workers=workers,
                         drop_last=True, persistent_workers=workers > 0, pin_memory=pin)
    for _ in loader:
        pass
    pids = [os.getpid()] + ([w.pid for w in loader._iterator._workers] if workers > 0 else [])
    images = 0
    cpu = cpu_seconds(pids)
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += batch["pixel_values"].shape[0]
    return images, time.perf_counter() - start, cpu_seconds(pids) - cpu


def first_batch_seconds(ds, collate, batch_size: int, workers: int, pin: bool) -> float:
    """Seconds to the first batch of an epoch when workers start with it (the loop's setting: no persistent workers)."""
    from mmtransfer.data import make_loader

    loader = make_loader(ds, collate, batch_size=batch_size, shuffle=True, seed=0, num_workers=workers, drop_last=True,
                         pin_memory=pin)
    start = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - start


def gpu_decode_rate(ds, batch_size: int, workers: int, size: int, epochs: int, device: str) -> float:
    """Images/s of JPEG bytes read by loader workers and decoded + resized + centre-cropped on ``device`` (the GPU)."""
    from pathlib import Path

    import torch
    import torchvision.transforms.v2.functional as TF
    from torch.utils.data import DataLoader
    from torchvision.io import decode_jpeg

    from mmtransfer.data import undecoded

    rows = undecoded(ds)

    def read(i: int) -> torch.Tensor:
        image = rows[i]["image"]
        data = image["bytes"] if image.get("bytes") else Path(image["path"]).read_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    loader = DataLoader(range(len(rows)), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        collate_fn=lambda idx: [read(i) for i in idx], persistent_workers=workers > 0)

    def epoch() -> int:
        n = 0
        for files in loader:
            images = decode_jpeg(files, device=device)  # list of (3, H, W) uint8 on the device
            batch = torch.stack([TF.center_crop(TF.resize(x, [size], antialias=True), [size]) for x in images])
            n += batch.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    epoch()  # warm-up: workers, nvjpeg handles
    start = time.perf_counter()
    images = sum(epoch() for _ in range(epochs))
    return images / (time.perf_counter() - start)


def model_rate(args: argparse.Namespace) -> float | None:
    if args.model_rate:
        return args.model_rate
    if args.model_results:
        import json

        rows = json.loads(args.model_results.read_text())["rows"]
        ours = next((r for r in rows if r["variant"] == "ours" and "error" not in r), None)
        if ours is None:
            raise SystemExit(f"error: {args.model_results} has no measured 'ours' row to compare the loader with.")
        return ours["images_per_s"]
    return None


def main() -> None:
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="openmoji", help="what to read: a built-in set or a folder (default: openmoji)")
    parser.add_argument("--split", default="train", help="split of a built-in set (default: train)")
    parser.add_argument("--image-tower", default="efficientnet-lite0", help="whose preprocessing to apply (a tower alias or timm name)")
    parser.add_argument("--tokenizer", default="minilm-l6", help="the captions' tokenizer: a text tower alias or a folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per setting (after one untimed epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augment-only", action="store_true", help="only the training rows (with augmentation)")
    parser.add_argument("--pin-memory", action="store_true", help="pin batches in page-locked memory (as for a GPU)")
    parser.add_argument("--gpu-decode", action="store_true", help="add a row decoding the JPEG files on the GPU")
    parser.add_argument("--model-rate", type=float, help="the model's training images/s, for the headroom column")
    parser.add_argument("--model-results", type=Path, help="benchmarks/gpu_throughput.py's results.json: its 'ours' row is the model rate")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the main process (DataLoader workers always use 1); per-image "
                             "preprocessing gains nothing from more, and on a shared 2-core VM 2 threads can be 5x slower")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    import mmtransfer
    from mmtransfer.data import CaptionCollator, load, undecoded
    from mmtransfer.models.image import build_backbone
    from mmtransfer.models.preprocess import AugmentConfig, ImagePreprocessor
    from mmtransfer.registry import resolve_text_name

    torch.set_num_threads(args.threads)
    rate = model_rate(args)
    start = time.perf_counter()
    ds = load(args.data, split=args.split) if not Path(args.data).is_dir() else load(args.data)
    load_s = time.perf_counter() - start
    pre_config = build_backbone(mmtransfer.ImageEncoderConfig(name=args.image_tower, pretrained=False))[1]
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_name(args.tokenizer))
    preprocessor = ImagePreprocessor(pre_config)
    augment = AugmentConfig(crop_scale=(0.7, 1.0), color_jitter=0.2)

    print(f"data: {args.data}, {len(ds)} images (load {load_s:.1f} s)")
    print(f"preprocessing ({args.image_tower}): {pre_config.image_size} px, resize {pre_config.resize_size}, "
          f"crop_pct {pre_config.crop_pct}, {pre_config.interpolation}; tokenizer max_length 64; batch {args.batch_size}"
          f"{', pinned memory' if args.pin_memory else ''}")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads in the main process")
    if rate:
        print(f"model: {rate:,.0f} images/s ({args.model_results or '--model-rate'})")
    collate = CaptionCollator(tokenizer, preprocessor, max_length=64, train=True)
    per = components(undecoded(ds), collate, args.batch_size)
    print("per image, one process: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in per.items()))
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average before the runs: {load_avg:.1f} (other jobs on the machine lower the wall-clock numbers; "
          "images per CPU-second does not depend on them)")
    print()
    settings = [("random resized crop + colour jitter", augment)]
    if not args.augment_only:
        settings.insert(0, ("none (eval resize+crop)", None))
    print("| workers | augmentation | images | seconds | images/s | CPU s | images per CPU-s | first batch (s) |"
          + (" headroom |" if rate else ""))
    print("|--------:|:-------------|-------:|--------:|---------:|------:|-----------------:|----------------:|"
          + ("---------:|" if rate else ""))
    rows = []
    for workers in args.workers:
        for name, aug in settings:
            collate = CaptionCollator(tokenizer, preprocessor, max_length=64, train=True, augment=aug)
            images, seconds, cpu = run(ds, collate, args.batch_size, workers, args.epochs, args.pin_memory)
            first = first_batch_seconds(ds, collate, args.batch_size, workers, args.pin_memory)
            row = {"workers": workers, "augmentation": name, "images_per_s": images / seconds,
                   "images_per_cpu_s": images / cpu, "first_batch_s": first}
            rows.append(row)
            print(f"| {workers} | {name} | {images} | {seconds:.1f} | {images / seconds:,.0f} | {cpu:.1f} | {images / cpu:.0f} "
                  f"| {first:.2f} |" + (f" {images / seconds / rate:.2f} |" if rate else ""), flush=True)
    if args.gpu_decode:
        best = max(args.workers)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gpu = gpu_decode_rate(ds, args.batch_size, best, pre_config.image_size, args.epochs, device)
        rows.append({"workers": best, "augmentation": f"decode_jpeg + resize + crop on {device}", "images_per_s": gpu})
        print(f"| {best} | JPEG bytes only; decode_jpeg + resize + crop on {device} | | | {gpu:,.0f} | | | |"
              + (f" {gpu / rate:.2f} |" if rate else ""))
    if rate:
        best_row = max((r for r in rows if "first_batch_s" in r and r["augmentation"] != "none (eval resize+crop)"),
                       key=lambda r: r["images_per_s"])
        print(f"\nbest headroom {best_row['images_per_s'] / rate:.2f} ({best_row['augmentation']}, {best_row['workers']} workers)")
    if args.json:
        import json

        args.json.write_text(json.dumps({"model_images_per_s": rate, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
