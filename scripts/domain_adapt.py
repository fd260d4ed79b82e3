"""Unsupervised domain adaptation from a labelled source domain to an unlabelled target domain.

Image classification (a LeNet-style CNN from scratch, or any timm backbone) with
source-only training, DANN, CDAN, CDAN+E, MK-MMD or CORAL; or a multimodal model
trained on source captions with adaptation of its shared image embedding and
zero-shot evaluation by class names. Reports source and target accuracy, logs
the discriminator's accuracy and the gradient-reversal strength, and writes a
2-D plot of source and target features before and after adaptation.

Importance re-weighting (reweight.method=classifier|kmm) weights the source loss by
p_target(x)/p_source(x), alone or with a domain loss. Several labelled sources
(data.extra_sources) train together for domain generalisation, with a domain loss
across them, and are evaluated on data.target_test, a domain never trained on.

Examples:
  python scripts/domain_adapt.py --config configs/digits_mnist_usps_dann.yaml
  python scripts/domain_adapt.py --config configs/digits_mnist_usps_cdan.yaml train.seed=1 train.output_dir=runs/cdan1
  python scripts/domain_adapt.py --config configs/emoji_openmoji_noto_dann.yaml --fast-dev-run
  python scripts/domain_adapt.py --config configs/digits_mnist_usps_dann_weighted.yaml
  python scripts/domain_adapt.py --config configs/digits_dg_mnist_mnistm_usps_dann.yaml
  accelerate launch --num_processes 2 scripts/domain_adapt.py --config configs/digits_mnist_usps_dann.yaml
"""

from __future__ import annotations

from mmtransfer.cli import parse_args, run_main, setup_logging
from mmtransfer.recipes.adapt import AdaptConfig, run


def main() -> None:
    config, args = parse_args(AdaptConfig, __doc__)
    setup_logging()
    summary = run_main(run, config, args.fast_dev_run)
    if summary is None or "minutes" not in summary:
        return
    print(_report(summary))


def _report(summary: dict) -> str:
    m = summary["metrics"]
    kind = "zero-shot top-1" if summary["task"] == "multimodal" else "top-1"
    lines = ["", f"Method {summary['method']}, {summary['steps']} steps, {summary['minutes']:.1f} min"]
    if len(summary.get("sources") or []) > 1:
        lines.append(f"Sources: {' + '.join(summary['sources'])} (domain generalisation: the target is never trained on)")
    w = summary.get("reweight")
    if w:
        lines.append(f"Importance weights ({w['method']}): min {w['min']:.2f}, max {w['max']:.2f}, "
                     f"effective sample size {w['ess']:.0f} ({100 * w['ess_fraction']:.0f}% of the source)")
    lines.append(f"Accuracy ({kind}, %)")
    for key, label in (("source_acc", "source"), ("target_acc", "target"), ("domain_acc", "domain discriminator")):
        if key in m:
            lines.append(f"  {label:<22}{m[key]:6.1f}")
    lines += ["", f"Run folder: {summary['run_dir']}"]
    if summary.get("embedding_plot"):
        lines.append(f"Embedding plot: {summary['embedding_plot']}")
    if summary.get("model_dir"):
        lines.append(f"Model: {summary['model_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
