"""Fine-tune a text tower and an image tower on captioned images, alone or with other tasks.

Contrastive alignment in the shared space plus image-text matching through the
fusion layer, on any captioned data the data layer reads (the built-in
openmoji set by default). Reports image->text and text->image recall@1/5/10 on
the validation and test splits and exports the model for mmtransfer.load.

With a `tasks` section (configs/multitask_*.yaml) the run is multi-task: captions,
a classification head on labelled images and a domain loss on unlabelled target
images train together, each with its share of every step's images and its loss
weight (fixed, or learned by uncertainty weighting); every task is evaluated.

Examples:
  python scripts/finetune_captions.py --config configs/openmoji_contrastive.yaml
  python scripts/finetune_captions.py --config configs/openmoji_contrastive.yaml train.max_steps=100 optim.lr=5e-4
  python scripts/finetune_captions.py --config configs/openmoji_contrastive.yaml --fast-dev-run
  accelerate launch --num_processes 2 scripts/finetune_captions.py --config configs/openmoji_contrastive.yaml
  python scripts/finetune_captions.py --config configs/multitask_openmoji_joint.yaml tasks.weighting=uncertainty
"""

from __future__ import annotations


from mmtransfer.cli import parse_args, run_main
from mmtransfer.finetune import FinetuneConfig, example_image_code, run
from mmtransfer.train import setup_logging


def main() -> None:
    config, args = parse_args(FinetuneConfig, __doc__)
    setup_logging()
    summary = run_main(run, config, args.fast_dev_run)
    if summary is None:
        return
    if "tasks" in summary:
        from mmtransfer.multitask import format_report

        print(format_report(summary))
        return
    print(_report(summary))


def _report(summary: dict) -> str:
    lines = ["", "Retrieval (recall@K, %; +ITM: top candidates re-ranked by the fusion layer)", f"{'split':<12}{'i2t R@1':>9}{'i2t R@5':>9}{'i2t R@10':>10}{'t2i R@1':>9}{'t2i R@5':>9}{'t2i R@10':>10}"]
    cols = (("i2t_R@1", 9), ("i2t_R@5", 9), ("i2t_R@10", 10), ("t2i_R@1", 9), ("t2i_R@5", 9), ("t2i_R@10", 10))
    for name, metrics in (("validation", summary["validation"]), ("test", summary["test"])):
        m = {k.split("/")[-1]: v for k, v in metrics.items()}
        for prefix, label in (("", name), ("itm_", f"{name}+ITM")):
            if any(k.startswith(prefix) and (prefix or not k.startswith("itm_")) for k in m):
                lines.append(f"{label:<12}" + "".join(f"{m.get(prefix + k, float('nan')):>{w}.1f}" for k, w in cols))
    image, note = example_image_code(summary)
    lines += ["", f"Run folder: {summary['run_dir']}", f"Model:      {summary['model_dir']}", "",
              "Load it and embed an image:",
              "  import mmtransfer",
              "  from PIL import Image",
              f"  model = mmtransfer.load({summary['model_dir']!r})",
              f"  emb = model.encode_image([Image.open({image})]){note}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
