"""Training memory and step time of ViT-B/16 + BERT-base with and without gradient checkpointing.

The towers of issue #23's benchmark with random weights (nothing is downloaded): timm's
``vit_base_patch16_224`` at 224 px and a BERT-base-sized BERT (hidden 768, 12 layers, 12
heads, feed-forward 3072: the packaged MiniLM config and tokenizer with those overrides),
both trainable, mean-pooled, linear projections to 512, no fusion. One training step is the
forward and backward pass of the contrastive loss through ``MultimodalModel`` on a batch of
random images and captions padded to ``--tokens`` tokens (no optimizer step: its state is the
same with and without checkpointing).

Each variant runs in a fresh subprocess. Memory is the step's peak minus what was resident
(CPU) or allocated (CUDA) once the model and batch were built: on a CPU the process's peak
resident set (``ru_maxrss``, its high-water mark reset after building through
``/proc/self/clear_refs`` where Linux allows it), with glibc returning freed blocks to the
system at once (``MALLOC_MMAP_THRESHOLD_``) so that freed activations do not stay resident;
on CUDA ``torch.cuda.max_memory_allocated``. The first step gives the memory; the median of
the ``--steps`` steps after it gives the time.

``--variants compile`` times ``torch.compile`` (``train.compile``) the same way: its first
step includes the compilation.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/memory_checkpointing.py --batch-size 8
    python benchmarks/memory_checkpointing.py --batch-size 64 --device cuda --steps 5 --variants off on compile
    OMP_NUM_THREADS=1 python benchmarks/memory_checkpointing.py --towers tiny --variants off compile --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = {"off": "no checkpointing", "on": "gradient checkpointing (both towers)",
            "compile": "no checkpointing, torch.compile (train.compile)"}
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}


def _rss_mb() -> float:
    """The resident set of this process now (VmRSS), in MB."""
    with open("/proc/self/status") as fh:
        kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kb / 1024


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _reset_peak_rss() -> bool:
    """Reset the process's high-water mark to its current resident set (Linux 4.0+); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _build(args: argparse.Namespace, checkpointing: bool):
    import dataclasses

    import torch

    from mmtransfer import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig, create_model
    from mmtransfer.registry import get_preset

    if args.towers == "tiny":
        config = dataclasses.replace(get_preset("tiny-random"), fusion=FusionConfig(num_layers=0),
                                     gradient_checkpointing=checkpointing)
    else:
        config = ModelConfig(
            text=TextEncoderConfig(name="minilm-l6", pretrained=False, max_length=args.tokens, config_overrides=dict(BERT_BASE)),
            image=ImageEncoderConfig(name="vit_base_patch16_224", pretrained=False, pooling="mean"),
            fusion=FusionConfig(num_layers=0), embed_dim=512, gradient_checkpointing=checkpointing,
        )
    torch.manual_seed(0)
    model = create_model(config).to(args.device).train()
    words = "a small red bird sits on a branch above the quiet river while two dogs run across the field".split()
    texts = [" ".join(words[i % 5:] + words[: i % 5]) * 3 for i in range(args.batch_size)]
    tok = model.tokenizer(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    size = model.preprocessor.config.image_size
    batch = {"pixel_values": torch.randn(args.batch_size, 3, size, size), "input_ids": tok["input_ids"],
             "attention_mask": tok["attention_mask"]}
    return model, {k: v.to(args.device) for k, v in batch.items()}


def _step(model, batch, after_forward=None) -> float:
    import torch

    from mmtransfer.losses import ContrastiveLoss

    start = time.perf_counter()
    out = model(**batch, fuse=False)
    loss = ContrastiveLoss()(out.image_embeds, out.text_embeds, out.logit_scale).loss
    if after_forward is not None:
        after_forward()
    loss.backward()
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> dict:
    """One variant, in this (fresh) process: memory of the first step, then the median time of the next ones."""
    import gc

    import torch

    from mmtransfer.models.common import compile_towers

    if args.threads:
        torch.set_num_threads(args.threads)
    model, batch = _build(args, args.child == "on")
    if args.child == "compile":
        compile_towers(model)  # what train.compile does
    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        now = lambda: torch.cuda.memory_allocated() / 2**20  # noqa: E731
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        now = _rss_mb
        reset = _reset_peak_rss()
    base, held = now(), []
    first = _step(model, batch, after_forward=lambda: held.append(now()))
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    times = [_step(model, batch) for _ in range(args.steps)]
    grads_mb = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**20
    return {"variant": args.child, "step_memory_mb": peak - base, "held_mb": held[0] - base, "base_mb": base,
            "peak_mb": peak, "grads_mb": grads_mb, "first_step_s": first, "step_s": statistics.median(times) if times else first,
            "params": sum(p.numel() for p in model.parameters()), "peak_reset": reset}


def _run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size), "--tokens", str(args.tokens),
           "--steps", str(args.steps), "--device", args.device, "--towers", args.towers]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    # Freed blocks of 128 KB and more go back to the system at once, so the resident set follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="image-caption pairs per step")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per caption (padded)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the first one; the median is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    parser.add_argument("--towers", choices=["base", "tiny"], default="base",
                        help="base: ViT-B/16 + BERT-base; tiny: the tiny-random preset's towers (32 px)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["off", "on"])
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    started = time.perf_counter()
    results = {v: _run_variant(v, args) for v in args.variants}
    off = next(iter(results.values()))
    what = "CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    towers = "ViT-B/16 (224 px) + BERT-base" if args.towers == "base" else "tiny-random towers (32 px)"
    print(f"{towers}, random weights, {off['params'] / 1e6:.1f} M parameters, both towers trainable; "
          f"batch {args.batch_size} images, {args.tokens} tokens a caption; {args.device}, "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')} thread(s), {platform.processor() or platform.machine()}")
    print()
    print(f"| variant | step peak: {what} above model + batch (MB) | held for backward after the forward pass (MB) "
          "| model + batch (MB) | first step (s) | step (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, r in results.items():
        print(f"| {VARIANTS[v]} | {r['step_memory_mb']:,.0f} | {r['held_mb']:,.0f} | {r['base_mb']:,.0f} "
              f"| {r['first_step_s']:.3g} | {r['step_s']:.3g} |")
    print()
    for v, r in results.items():
        if v != "off" and "off" in results:
            off = results["off"]
            saved = off["step_memory_mb"] - r["step_memory_mb"]
            print(f"{VARIANTS[v]} against none: step peak x{r['step_memory_mb'] / off['step_memory_mb']:.2f} "
                  f"({abs(saved):,.0f} MB {'less' if saved >= 0 else 'more'}), held after forward "
                  f"x{r['held_mb'] / off['held_mb']:.2f}, step time x{r['step_s'] / off['step_s']:.2f}")
    print(f"the gradients take {off['grads_mb']:,.0f} MB of each step's peak")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: the peak could not be reset after building the model; the step's peak may include the build's")
    print(f"({(time.perf_counter() - started) / 60:.1f} min for the whole command)")


if __name__ == "__main__":
    main()
