"""Zero-shot transfer with the image tower trained every step, against the frozen recipe, on unseen names.

Two arms over the same seeds, each run then scored zero-shot on the 383 OpenMoji names
never seen in training (configs/openmoji_zero_shot.yaml, hub-corrected) and on the same
names drawn by Noto Color Emoji (configs/noto_zero_shot.yaml):

* ``frozen``: configs/openmoji_transfer.yaml as it is (both towers frozen, the image
  features cached once with 2 augmented copies of every image);
* ``trained``: the same recipe with the image tower trained (``freeze.image=false``,
  ``optim.tower_lr``): augmentation is drawn afresh every step and nothing is cached.
  The text tower stays frozen in both arms.

Runs go ``--parallel`` at a time (one GPU holds several of these small runs at once;
on a CPU keep 1). The data sets are built once first, so parallel runs never build
them side by side. Prints mean ± std per arm and writes results.json and table.md.

Usage:
    python benchmarks/full_tower_transfer.py --out runs/full_tower --parallel 6 \\
        --set train.mixed_precision=bf16 train.num_workers=2                      # on a GPU
    python benchmarks/full_tower_transfer.py --out /tmp/full_tower --seeds 0 --fast-dev-run   # a check of the commands
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domain_digits import _stat, run_script  # noqa: E402

EVALS = {"openmoji_unseen": "configs/openmoji_zero_shot.yaml", "noto_unseen": "configs/noto_zero_shot.yaml"}


def arm_overrides(arm: str, tower_lr: float) -> list[str]:
    return [] if arm == "frozen" else ["freeze.image=false", f"optim.tower_lr={tower_lr:g}"]


def timed_run(cmd: list[str], run_dir: Path, log: Path, what: str) -> float:
    """domain_digits.run_script (fresh run folder, output to ``log``), timed; a failure raises RuntimeError naming the log."""
    start = time.perf_counter()
    try:
        run_script(cmd, run_dir, log, None, what)
    except SystemExit as err:  # run_script's exit would end every run of the pool: this run fails alone
        raise RuntimeError(str(err)) from None
    return time.perf_counter() - start


def one_run(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one arm at one seed, then score it zero-shot on each evaluation set."""
    name = f"{arm}_seed{seed}"
    run_dir, logs = args.out / "runs" / name, args.out / "logs"
    dev = ["--fast-dev-run"] if args.fast_dev_run else []
    result: dict = {"arm": arm, "seed": seed}
    try:
        cmd = [sys.executable, "scripts/finetune_captions.py", "--config", "configs/openmoji_transfer.yaml", *dev,
               f"train.seed={seed}", f"train.output_dir={run_dir}", "train.progress_bar=false",
               *arm_overrides(arm, args.tower_lr), *args.set]
        result["train_s"] = timed_run(cmd, run_dir, logs / f"{name}_train.log", f"{name} training")
        for key, config in EVALS.items():
            out = args.out / "runs" / f"{name}_{key}"
            cmd = [sys.executable, "scripts/transfer_classify.py", "--config", config, *dev, f"model={run_dir / 'model'}",
                   f"train.output_dir={out}", "train.progress_bar=false", *args.eval_set]
            result[f"{key}_s"] = timed_run(cmd, out, logs / f"{name}_{key}.log", f"{name} {key}")
            result[key] = json.loads((out / "results.json").read_text())["zero_shot"]["top1"]
    except RuntimeError as err:
        result["error"] = str(err)
    print(f"{name}: {result}", file=sys.stderr, flush=True)
    return result


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = ["| arm | unseen OpenMoji top-1 | Noto top-1 | train min per run | seeds |", "|---|---:|---:|---:|---|"]
    for arm in args.arms:
        rows = [r for r in results if r["arm"] == arm and "error" not in r]
        what = "towers frozen, cached features" if arm == "frozen" else f"image tower trained (tower_lr {args.tower_lr:g})"
        minutes = statistics.mean(r["train_s"] for r in rows) / 60 if rows else float("nan")
        lines.append(f"| {what} | {_stat([r['openmoji_unseen'] for r in rows])} | {_stat([r['noto_unseen'] for r in rows])} "
                     f"| {minutes:.1f} | {','.join(str(r['seed']) for r in rows)} |")
    failed = [r for r in results if "error" in r]
    return "\n".join(lines + [f"\n{r['arm']} seed {r['seed']} failed: {r['error']}" for r in failed])


def prepare_data() -> None:
    """Build (or find) the data sets every run reads, once, before runs start side by side."""
    from mmtransfer.data import load

    for name, split in (("openmoji", "train"), ("openmoji", "unseen"), ("noto-emoji", "unseen")):
        load(name, split=split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, their logs, results.json and table.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=["frozen", "trained"], default=["frozen", "trained"])
    parser.add_argument("--tower-lr", type=float, default=2e-5, help="learning rate of the trained image tower (default 2e-5)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every training run")
    parser.add_argument("--eval-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every zero-shot run")
    parser.add_argument("--fast-dev-run", action="store_true", help="two steps of everything: checks the commands only")
    args = parser.parse_args()

    started = time.perf_counter()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    prepare_data()
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    header = (f"configs/openmoji_transfer.yaml, seeds {args.seeds}, {len(jobs)} runs {args.parallel} at a time"
              f"{', fast dev run' if args.fast_dev_run else ''}; overrides: {' '.join(args.set) or 'none'}")
    results: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        for future in as_completed([pool.submit(one_run, arm, seed, args) for arm, seed in jobs]):
            results.append(future.result())  # written as each run ends, so a run cut short keeps the finished ones
            (args.out / "results.json").write_text(json.dumps({"header": header, "runs": results}, indent=2))
    results.sort(key=lambda r: (args.arms.index(r["arm"]), r["seed"]))
    text = table(results, args)
    print(header + "\n\n" + text)
    print(f"({(time.perf_counter() - started) / 60:.1f} min for the whole command)")
    (args.out / "results.json").write_text(json.dumps({"header": header, "runs": results}, indent=2))
    (args.out / "table.md").write_text(header + "\n\n" + text + "\n")
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
