"""Knowledge distillation: a trained teacher (loaded by mmtransfer.load) teaches a cheaper student.

An image-classifier student (e.g. a LeNet with fewer channels) learns from the
labelled source images and from a classifier teacher's softened class
probabilities (KL with temperature, times T^2) and/or its features (cosine or
MSE), on labelled and unlabelled images, e.g. the unlabelled target domain of
a domain-adaptation run. A multimodal student (a cheaper image tower) learns a
multimodal teacher's shared image embedding. Reports the student's accuracy,
the teacher's, the fraction the student keeps, and both models' parameters
and FLOPs per image.

Examples:
  python scripts/domain_adapt.py --config configs/digits_mnist_usps_dann.yaml            # the teacher
  python scripts/distill.py --config configs/distill_digits_usps_lenet_small.yaml \\
      teacher=runs/digits_mnist_usps_dann/model
  python scripts/distill.py --config configs/distill_emoji_lite0_80px.yaml --fast-dev-run
  accelerate launch --num_processes 2 scripts/distill.py --config configs/distill_digits_usps_lenet_small.yaml
"""

from __future__ import annotations

from mmtransfer.cli import parse_args, run_main, setup_logging
from mmtransfer.recipes.distill import DistillConfig, run


def main() -> None:
    config, args = parse_args(DistillConfig, __doc__)
    setup_logging()
    summary = run_main(run, config, args.fast_dev_run)
    if summary is None or "minutes" not in summary:
        return
    print(_report(summary))


def _report(summary: dict) -> str:
    m, t, s = summary["metrics"], summary["teacher"], summary["student"]
    ratio = summary["student_over_teacher"]
    kind = "zero-shot top-1" if summary["task"] == "multimodal" else "top-1"
    lines = ["", f"Distilled {summary['steps']} steps, {summary['minutes']:.1f} min",
             f"{'':<12}{'parameters':>14}{'FLOPs/image':>16}",
             f"{'teacher':<12}{t['parameters']:>14,}{t['flops']:>16,}",
             f"{'student':<12}{s['parameters']:>14,}{s['flops']:>16,}",
             f"{'student/teacher':<16}{ratio['parameters']:>10.3f}{ratio['flops']:>16.3f}",
             "", f"Accuracy ({kind}, %){'':<4}student  teacher  kept"]
    for key, label in (("source_acc", "source"), ("target_acc", "target")):
        if key in m:
            teacher = t["metrics"].get(key)
            kept = ratio.get(key)
            line = f"  {label:<22}{m[key]:6.1f}  " + (f"{teacher:7.1f}" if teacher is not None else "      -")
            lines.append(line + (f"  {100 * kept:4.1f}%" if kept is not None else ""))
    lines += ["", f"Run folder: {summary['run_dir']}"]
    if summary.get("model_dir"):
        lines.append(f"Student: {summary['model_dir']}  (mmtransfer.load)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
