"""Multi-task benchmark: joint captions + labels against each single task, over several seeds.

Runs ``scripts/finetune_captions.py --config configs/multitask_openmoji.yaml`` once per
(variant, seed), one process at a time (through the domain benchmark's runner, so
finished runs are reused and an interrupted benchmark continues), and prints every
variant's caption and label metrics as mean +- std over the seeds:

- caption retrieval, test i2t / t2i R@1 on held-out views (1,531 seen classes);
- labels, test top-1 / top-5 over the 1,531 seen classes: by the label head where one
  trains, and by the class names (nearest name embedding) in every run;
- zero-shot top-1 / top-5 over the 383 unseen class names.

Examples:
  python benchmarks/multitask_openmoji.py --threads 1                       # every variant, seeds 0 1 2
  python benchmarks/multitask_openmoji.py --variants joint joint_uncertainty --seeds 0
  python benchmarks/multitask_openmoji.py --threads 1 train.max_steps=500   # overrides go to every run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from domain_digits import _stat, run_one, runner_arguments, save_results  # noqa: E402

RECIPE = "multitask_openmoji"
# variant -> overrides of the recipe (all 2,000 steps; 64 images a step unless noted)
VARIANTS = {
    "captions": ["tasks.labels.enabled=false"],  # 64 captioned images a step
    "labels": ["tasks.captions.enabled=false"],  # 64 labelled images a step
    "joint": [],  # 32 + 32
    "joint_uncertainty": ["tasks.weighting=uncertainty"],
    # twice the images per step: each task gets the full 64 of the single-task runs
    "joint_full": ["train.batch_size=128"],
    # a randomly initialised head: the label task no longer starts from the class names' text embeddings
    "labels_random_head": ["tasks.captions.enabled=false", "tasks.labels.head_init=random"],
    "joint_random_head": ["tasks.labels.head_init=random"],
}
# Label metrics by the head, and by class names (nearest name embedding; the only label metric of a
# run without a head). With the recipe's plain "{}" template and one caption per test image, which is
# its class name, names top-1/top-5 equal i2t R@1/R@5.
COLUMNS = [("i2t R@1", "captions/i2t_R@1"), ("t2i R@1", "captions/t2i_R@1"), ("head top-1", "labels/top1"),
           ("head top-5", "labels/top5"), ("names top-1", "labels/names_top1"), ("names top-5", "labels/names_top5"),
           ("unseen top-1", "zero_shot/top1"), ("unseen top-5", "zero_shot/top5")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    runner_arguments(parser, ROOT / "runs" / "bench_multitask")
    args = parser.parse_args()

    out = Path(args.out)
    rows = []
    for variant in args.variants:
        results = []
        for seed in args.seeds:
            print(f"{variant} seed {seed}", flush=True)
            s = run_one(RECIPE, seed, out / variant, None, args.threads, VARIANTS[variant] + args.overrides, args.force,
                        script="finetune_captions.py")
            m = s["test_metrics"]
            results.append({"seed": seed, **m, "minutes": s.get("minutes_total"), "log_vars": s.get("final_log_vars")})
            print("  " + "  ".join(f"{name} {m[key]:.1f}" for name, key in COLUMNS if key in m) + f"  {s.get('minutes_total')} min", flush=True)
        rows.append((variant, results))

    header = "| variant | " + " | ".join(name for name, _ in COLUMNS) + " | minutes per run |"
    lines = [header, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for variant, results in rows:
        cols = [_stat([r[key] for r in results if key in r]) for _, key in COLUMNS]
        lines.append(f"| {variant} | " + " | ".join(cols) + f" | {_stat([r['minutes'] for r in results if r.get('minutes')])} |")
    table = "\n".join(lines)
    print(f"\nTest metrics in %, mean ± std over seeds {args.seeds}:\n\n{table}")
    save_results(out, table, {v: r for v, r in rows})


if __name__ == "__main__":
    main()
