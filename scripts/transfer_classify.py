"""Classify images with language: zero-shot from class names, text-initialised heads, few-shot, LP-FT, WiSE-FT.

Takes a model trained by finetune_captions.py (or any preset) and a labelled
dataset; class names come from a file or from the dataset's label names.
Writes results.json, results.md (per-class table) and confusion.png.

Examples:
  python scripts/transfer_classify.py --config configs/openmoji_zero_shot.yaml
  python scripts/transfer_classify.py --config configs/mnist_m_few_shot.yaml data.shots=[1,2,4,8] method.seeds=[0,1,2,3,4]
  python scripts/transfer_classify.py --config configs/openmoji_zero_shot.yaml method.mode=wise-ft --fast-dev-run
"""

from __future__ import annotations

from mmtransfer.cli import parse_args, run_main, setup_logging
from mmtransfer.recipes.classify import ClassifyConfig, run


def main() -> None:
    config, args = parse_args(ClassifyConfig, __doc__)
    setup_logging()
    results = run_main(run, config, args.fast_dev_run)
    if results is None:  # not the main process
        return
    z = results["zero_shot"]
    print(f"\n{results['classes']} classes, {results['test_images']} test images (chance {results['chance_top1']:.2f}%)")
    print(f"zero-shot          top-1 {z['top1']:6.2f}   top-5 {z.get('top5', float('nan')):6.2f}   macro-F1 {z['macro_f1']:6.2f}")
    for key, d in results.get("runs", {}).items():
        top1, top5 = d["top1"], d.get("top5", (float("nan"), 0.0))
        print(f"{key:<18} top-1 {top1[0]:6.2f} ± {top1[1]:.2f}   top-5 {top5[0]:6.2f} ± {top5[1]:.2f}")
    print(f"\nResults: {results['run_dir']}/results.md, confusion.png")


if __name__ == "__main__":
    main()
