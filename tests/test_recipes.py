"""Every recipe in configs/ loads into exactly one script's config: no stale or misspelt keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmtransfer.assemble.captions import FinetuneConfig, MultitaskConfig
from mmtransfer.assemble.domains import AdaptConfig
from mmtransfer.config import ConfigError, load_config
from mmtransfer.recipes.classify import ClassifyConfig
from mmtransfer.recipes.distill import DistillConfig

try:
    from data_helpers import load_repo_module
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import load_repo_module

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_into_one_script_config(path):
    from mmtransfer.config import load_yaml

    fits = []
    for cls in (FinetuneConfig, MultitaskConfig, ClassifyConfig, AdaptConfig, DistillConfig):
        try:
            cfg = load_config(cls, path)
        except ConfigError:
            continue
        # A distillation recipe is an adaptation recipe plus a teacher, a multi-task recipe a caption
        # recipe plus tasks: only those name one.
        if cls is DistillConfig and cfg.teacher is None or cls is MultitaskConfig and "tasks" not in load_yaml(path):
            continue
        fits.append(cls.__name__)
    assert len(fits) == 1, f"{path.name} fits {fits or 'no script config'}"


BENCH = load_repo_module("benchmarks/zero_shot_selection.py")


@pytest.mark.parametrize("variant", list(BENCH.VARIANTS))
def test_zero_shot_selection_variants_are_valid_overrides(variant):
    """Each benchmark variant loads onto its recipe (a misspelt key would fail only after minutes of caching)."""
    recipe = Path(BENCH.ROOT) / "configs" / f"{BENCH.RECIPE}.yaml"
    cfg = load_config(FinetuneConfig, recipe, BENCH.VARIANTS[variant])
    if variant == "frozen_linear":
        assert cfg.model.image_projection == "linear" and cfg.data.augmented_copies == 0
        assert not cfg.data.augment.enabled and cfg.data.caption_templates is None
