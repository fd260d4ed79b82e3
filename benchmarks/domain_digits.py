"""Domain adaptation benchmark: each recipe over several seeds, as mean +- std.

Runs ``scripts/domain_adapt.py`` once per (recipe, seed), one process at a time,
and prints target accuracy (and source accuracy, discriminator accuracy,
the importance weights' effective sample size and minutes per run) as mean +-
std over the seeds. The baseline run of a seed is run first, and its features
are drawn as "before adaptation" in the other runs' embedding plots. Finished
runs (with a summary.json) are reused, so an interrupted benchmark continues
where it stopped.

Suites (--suite), one table each:
  adapt      MNIST->USPS and MNIST->MNIST-M source-only, DANN, CDAN (--emoji: also OpenMoji->Noto)
  reweight   MNIST->USPS: importance-weighted source-only against source-only, weighted DANN against DANN
  dg-digits  domain generalisation MNIST-5k + MNIST-M -> USPS: pooled training against invariance objectives
  dg-emoji   domain generalisation OpenMoji + Noto -> Symbola (renders the Symbola folder first; needs fonts-symbola)

Examples:
  python benchmarks/domain_digits.py                               # MNIST->USPS and MNIST->MNIST-M, seeds 0 1 2
  python benchmarks/domain_digits.py --recipes digits_mnist_usps_source_only digits_mnist_usps_dann --seeds 0
  python benchmarks/domain_digits.py --emoji                       # also OpenMoji->Noto (builds the emoji sets)
  python benchmarks/domain_digits.py --threads 1 --out runs/bench  # one BLAS thread per run (busy shared CPUs)
  python benchmarks/domain_digits.py --suite reweight --threads 1
  python benchmarks/domain_digits.py --suite dg-emoji --threads 1
  python benchmarks/domain_digits.py --out runs/bench_power05 --recipes digits_mnist_usps_source_only_weighted -- reweight.power=0.5
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

# (recipe, the source-only recipe of the same pair, for "before adaptation" plots[, extra overrides, row name])
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
# The weighted recipes against themselves with re-weighting off (the same network and schedule).
REWEIGHT = [
    ("digits_mnist_usps_source_only_weighted", None, ["reweight.method=none"], "source_only_unweighted"),
    ("digits_mnist_usps_source_only_weighted", "source_only_unweighted"),
    ("digits_mnist_usps_dann_weighted", "source_only_unweighted", ["reweight.method=none"], "dann_unweighted"),
    ("digits_mnist_usps_dann_weighted", "source_only_unweighted"),
]
DG_DIGITS = [
    ("digits_dg_mnist_mnistm_usps_pooled", None),
    ("digits_dg_mnist_mnistm_usps_dann", "digits_dg_mnist_mnistm_usps_pooled"),
    ("digits_dg_mnist_mnistm_usps_coral", "digits_dg_mnist_mnistm_usps_pooled"),
]
DG_EMOJI = [
    ("emoji_dg_openmoji_noto_symbola_pooled", None),
    ("emoji_dg_openmoji_noto_symbola_dann", "emoji_dg_openmoji_noto_symbola_pooled"),
    ("emoji_dg_openmoji_noto_symbola_coral", "emoji_dg_openmoji_noto_symbola_pooled"),
]
SUITES = {"adapt": DIGITS, "reweight": REWEIGHT, "dg-digits": DG_DIGITS, "dg-emoji": DG_EMOJI}
SYMBOLA = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")
SYMBOLA_FOLDER = ROOT / "data" / "emoji_symbola_unseen"


def ensure_symbola() -> None:
    """The unseen third emoji style of the dg-emoji recipes, rendered once from Debian's Symbola font."""
    if (SYMBOLA_FOLDER / "metadata.jsonl").is_file():
        return
    if not SYMBOLA.is_file():
        raise SystemExit(f"The dg-emoji suite draws its unseen style with Symbola, which is not at {SYMBOLA}: "
                         "apt-get install fonts-symbola (or render another font with scripts/render_emoji_font.py).")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "render_emoji_font.py"), str(SYMBOLA), "--out", str(SYMBOLA_FOLDER)],
                   cwd=ROOT, check=True)


def run_one(recipe: str, seed: int, out: Path, baseline: str | None, threads: int | None, extra: list[str], force: bool,
            name: str | None = None, script: str = "domain_adapt.py") -> dict:
    run_dir = out / (name or recipe) / f"seed{seed}"
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
    started = time.perf_counter()
    run_script(cmd, run_dir, run_dir.parent / f"seed{seed}.log", threads, f"{name or recipe} seed {seed}")
    summary = json.loads(summary_path.read_text())
    summary.setdefault("minutes_total", round((time.perf_counter() - started) / 60, 2))
    return summary


def run_script(cmd: list[str], run_dir: Path, log_path: Path, threads: int | None, what: str) -> None:
    """Run one script into a fresh ``run_dir`` (an unfinished earlier attempt is removed), output to ``log_path``."""
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); see {log_path}")


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
    parser.add_argument("--suite", choices=sorted(SUITES), default="adapt", help="which table to make (default: adapt)")
    parser.add_argument("--recipes", nargs="*", help="recipe names from configs/ (default: the suite's recipes)")
    parser.add_argument("--emoji", action="store_true", help="also run the OpenMoji -> Noto recipes")
    runner_arguments(parser, ROOT / "runs" / "bench_domain")
    args = parser.parse_args()
    if any("=" in r for r in args.recipes or []):
        # --recipes takes every word after it: "--recipes r key=value" would run a recipe named "key=value".
        parser.error("key=value overrides after --recipes are read as recipe names: put them before --recipes or after --.")

    entries = [tuple(e) + (None,) * (4 - len(e)) for e in SUITES[args.suite] + (EMOJI if args.emoji else [])]
    if args.recipes:
        known = {e[0]: e[1] for suite in [*SUITES.values(), EMOJI] for e in suite}
        entries = [(r, known.get(r), None, None) for r in args.recipes]
    if any(e[0].startswith("emoji_dg_") for e in entries):
        ensure_symbola()
    out = Path(args.out)
    rows = []
    for recipe, baseline, extra, name in entries:
        results = []
        label = name or recipe
        for seed in args.seeds:
            print(f"{label} seed {seed}", flush=True)
            s = run_one(recipe, seed, out, baseline, args.threads, list(extra or []) + args.overrides, args.force, name)
            m = s.get("metrics") or {k.split("/", 1)[-1]: v for k, v in s["final_metrics"].items()}
            ess = (s.get("reweight") or {}).get("ess_fraction")
            results.append({"seed": seed, **m, "ess_percent": None if ess is None else 100 * ess,
                            "minutes": s.get("minutes_total"), "train_seconds": s.get("train_seconds_this_session")})
            print(f"  target {m.get('target_acc', float('nan')):.1f}  source {m.get('source_acc', float('nan')):.1f}  "
                  f"{s.get('minutes_total')} min", flush=True)
        rows.append((label, results))

    header = "| recipe | target acc (%) | source acc (%) | domain disc. acc (%) | weights' ESS (% of rows) | minutes per run |"
    lines = [header, "|---|---|---|---|---|---|"]
    for recipe, results in rows:
        col = lambda k: _stat([r[k] for r in results if r.get(k) is not None])  # noqa: E731
        lines.append(f"| {recipe} | {col('target_acc')} | {col('source_acc')} | {col('domain_acc')} | {col('ess_percent')} | {col('minutes')} |")
    table = "\n".join(lines)
    print(f"\nMean ± std over seeds {args.seeds}:\n\n{table}")
    name = "results" if args.suite == "adapt" and not args.recipes else f"results-{args.suite if not args.recipes else 'recipes'}"
    save_results(out, table, {r: res for r, res in rows}, name)


def save_results(out: Path, table: str, results: dict, name: str = "results") -> None:
    """Write the markdown table (<name>.md) and every run's numbers (<name>.json) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
