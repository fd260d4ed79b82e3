"""Domain adaptation benchmark: each recipe over several seeds, as mean +- std.

Runs ``scripts/domain_adapt.py`` once per (recipe, seed), one process at a time,
and prints target accuracy (and source accuracy, discriminator accuracy and
minutes per run) as mean +- std over the seeds. The source-only run of a
seed is run first, and its features are drawn as "before adaptation" in the
adapted runs' embedding plots. Finished runs (with a summary.json) are reused,
so an interrupted benchmark continues where it stopped.

Examples:
  python benchmarks/domain_digits.py                               # MNIST->USPS and MNIST->MNIST-M, seeds 0 1 2
  python benchmarks/domain_digits.py --recipes digits_mnist_usps_source_only digits_mnist_usps_dann --seeds 0
  python benchmarks/domain_digits.py --emoji                       # also OpenMoji->Noto (builds the emoji sets)
  python benchmarks/domain_digits.py --threads 1 --out runs/bench  # one BLAS thread per run (busy shared CPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (recipe, the source-only recipe of the same pair, for "before adaptation" plots)
DIGITS = [
    ("digits_mnist_usps_source_only", None),
    ("digits_mnist_usps_dann", "digits_mnist_usps_source_only"),
    ("digits_mnist_usps_cdan", "digits_mnist_usps_source_only"),
    ("digits_mnist_mnistm_source_only", None),
    ("digits_mnist_mnistm_dann", "digits_mnist_mnistm_source_only"),
]
EMOJI = [
    ("emoji_openmoji_noto_no_adapt", None),
    ("emoji_openmoji_noto_dann", "emoji_openmoji_noto_no_adapt"),
]


def run_one(recipe: str, seed: int, out: Path, baseline: str | None, threads: int | None, extra: list[str], force: bool,
            script: str = "domain_adapt.py") -> dict:
    run_dir = out / recipe / f"seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and not force:
        print(f"  reuse {run_dir}", flush=True)
        return json.loads(summary_path.read_text())
    cmd = [sys.executable, str(ROOT / "scripts" / script), "--config", str(ROOT / "configs" / f"{recipe}.yaml"),
           f"train.seed={seed}", f"train.output_dir={run_dir}", "train.progress_bar=false", "train.resume=null"]
    before = out / baseline / f"seed{seed}" / "embeddings_final.npz" if baseline else None
    if before is not None and before.is_file():
        cmd.append(f"plot.before={before}")
    cmd += extra
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished earlier attempt
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(run_dir.parent / f"seed{seed}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed (exit {proc.returncode}); see {run_dir.parent / f'seed{seed}.log'}")
    summary = json.loads(summary_path.read_text())
    summary.setdefault("minutes_total", round((time.perf_counter() - started) / 60, 2))
    return summary


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def runner_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The options every seed benchmark takes: --seeds, --out, --threads, --force and overrides."""
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(out), help="folder of the runs")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads per run (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides passed to every run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*", help="recipe names from configs/ (default: the digit recipes)")
    parser.add_argument("--emoji", action="store_true", help="also run the OpenMoji -> Noto recipes")
    runner_arguments(parser, ROOT / "runs" / "bench_domain")
    args = parser.parse_args()

    pairs = DIGITS + (EMOJI if args.emoji else [])
    if args.recipes:
        known = dict(DIGITS + EMOJI)
        pairs = [(r, known.get(r)) for r in args.recipes]
    out = Path(args.out)
    rows = []
    for recipe, baseline in pairs:
        results = []
        for seed in args.seeds:
            print(f"{recipe} seed {seed}", flush=True)
            s = run_one(recipe, seed, out, baseline, args.threads, args.overrides, args.force)
            m = s.get("metrics") or {k.split("/", 1)[-1]: v for k, v in s["final_metrics"].items()}
            results.append({"seed": seed, **m, "minutes": s.get("minutes_total"), "train_seconds": s.get("train_seconds_this_session")})
            print(f"  target {m.get('target_acc', float('nan')):.1f}  source {m.get('source_acc', float('nan')):.1f}  "
                  f"{s.get('minutes_total')} min", flush=True)
        rows.append((recipe, results))

    header = "| recipe | target acc (%) | source acc (%) | domain disc. acc (%) | minutes per run |"
    lines = [header, "|---|---|---|---|---|"]
    for recipe, results in rows:
        col = lambda k: _stat([r[k] for r in results if r.get(k) is not None])  # noqa: E731
        lines.append(f"| {recipe} | {col('target_acc')} | {col('source_acc')} | {col('domain_acc')} | {col('minutes')} |")
    table = "\n".join(lines)
    print(f"\nMean ± std over seeds {args.seeds}:\n\n{table}")
    save_results(out, table, {r: res for r, res in rows})


def save_results(out: Path, table: str, results: dict) -> None:
    """Write the markdown table (results.md) and every run's numbers (results.json) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
