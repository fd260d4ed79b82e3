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


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=-5", "train.max_steps must be at least 1, got -5."),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0."),
        ("train.grad_accum_steps=0", "train.grad_accum_steps must be at least 1, got 0."),
        ("train.log_every=0", "train.log_every must be at least 1, got 0."),
        ("train.seed=-1", "train.seed must be between 0 and 4294967295, got -1."),
        ("optim.lr=-1e-3", "optim.lr must be at least 0, got -0.001."),
        ("optim.betas=[0.9,1.0]", "optim.betas[1] must be at least 0 and less than 1, got 1.0."),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be between 0 and 1, got 1.5."),
        ("model.embed_dim=0", "model.embed_dim must be at least 1, got 0."),
        ("model.init_temperature=.nan", "model.init_temperature must be greater than 0, got nan."),
        ("model.fusion.num_heads=0", "model.fusion.num_heads must be at least 1, got 0."),
        ("model.fusion.dropout=1", "model.fusion.dropout must be at least 0 and less than 1, got 1.0."),
        ("model.text.max_length=0", "model.text.max_length must be at least 1, got 0."),
        ("model.image.image_size=-32", "model.image.image_size must be at least 1, got -32."),
        ("objective.soft_target_temperature=0", "objective.soft_target_temperature must be greater than 0, got 0.0."),
        ("data.eval_batch_size=0", "data.eval_batch_size must be at least 1, got 0."),
        ("data.augment.hflip=2", "data.augment.hflip must be between 0 and 1, got 2.0."),
        ("freeze.text_keep_last=-1", "freeze.text_keep_last must be at least 0, got -1."),
    ],
)
def test_out_of_range_values_fail_as_the_recipe_loads(override, message):
    from mmtransfer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, RECIPE, [override])
    assert str(err.value) == message


def test_out_of_range_values_in_a_yaml_file_and_other_recipes(tmp_path):
    from mmtransfer.adapt import AdaptConfig
    from mmtransfer.classify import ClassifyConfig
    from mmtransfer.config import ConfigError, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=r"^train\.max_steps must be at least 1, got 0\.$"):
        load_config(FinetuneConfig, recipe)
    with pytest.raises(ConfigError, match=r"^data\.shots\[1\] must be at least 1, got 0\.$"):
        load_config(ClassifyConfig, "configs/openmoji_zero_shot.yaml", ["data.shots=[1,0]"])
    with pytest.raises(ConfigError, match=r"^classifier\.dropout must be at least 0 and less than 1, got 1\.5\.$"):
        load_config(AdaptConfig, None, ["classifier.dropout=1.5"])


def test_config_built_in_python_names_its_class():
    from mmtransfer.config import ConfigError, FusionConfig
    from mmtransfer.train import TrainConfig

    with pytest.raises(ConfigError, match=r"^TrainConfig\.max_steps must be at least 1, got 0\.$"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match=r"^FusionConfig\.width must be at least 1, got 0\.$"):
        FusionConfig(width=0)
    assert FusionConfig(width=None).width is None  # unset optional fields pass


def test_script_exits_2_with_one_line_for_a_bad_value(run_script, tmp_path):
    proc = run_script("scripts/finetune_captions.py", "--config", RECIPE, "train.max_steps=-5",
                      f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["finetune_captions.py: error: train.max_steps must be at least 1, got -5."]
    assert not (tmp_path / "run").exists()
