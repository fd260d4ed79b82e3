"""What a person gets for bad inputs: command lines, config values, broken model folders, pasted snippets."""

from __future__ import annotations

import pytest

from data_helpers import load_repo_module
from mmtransfer.cli import parse_args
from mmtransfer.finetune import FinetuneConfig

RECIPE = "configs/openmoji_contrastive.yaml"


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", RECIPE, "train.max_steps=3", "--fast-dev-run", "optim.lr=0.5"],
        ["train.max_steps=3", "--config", RECIPE, "optim.lr=0.5", "--fast-dev-run"],
        ["--fast-dev-run", "train.max_steps=3", "--config", RECIPE, "optim.lr=0.5"],
    ],
)
def test_overrides_and_flags_in_any_order(argv):
    script = load_repo_module("scripts/finetune_captions.py")
    config, args = parse_args(FinetuneConfig, script.__doc__, argv)
    assert args.fast_dev_run and args.config == RECIPE
    assert (config.train.max_steps, config.optim.lr) == (3, 0.5)
