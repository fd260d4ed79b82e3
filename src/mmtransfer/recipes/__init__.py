"""Recipes: a config in, a trained and evaluated run out.

Each module reads its config, builds the run through :mod:`mmtransfer.assemble`,
hands it to :class:`mmtransfer.train.Trainer` and reports. Recipes never import
one another; the scripts in ``scripts/`` call them.

    captions   contrastive + matching fine-tuning on captioned images
    multitask  captions, labels and a domain loss in one run
    classify   zero-shot, few-shot, linear probe, fine-tuning, LP-FT, WiSE-FT
    adapt      domain adaptation (DANN, CDAN, MMD, CORAL), re-weighting, several sources
    distill    knowledge distillation from a saved teacher
"""
