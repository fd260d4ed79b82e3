"""Training throughput of a ViT-B/16 + BERT-base dual encoder: mmtransfer beside open_clip and a plain loop.

The same two towers, randomly initialised (weights do not change speed): timm's
``vit_base_patch16_224`` at 224 px and a BERT with bert-base-uncased's architecture
(``BertConfig()``), captions of ``--tokens`` random token ids, embedding size 512,
AdamW, bf16 autocast on CUDA (fp32 on a CPU). Trained by

* ``ours``: mmtransfer's Trainer and CaptionTask (contrastive loss), the loop every
  recipe uses; ``ours+itm`` adds two fusion layers and the image-text matching loss;
  ``ours+ckpt`` is ``ours`` with ``model.gradient_checkpointing``; ``ours+compile``
  with ``train.compile``; ``ours frozen`` freezes both towers (fusion + ITM on) and
  recomputes them every step; ``ours cached`` reads their features from the feature
  cache instead, as the recipes do with frozen towers;
* ``open_clip``: open-clip-torch 3.x's ``CustomTextCLIP`` with the hf text tower
  (mean pooler, linear projection) and the timm image tower, its ``ClipLoss``, and the
  step of its training script (autocast, backward, AdamW, logit-scale clamp);
  ``open_clip locked`` locks both towers (LiT's ``lock_image_tower`` and ``lock_text_tower``);
* ``plain``: the loop users write around a ``VisionTextDualEncoderModel``-style dual
  encoder: the two towers, CLS pooling, linear projections, the CLIP loss.

Each variant runs in its own process (clean peak memory; a crash or an out-of-memory
error costs one row). The batch starts at ``--batch-size`` and halves until it fits.
Reported per variant: images/s and step time (mean over ``--steps`` timed steps after
``--warmup``), peak memory (``torch.cuda.max_memory_allocated``; peak RSS on a CPU),
model FLOPs per step (``torch.utils.flop_counter`` on one step: matmuls, convolutions
and attention, forward and backward) and MFU = FLOPs per second / the device's dense
bf16 peak, itself measured in the same run with an 8192^3 matrix product.
``--profile VARIANT`` also writes the torch profiler's table for that variant, with the
share of the step the GPU spends in kernels, and counts where a step makes the host wait
for the GPU (``torch.cuda.set_sync_debug_mode``).

The peers are optional (``pip install 'mmtransfer[bench]'``); a variant whose package
is missing is left out with a line saying so.

Usage:
    python benchmarks/gpu_throughput.py --device cuda --out results/gpu       # on a GPU: the table
    python benchmarks/gpu_throughput.py --device cuda --only ours open_clip plain --profile ours
    python benchmarks/gpu_throughput.py --towers tiny --device cpu --batch-size 8 --steps 2 --warmup 1   # a CPU check
    python benchmarks/gpu_throughput.py --device cpu --batch-size 8 --steps 4 --warmup 1 --rounds 3 \
        --only ours open_clip plain                    # the base towers on a CPU, interleaved
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = {
    "ours": "mmtransfer, both towers trained",
    "ours+itm": "mmtransfer + 2 fusion layers and ITM",
    "ours+ckpt": "mmtransfer + gradient checkpointing",
    "ours+compile": "mmtransfer + torch.compile",
    "ours frozen": "mmtransfer, frozen towers, fusion + ITM",
    "ours cached": "mmtransfer, feature cache, fusion + ITM",
    "open_clip": "open_clip CustomTextCLIP",
    "open_clip locked": "open_clip, both towers locked",
    "plain": "plain dual-encoder loop",
}
DEFAULT_VARIANTS = ["ours", "open_clip", "plain", "ours+itm", "ours+ckpt", "ours frozen", "ours cached", "open_clip locked",
                    "ours+compile"]
TOWERS = {  # image tower (timm), text tower (BertConfig overrides)
    "base": ("vit_base_patch16_224", {}),
    "tiny": ("test_vit", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}),
}
EMBED_DIM = 512
LR, BETAS, EPS, WD = 1e-4, (0.9, 0.98), 1e-6, 0.05


# ----------------------------------------------------------------------------- shared pieces


def text_folder(dest: Path, towers: str, tokenizer_from: str) -> str:
    """A folder with a BERT config (bert-base-uncased's architecture for "base") and a BERT uncased tokenizer,
    which every trainer builds its text tower from (random weights; the tokenizer only gives the vocabulary)."""
    from transformers import AutoTokenizer, BertConfig

    from mmtransfer.registry import resolve_text_name

    BertConfig(**TOWERS[towers][1]).save_pretrained(dest)
    AutoTokenizer.from_pretrained(resolve_text_name(tokenizer_from)).save_pretrained(dest)
    return str(dest)


def synthetic_batch(args: argparse.Namespace, batch_size: int, image_size: int, vocab: int, device) -> dict:
    """Random images and captions of ``args.tokens`` tokens (no padding), on the device."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (batch_size, args.tokens), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device),
            "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "image_index": torch.arange(batch_size).to(device)}


def autocast(device):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's dispatcher-level counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


class LoopTrainer:
    """A hand-written training step: ``loss_fn()`` under autocast, backward, AdamW, then ``after_step``."""

    def __init__(self, model, loss_fn, device, after_step=None, grad_clip: float = 0.0) -> None:
        import torch

        self.model, self.loss_fn, self.device, self.after_step, self.grad_clip = model, loss_fn, device, after_step, grad_clip
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def step(self) -> None:
        import torch

        with autocast(self.device):
            loss = self.loss_fn()
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()

    def forward_backward(self) -> None:
        with autocast(self.device):
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, warmup: int, steps: int) -> float:
        """Mean seconds per step over ``steps`` steps after ``warmup`` untimed ones."""
        for _ in range(warmup):
            self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.device)
        return (time.perf_counter() - start) / steps


# ----------------------------------------------------------------------------- the trainers


def build_plain(args, folder: str, batch_size: int, device):
    """Two towers, CLS pooling, linear projections and the CLIP loss: the VisionTextDualEncoderModel recipe."""
    import timm
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModel

    class DualEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vision = timm.create_model(TOWERS[args.towers][0], pretrained=False, num_classes=0, global_pool="token")
            self.text = AutoModel.from_config(AutoConfig.from_pretrained(folder), add_pooling_layer=False)
            self.visual_projection = torch.nn.Linear(self.vision.num_features, EMBED_DIM, bias=False)
            self.text_projection = torch.nn.Linear(self.text.config.hidden_size, EMBED_DIM, bias=False)
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        def forward(self, pixel_values, input_ids, attention_mask):
            v = F.normalize(self.visual_projection(self.vision(pixel_values)), dim=-1)  # (B, E)
            h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
            t = F.normalize(self.text_projection(h[:, 0]), dim=-1)  # (B, E)
            logits = self.logit_scale.exp() * v @ t.T  # (B, B)
            labels = torch.arange(len(v), device=v.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    model = DualEncoder().to(device).train()
    batch = synthetic_batch(args, batch_size, model.vision.default_cfg["input_size"][-1], model.text.config.vocab_size, device)
    return LoopTrainer(model, lambda: model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]), device)


def build_open_clip(args, folder: str, batch_size: int, device, locked: bool):
    """open_clip's CustomTextCLIP with its hf and timm towers, and the step of open_clip_train's train_one_epoch."""
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(timm_model_name=TOWERS[args.towers][0], timm_model_pretrained=False, timm_pool="token",
                           timm_proj="linear")
    text = CLIPTextCfg(hf_model_name=folder, hf_model_pretrained=False, hf_proj_type="linear", hf_pooler_type="mean_pooler",
                       context_length=args.tokens)
    model = open_clip.CustomTextCLIP(EMBED_DIM, vision, text, output_dict=True).to(device).train()
    if locked:
        model.lock_image_tower()
        model.lock_text_tower()
    loss = open_clip.ClipLoss()
    size = model.visual.trunk.default_cfg["input_size"][-1]
    batch = synthetic_batch(args, batch_size, size, model.text.vocab_size, device)

    def loss_fn():
        out = model(batch["pixel_values"], batch["input_ids"])
        return loss(out["image_features"], out["text_features"], out["logit_scale"])

    def clamp():
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return LoopTrainer(model, loss_fn, device, after_step=clamp)


class OursTrainer:
    """mmtransfer's Trainer over a list of one batch; steps timed from the loop's own per-step records."""

    def __init__(self, args, folder: str, batch_size: int, device, variant: str) -> None:
        import torch

        from mmtransfer import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig, create_model
        from mmtransfer.objectives.captions import CaptionObjectiveConfig, CaptionTask

        itm = variant in ("ours+itm", "ours frozen", "ours cached")
        config = ModelConfig(
            text=TextEncoderConfig(name=folder, pretrained=False, pooling="mean", max_length=args.tokens),
            image=ImageEncoderConfig(name=TOWERS[args.towers][0], pretrained=False, pooling="cls"),
            fusion=FusionConfig(num_layers=2 if itm else 0), embed_dim=EMBED_DIM,
            gradient_checkpointing=variant == "ours+ckpt",
        )
        torch.manual_seed(0)
        self.model = model = create_model(config).to(device)
        self.device, self.variant, self.batch_size = device, variant, batch_size
        if variant in ("ours frozen", "ours cached"):
            model.freeze("both")
        batch = synthetic_batch(args, batch_size, model.preprocessor.config.image_size, model.tokenizer.vocab_size, device)
        if variant == "ours cached":
            with torch.no_grad(), autocast(device):
                model.eval()
                img = model.image_encoder(batch["pixel_values"])
                txt = model.text_encoder(batch["input_ids"], batch["attention_mask"])
            batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                     "image_index": batch["image_index"], "image_pooled": img.pooled.float(),
                     "image_tokens": img.tokens.float(), "text_pooled": txt.pooled.float(), "text_tokens": txt.tokens.float()}
        model.train()
        self.batch = batch
        self.task = CaptionTask(model, CaptionObjectiveConfig(itm_weight=1.0 if itm else 0.0))

    def run(self, warmup: int, steps: int) -> float:
        from mmtransfer.train import OptimConfig, TrainConfig, Trainer

        # The loop reads its metrics only at log steps (a read waits for the GPU): log where the timing needs a
        # stamp, at the end of the warm-up and every gcd(warmup, steps) steps after, as a user's log_every would.
        log_every = math.gcd(warmup, steps)
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(output_dir=out, max_steps=warmup + steps, batch_size=self.batch_size, trackers=[],
                              log_every=log_every, eval_every=0, save_every=0, progress_bar=False,
                              mixed_precision="bf16" if self.device.type == "cuda" else "no",
                              compile=self.variant == "ours+compile")
            optim = OptimConfig(lr=LR, tower_lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, warmup_steps=0)
            trainer = Trainer(self.task, [self.batch] * (warmup + steps), cfg, optim)
            trainer.save_checkpoint = lambda: None  # measure steps, not disk
            trainer.fit()
            # A log step reads the losses, i.e. waits until the GPU has finished every step before it.
            stamps = {r["step"]: r["time"] for r in trainer.records if "train/loss" in r}
        return (stamps[warmup + steps] - stamps[warmup]) / steps

    def forward_backward(self) -> None:
        from mmtransfer.objectives.base import StepInfo

        with autocast(self.device):
            loss = self.task(self.batch, StepInfo(0, 1)).loss
        loss.backward()
        self.model.zero_grad(set_to_none=True)


def build(variant: str, args, folder: str, batch_size: int, device):
    if variant == "plain":
        return build_plain(args, folder, batch_size, device)
    if variant.startswith("open_clip"):
        return build_open_clip(args, folder, batch_size, device, locked=variant == "open_clip locked")
    return OursTrainer(args, folder, batch_size, device, variant)


# ----------------------------------------------------------------------------- one variant, in a child process


def peak_flops(device) -> float:
    """Dense matrix-product FLOP/s of this device: bf16 8192^3 on CUDA, fp32 1024^3 on a CPU (mean of timed runs)."""
    import torch

    n, dtype, reps = (8192, torch.bfloat16, 10) if device.type == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def profile(trainer, device, out_dir: Path, name: str, step_s: float, steps: int = 4) -> dict:
    """The torch profiler over ``steps`` steps: its table (by device time) to a file, and the kernels' share of
    ``steps`` x ``step_s`` (the unprofiled step time; for ours the profiled window also builds a Trainer)."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step = trainer.step if hasattr(trainer, "step") else None
    if step is None:  # ours: one Trainer.fit of `steps` steps after a warm one, logging every `steps` // 2
        trainer.run(1, 1)
        step_fn = lambda: trainer.run(steps // 2, steps - steps // 2)  # noqa: E731
        reps = 1
    else:
        step_fn, reps = step, steps
        step()
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(reps):
            step_fn()
        sync(device)
        wall = time.perf_counter() - start
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages()) if device.type == "cuda" else float("nan")
    path = out_dir / f"profile_{name.replace(' ', '_').replace('+', '_')}.txt"
    path.write_text(f"{name}: {steps} steps profiled in {wall:.3f} s wall; GPU kernels {kernel_us / 1e6:.3f} s; "
                    f"{step_s:.4f} s per step unprofiled\n\n{table}\n")
    return {"profile": str(path), "kernel_share": kernel_us / 1e6 / (steps * step_s)}


def host_syncs(trainer, steps: int = 4) -> dict:
    """Where the host waits for the GPU (``torch.cuda.set_sync_debug_mode``), per step: the syncs of 2 x ``steps``
    steps less those of 2 steps, each run logging twice (ours also builds a Trainer and finishes it in each),
    and the source lines that made them."""
    import collections
    import warnings

    import torch

    def syncs(n: int) -> collections.Counter:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                if hasattr(trainer, "step"):  # the peers' loops
                    for _ in range(2 * n):
                        trainer.step()
                else:  # ours: a Trainer.fit of 2n steps that logs after n and 2n
                    trainer.run(n, n)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))

    one, many = syncs(1), syncs(steps)
    per_step = many.copy()
    per_step.subtract(one)
    sites = {site: count / (2 * steps - 2) for site, count in per_step.items() if count > 0}
    return {"syncs_per_step": sum(sites.values()), "sync_sites": dict(sorted(sites.items(), key=lambda kv: -kv[1])[:10])}


def child(args: argparse.Namespace) -> dict:
    import torch

    device = torch.device(args.device)
    if args.child == "peak":
        return {"peak_flops": peak_flops(device)}
    with tempfile.TemporaryDirectory() as tmp:
        folder = text_folder(Path(tmp) / "text", args.towers, args.tokenizer)
        torch.manual_seed(0)
        trainer = build(args.child, args, folder, args.batch_size, device)
        flops = count_flops(trainer.forward_backward)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_s = trainer.run(args.warmup, args.steps)
        if device.type == "cuda":
            peak_gb = torch.cuda.max_memory_allocated() / 2**30
        else:
            import resource

            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result = {"variant": args.child, "batch": args.batch_size, "step_s": step_s, "images_per_s": args.batch_size / step_s,
                  "peak_gb": peak_gb, "flops_per_step": flops}
        if args.profile == args.child and args.out:
            try:  # the measured row matters more than its profile
                result.update(profile(trainer, device, Path(args.out), args.child, step_s))
                if device.type == "cuda":
                    result.update(host_syncs(trainer))
            except Exception as err:  # noqa: BLE001
                result["profile_error"] = f"{type(err).__name__}: {err}"[:300]
    return result


def run_child(variant: str, args: argparse.Namespace, batch_size: int, profile: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--batch-size", str(batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--tokens", str(args.tokens), "--device", args.device, "--towers", args.towers,
           "--tokenizer", args.tokenizer]
    cmd += ["--profile", args.profile, "--out", str(args.out)] if profile and args.profile and args.out else []
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        oom = "OutOfMemoryError" in proc.stderr or "out of memory" in proc.stderr
        return {"variant": variant, "error": tail[0][:300], "oom": oom}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(variant: str, args: argparse.Namespace) -> dict:
    """One variant at the largest batch that fits, halving from --batch-size."""
    batch = args.batch_size
    while True:
        result = run_child(variant, args, batch)
        if not result.get("oom") or batch <= 1:
            return result
        print(f"{variant}: out of memory at batch {batch}, trying {batch // 2}", file=sys.stderr)
        batch //= 2


def merge_round(row: dict, again: dict) -> dict:
    """A variant's row after one more round: the median step time over the rounds so far (peak memory: the largest)."""
    if "error" in again:
        return {**row, "round_errors": row.get("round_errors", []) + [again["error"]]}
    rounds = row.get("step_s_rounds", [row["step_s"]]) + [again["step_s"]]
    step_s = statistics.median(rounds)
    return {**row, "step_s": step_s, "images_per_s": row["batch"] / step_s, "step_s_rounds": rounds,
            "peak_gb": max(row["peak_gb"], again["peak_gb"])}


def missing_peer(variant: str) -> str | None:
    if variant.startswith("open_clip"):
        try:
            import open_clip  # noqa: F401
        except ImportError:
            return "open_clip is not installed (pip install 'mmtransfer[bench]')"
    return None


def _rate(per_s: float) -> str:
    """Images per second with three significant figures up to 1,000 (a CPU check's 1.16, not 1)."""
    return f"{per_s:,.0f}" if per_s >= 1000 else f"{per_s:.3g}"


def table(rows: list[dict], peak: float) -> str:
    lines = ["| trainer | batch | images/s | step (ms) | peak memory (GiB) | TFLOP per step | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {VARIANTS[r['variant']]} | - | failed: {r['error']} | | | | |")
            continue
        mfu = r["flops_per_step"] / r["step_s"] / peak
        lines.append(f"| {VARIANTS[r['variant']]} | {r['batch']} | {_rate(r['images_per_s'])} | {r['step_s'] * 1000:,.1f} "
                     f"| {r['peak_gb']:.1f} | {r['flops_per_step'] / 1e12:.3g} | {mfu:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a check of the script)")
    parser.add_argument("--towers", choices=list(TOWERS), default="base",
                        help="base: ViT-B/16 + BERT-base; tiny: timm's test_vit + a 2-layer BERT (a CPU check)")
    parser.add_argument("--batch-size", type=int, default=512, help="image-caption pairs per step; halved until it fits")
    parser.add_argument("--tokens", type=int, default=77, help="tokens per caption (open_clip's context length)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS, metavar="VARIANT",
                        help="variants to run, in this order: " + ", ".join(f"'{v}'" for v in VARIANTS))
    parser.add_argument("--tokenizer", default="minilm-l6",
                        help="where the BERT uncased vocabulary comes from: a text tower alias or a folder (default: the packaged MiniLM)")
    parser.add_argument("--profile", choices=list(VARIANTS), help="also profile this variant (needs --out)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times, interleaved, and keep each one's median step time "
                             "(for a machine shared with other jobs)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per variant and round")
    parser.add_argument("--out", type=Path, help="folder for results.json, table.md and profiles")
    parser.add_argument("--table-from", type=Path, help="print the table of an earlier run's results.json (e.g. one cut short)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--rounds, --steps and --warmup must be at least 1 (the timing starts at the warm-up's last step), "
                     f"not {args.rounds}, {args.steps}, {args.warmup}")
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        print(saved["header"] + "\n\n" + table(saved["rows"], saved["peak"]["peak_flops"]))
        return

    import torch

    started = time.perf_counter()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    peak = run_child("peak", args, 0)
    if "error" in peak:
        raise SystemExit(f"error: measuring the device's peak failed: {peak['error']}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    header = (f"{'ViT-B/16 (224 px) + BERT-base' if args.towers == 'base' else 'tiny test towers'}, random weights, "
              f"{args.tokens} tokens a caption, embed {EMBED_DIM}, {'bf16 autocast' if args.device.startswith('cuda') else 'fp32'}; "
              f"{device_name}, measured matmul peak {peak['peak_flops'] / 1e12:.3g} TFLOP/s; torch {torch.__version__}"
              + (f"; median of {args.rounds} interleaved rounds" if args.rounds > 1 else ""))
    print(header, flush=True)
    variants = []
    for variant in args.only:
        why = missing_peer(variant)
        if why:
            print(f"{variant}: left out, {why}", file=sys.stderr)
        else:
            variants.append(variant)
    rows: dict[str, dict] = {}
    for round_ in range(args.rounds):  # rounds interleave the variants: a slow minute on a shared machine hits them all
        for variant in variants:
            if round_ == 0:
                rows[variant] = measure(variant, args)
            elif "error" not in rows[variant]:
                rows[variant] = merge_round(rows[variant], run_child(variant, args, rows[variant]["batch"], profile=False))
            print(f"{variant}: {rows[variant]}", file=sys.stderr, flush=True)
            if args.out:  # after every variant, so a run cut short keeps what it measured
                (args.out / "results.json").write_text(
                    json.dumps({"header": header, "peak": peak, "rows": list(rows.values())}, indent=2))
    rows = list(rows.values())
    text = table(rows, peak["peak_flops"])
    print()
    print(text)
    by = {r["variant"]: r for r in rows if "error" not in r}
    if "ours" in by and "open_clip" in by:
        print(f"\nours / open_clip images/s: {by['ours']['images_per_s'] / by['open_clip']['images_per_s']:.2f}")
    if "ours" in by and "ours+ckpt" in by:
        print(f"gradient checkpointing: peak memory x{by['ours+ckpt']['peak_gb'] / by['ours']['peak_gb']:.2f}, "
              f"step time x{by['ours+ckpt']['step_s'] / by['ours']['step_s']:.2f}")
    for r in rows:
        if "profile_error" in r:
            print(f"{r['variant']}: the profiler failed: {r['profile_error']}")
        if "kernel_share" in r and args.device.startswith("cuda"):
            print(f"{r['variant']}: GPU kernels busy {r['kernel_share']:.0%} of the profiled steps ({r['profile']})")
        if "syncs_per_step" in r:
            print(f"{r['variant']}: the host waits for the GPU {r['syncs_per_step']:.1f} times a step: {r['sync_sites']}")
    print(f"({(time.perf_counter() - started) / 60:.1f} min for the whole command)")
    if args.out:
        (args.out / "table.md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
