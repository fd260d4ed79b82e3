"""Training speed and peak memory of caption fine-tuning on CPU.

Three measurements, each in its own process so peak memory is its own:

* ``plain``: a hand-written loop over a VisionTextDualEncoderModel-style dual
  encoder (transformers AutoModel text tower + timm image tower + linear
  projections + CLIP loss, AdamW), the way users glue it together today;
* ``ours``: the same towers and batch through mmtransfer's Trainer and
  CaptionTask (contrastive only, so the work is the same);
* ``ours+itm``: ours with the fusion layer and image-text matching added;
* ``frozen``/``cached``: the default recipe's model (configs/openmoji_contrastive.yaml:
  160 px, MLP projections, one 128-wide fusion layer with ITM) with frozen towers,
  recomputed every step vs read from the feature cache, to show what caching saves.

    python benchmarks/train_speed.py                 # all, batch 64, prints a Markdown table
    python benchmarks/train_speed.py --steps 3 --only plain ours
    python benchmarks/train_speed.py --only frozen cached     # at least 10 timed steps each
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VARIANTS = ["plain", "ours", "ours+itm", "frozen", "cached"]


def _batch(batch_size: int, tokenizer, size: int = 224):
    import torch

    g = torch.Generator().manual_seed(0)
    words = ["red", "apple", "smiling", "face", "with", "heart", "eyes", "cat", "dog", "flag", "of", "a", "blue", "car"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g)) for _ in range(batch_size)]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "image_index": torch.arange(batch_size)}


def run_plain(batch_size: int, steps: int, warmup: int) -> list[float]:
    """The glue code people write: two towers, projections, CLIP loss, a plain loop."""
    import timm
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from mmtransfer.models.image import load_packaged_weights
    from mmtransfer.registry import IMAGE_ALIASES, resolve_text_name

    torch.manual_seed(0)
    path = resolve_text_name("minilm-l6")
    text = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    vision = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_packaged_weights(vision, IMAGE_ALIASES["efficientnet-lite0"])
    vision.reset_classifier(0)

    class DualEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text, self.vision = text, vision
            self.text_projection = torch.nn.Linear(384, 256, bias=False)
            self.visual_projection = torch.nn.Linear(1280, 256, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))

        def forward(self, pixel_values, input_ids, attention_mask):
            h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).float()
            t = F.normalize(self.text_projection((h * m).sum(1) / m.sum(1)), dim=-1)
            v = F.normalize(self.visual_projection(self.vision(pixel_values)), dim=-1)
            logits = self.logit_scale.exp() * v @ t.T
            labels = torch.arange(len(v))
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    model = DualEncoder().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = _batch(batch_size, tokenizer)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        loss = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return times[warmup:]


def run_ours(batch_size: int, steps: int, warmup: int, variant: str) -> list[float]:
    import tempfile

    import torch

    import mmtransfer
    from mmtransfer.objectives.captions import CaptionObjectiveConfig, CaptionTask
    from mmtransfer.train import OptimConfig, TrainConfig, Trainer

    torch.manual_seed(0)
    if variant in ("frozen", "cached"):
        from mmtransfer.assemble.captions import FinetuneConfig
        from mmtransfer.config import load_config

        recipe = load_config(FinetuneConfig, Path(__file__).resolve().parents[1] / "configs" / "openmoji_contrastive.yaml")
        model = mmtransfer.create_model(recipe.model)
    else:
        model = mmtransfer.create_model(mmtransfer.ModelConfig())
    itm = 1.0 if variant == "ours+itm" else 0.0
    batch = _batch(batch_size, model.tokenizer, model.preprocessor.config.image_size)
    if variant in ("frozen", "cached"):
        model.freeze("both")
        itm = 1.0
    if variant == "cached":
        with torch.no_grad():
            model.eval()
            img = model.image_encoder(batch["pixel_values"])
            txt = model.text_encoder(batch["input_ids"], batch["attention_mask"])
        batch = {**{k: v for k, v in batch.items() if k != "pixel_values"},
                 "image_pooled": img.pooled, "image_tokens": img.tokens, "text_pooled": txt.pooled, "text_tokens": txt.tokens}
    loader = [batch] * (warmup + steps)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(output_dir=out, max_steps=warmup + steps, batch_size=batch_size, trackers=[],
                          log_every=1, progress_bar=False)
        trainer = Trainer(CaptionTask(model, CaptionObjectiveConfig(itm_weight=itm)), loader,
                          cfg, OptimConfig(warmup_steps=0, grad_clip=0.0))
        trainer.save_checkpoint = lambda: None  # measure steps, not disk
        trainer.fit()
        stamps = [r["time"] for r in trainer.records if "train/loss" in r]
    return [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]


def child(variant: str, batch_size: int, steps: int, warmup: int) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if variant in ("frozen", "cached"):
        steps = max(steps, 10)  # cheap steps: enough of them for a steady median
    times = run_plain(batch_size, steps, warmup) if variant == "plain" else run_ours(batch_size, steps, warmup, variant)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step = sorted(times)[len(times) // 2]
    print(json.dumps({"variant": variant, "median_step_s": step, "samples_per_s": batch_size / step,
                      "peak_rss_mb": peak_mb, "steps": len(times), "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--only", nargs="*", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size, args.steps, args.warmup)
        return
    rows = []
    for variant in args.only:
        cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]}", file=sys.stderr)
    base = {r["variant"]: r for r in rows}
    print("| variant | median step (s) | samples/s | peak RSS (MB) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_step_s']:.2f} | {r['samples_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    if "frozen" in base and "cached" in base:
        print(f"\nfeature cache speed-up: {base['frozen']['median_step_s'] / base['cached']['median_step_s']:.1f}x")
    if "plain" in base and "ours" in base:
        print(f"ours / plain step time: {base['ours']['median_step_s'] / base['plain']['median_step_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
