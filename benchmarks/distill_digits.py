"""Distillation benchmark, MNIST-5k -> USPS: a small LeNet student against its DANN teacher, over seeds.

For each seed: the teacher (``digits_mnist_usps_dann``), the small student
trained without a teacher (``digits_mnist_usps_small_source_only``) and with
DANN (``digits_mnist_usps_small_dann``), and the small student distilled from
that seed's teacher on the labelled MNIST and the unlabelled USPS images
(``distill_digits_usps_lenet_small``). Prints USPS (target) accuracy as mean +-
std, the fraction of the teacher's accuracy each student keeps (per seed, then
mean +- std), parameters and FLOPs per image, and minutes per run. Runs go
through the domain benchmark's runner (``benchmarks/domain_digits.py``), one
process at a time; finished runs are reused, and the teacher runs are those of
the domain benchmark when ``--out`` is the same folder.

Examples:
  python benchmarks/distill_digits.py --threads 1                 # seeds 0 1 2, runs/bench_domain
  python benchmarks/distill_digits.py --seeds 0 --out runs/bench_distill
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from domain_digits import ROOT, _stat, run_one  # noqa: E402

TEACHER = "digits_mnist_usps_dann"
# (recipe, script, source-only recipe whose features are drawn as "before")
STUDENTS = [
    ("digits_mnist_usps_small_source_only", "domain_adapt.py", None),
    ("digits_mnist_usps_small_dann", "domain_adapt.py", "digits_mnist_usps_small_source_only"),
    ("distill_digits_usps_lenet_small", "distill.py", "digits_mnist_usps_small_source_only"),
]


def recipe_cost(recipe: str) -> dict[str, int]:
    """Parameters and FLOPs per image of a recipe's classifier (10 classes)."""
    from mmtransfer.config import load_config
    from mmtransfer.models.classifier import BackboneClassifier
    from mmtransfer.objectives.distill import image_cost
    from mmtransfer.recipes.distill import DistillConfig

    cfg = load_config(DistillConfig, ROOT / "configs" / f"{recipe}.yaml")
    cost = image_cost(BackboneClassifier(cfg.classifier, num_classes=10))
    return {"parameters": cost.parameters, "flops": cost.flops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_domain"), help="folder of the runs")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads per run (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides passed to every run")
    args = parser.parse_args()
    out = Path(args.out)

    results: dict[str, list[dict]] = {TEACHER: []}
    results.update({recipe: [] for recipe, _, _ in STUDENTS})
    for seed in args.seeds:
        print(f"{TEACHER} seed {seed}", flush=True)
        teacher = run_one(TEACHER, seed, out, "digits_mnist_usps_source_only", args.threads, args.overrides, args.force)
        results[TEACHER].append({"seed": seed, **teacher["metrics"], "minutes": teacher.get("minutes_total")})
        for recipe, script, baseline in STUDENTS:
            print(f"{recipe} seed {seed}", flush=True)
            extra = list(args.overrides)
            if script == "distill.py":
                extra.append(f"teacher={out / TEACHER / f'seed{seed}' / 'model'}")
            s = run_one(recipe, seed, out, baseline, args.threads, extra, args.force, script=script)
            m = s["metrics"]
            kept = m["target_acc"] / teacher["metrics"]["target_acc"]
            results[recipe].append({"seed": seed, **m, "kept": 100 * kept, "minutes": s.get("minutes_total")})
            print(f"  target {m['target_acc']:.1f} (teacher {teacher['metrics']['target_acc']:.1f}, kept {100 * kept:.1f}%)  "
                  f"{s.get('minutes_total')} min", flush=True)

    teacher_cost = recipe_cost(TEACHER)
    lines = ["| model | recipe | parameters | FLOPs per image | USPS target acc (%) | MNIST source acc (%) | teacher's target acc kept (%) | minutes per run |",
             "|---|---|---:|---:|---|---|---|---|"]
    names = {TEACHER: "teacher: LeNet 20-50-500, DANN", "digits_mnist_usps_small_source_only": "student: LeNet 10-20-100, source only",
             "digits_mnist_usps_small_dann": "student, DANN", "distill_digits_usps_lenet_small": "student, distilled (MNIST + unlabelled USPS)"}
    for recipe, rows in results.items():
        cost = recipe_cost(recipe)
        col = lambda k: _stat([r[k] for r in rows if r.get(k) is not None])  # noqa: E731
        size = f"{cost['parameters']:,}" + ("" if recipe == TEACHER else f" (÷{teacher_cost['parameters'] / cost['parameters']:.1f})")
        flops = f"{cost['flops']:,}" + ("" if recipe == TEACHER else f" (÷{teacher_cost['flops'] / cost['flops']:.1f})")
        kept = "100" if recipe == TEACHER else col("kept")
        lines.append(f"| {names[recipe]} | `{recipe}` | {size} | {flops} | {col('target_acc')} | {col('source_acc')} | {kept} | {col('minutes')} |")
    table = "\n".join(lines)
    print(f"\nMean ± std over seeds {args.seeds}:\n\n{table}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_results.md").write_text(table + "\n")
    (out / "distill_results.json").write_text(json.dumps(results, indent=2))
    if results["distill_digits_usps_lenet_small"]:
        kept = [r["kept"] for r in results["distill_digits_usps_lenet_small"]]
        print(f"\nThe distilled student keeps {statistics.fmean(kept):.1f}% of the teacher's USPS accuracy.")


if __name__ == "__main__":
    main()
