"""Two-step smoke runs of every script, the way a user calls them."""

from __future__ import annotations

import json

import pytest


def test_finetune_help_lists_config_keys(run_script):
    out = run_script("scripts/finetune_captions.py", "--help").stdout
    for key in ("--fast-dev-run", "train.max_steps", "optim.lr", "freeze.text_keep_last", "data.train.name", "objective.itm_weight"):
        assert key in out, key


def test_finetune_unknown_key_is_one_clear_line(run_script):
    proc = run_script("scripts/finetune_captions.py", "--config", "configs/openmoji_contrastive.yaml", "train.max_step=3", check=False)
    assert proc.returncode == 2
    assert "Unknown config key 'max_step' in 'train'. Did you mean 'max_steps'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_finetune_missing_data_folder_is_one_clear_line(tmp_path, run_script):
    proc = run_script("scripts/finetune_captions.py", "--config", "configs/openmoji_contrastive.yaml",
                f"data.train.name={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_finetune_fast_dev_run_on_the_default_recipe(tmp_path, run_script):
    out = run_script("scripts/finetune_captions.py", "--config", "configs/openmoji_contrastive.yaml", "--fast-dev-run",
               f"train.output_dir={tmp_path / 'run'}").stdout
    assert "Retrieval (recall@K, %" in out and "mmtransfer.load(" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["feature_cache"] is True
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["augmented_copies"] == 2
    assert set(summary["test_metrics"]) >= {"i2t_R@1", "t2i_R@5"}
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "curves.png").is_file()
    # The printed load snippet opens an image of the run's data.
    assert f"Image.open({str(tmp_path / 'run' / 'example.png')!r})" in out and (tmp_path / "run" / "example.png").is_file()
