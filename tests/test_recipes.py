"""Every recipe in configs/ loads into exactly one script's config: no stale or misspelt keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtransfer.adapt import AdaptConfig
from mmtransfer.classify import ClassifyConfig
from mmtransfer.config import ConfigError, load_config
from mmtransfer.distill import DistillConfig
from mmtransfer.finetune import FinetuneConfig

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_into_one_script_config(path):
    fits = []
    for cls in (FinetuneConfig, ClassifyConfig, AdaptConfig, DistillConfig):
        try:
            cfg = load_config(cls, path)
        except ConfigError:
            continue
        # A distillation recipe is an adaptation recipe plus a teacher: only those name one.
        if cls is not DistillConfig or cfg.teacher is not None:
            fits.append(cls.__name__)
    assert len(fits) == 1, f"{path.name} fits {fits or 'no script config'}"
