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
  python scripts/finetune_captions.py --config configs/multitask_openmoji.yaml tasks.weighting=uncertainty
"""

from __future__ import annotations

from mmtransfer.cli import parse_args, run_main, setup_logging
from mmtransfer.recipes import captions, multitask
from mmtransfer.recipes.captions import FinetuneConfig
from mmtransfer.recipes.multitask import MultitaskConfig


def main() -> None:
    config, args = parse_args(FinetuneConfig, __doc__, extended=("tasks", MultitaskConfig))
    setup_logging()
    if isinstance(config, MultitaskConfig):  # a recipe with a tasks section
        summary = run_main(multitask.run, config, args.fast_dev_run)
        if summary is not None:
            print(multitask.format_report(summary))
        return
    summary = run_main(captions.run, config, args.fast_dev_run)
    if summary is not None:
        print(captions.format_report(summary))


if __name__ == "__main__":
    main()
