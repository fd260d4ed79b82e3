"""Images per second of the training data pipeline.

DataLoader over the built-in ``openmoji`` train split (160 px PNGs), the caption
collator with the MiniLM tokenizer and the EfficientNet-Lite0 preprocessing
(resize 256, centre crop 224, scale to [-1, 1]), batch 64, with and without
train-time augmentation, for several worker counts. Prints a small table.

Usage:
    python benchmarks/data_pipeline.py                      # workers 0 and 2; one warm-up epoch, one timed epoch
    python benchmarks/data_pipeline.py --workers 0 1 2 --epochs 2 --batch-size 128
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
    return {"decode PNG": decode / batch_size, "preprocess": pre / batch_size, "tokenize": tok / batch_size}


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


def run(ds, collate, batch_size: int, workers: int, epochs: int) -> tuple[int, float, float]:
    """Steady-state throughput: one untimed epoch first, then ``epochs`` timed ones.

    The untimed epoch absorbs worker start-up and first-touch memory costs (large
    on a fresh VM, where a process's first few hundred MB of page faults are slow);
    workers persist across epochs as they would in training. Returns images, wall
    seconds and CPU seconds (main process and workers).
    """
    from mmtransfer.data import make_loader

    loader = make_loader(ds, collate, batch_size=batch_size, shuffle=True, seed=0, num_workers=workers,
                         drop_last=True, persistent_workers=workers > 0)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per setting (after one untimed epoch)")
    parser.add_argument("--batch-size", type=int, default=64)
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
    start = time.perf_counter()
    ds = load("openmoji", split="train")
    load_s = time.perf_counter() - start
    pre_config = build_backbone(mmtransfer.ImageEncoderConfig())[1]
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_name("minilm-l6"))
    preprocessor = ImagePreprocessor(pre_config)
    augment = AugmentConfig(crop_scale=(0.7, 1.0), color_jitter=0.2)

    print(f"data: openmoji train, {len(ds)} images of 160 px (load from cache {load_s:.1f} s)")
    print(f"preprocessing: {pre_config.image_size} px, resize {pre_config.resize_size}, crop_pct {pre_config.crop_pct}, "
          f"{pre_config.interpolation}; tokenizer max_length 64; batch {args.batch_size}")
    print(f"machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads in the main process")
    collate = CaptionCollator(tokenizer, preprocessor, max_length=64, train=True)
    per = components(undecoded(ds), collate, args.batch_size)
    print("per image, one process: " + ", ".join(f"{k} {v * 1000:.2f} ms" for k, v in per.items()))
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average before the runs: {load_avg:.1f} (other jobs on the machine lower the wall-clock numbers; "
          "images per CPU-second does not depend on them)")
    print()
    print("| workers | augmentation | images | seconds | images/s | CPU s | images per CPU-s |")
    print("|--------:|:-------------|-------:|--------:|---------:|------:|-----------------:|")
    for workers in args.workers:
        for name, aug in (("none (eval resize+crop)", None), ("random resized crop + colour jitter", augment)):
            collate = CaptionCollator(tokenizer, preprocessor, max_length=64, train=True, augment=aug)
            images, seconds, cpu = run(ds, collate, args.batch_size, workers, args.epochs)
            print(f"| {workers} | {name} | {images} | {seconds:.1f} | {images / seconds:.0f} | {cpu:.1f} | {images / cpu:.0f} |", flush=True)


if __name__ == "__main__":
    main()
