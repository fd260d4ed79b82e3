"""Smoke runs of scripts/domain_adapt.py on each recipe family, the way a user calls it."""

from __future__ import annotations

import json

import pytest


def test_help_lists_config_keys(run_script):
    out = run_script("scripts/domain_adapt.py", "--help").stdout
    for key in ("--fast-dev-run", "method.name", "method.lambda_max", "classifier.lenet.color", "data.target.name", "plot.before"):
        assert key in out, key


def test_impossible_recipe_is_one_clear_line(tmp_path, run_script):
    proc = run_script("scripts/domain_adapt.py", "--config", "configs/emoji_openmoji_noto_dann.yaml", "method.name=cdan",
                f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "class predictions" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fast_dev_run_digits(tmp_path, run_script):
    run = tmp_path / "run"
    out = run_script("scripts/domain_adapt.py", "--config", "configs/digits_mnist_usps_cdan.yaml", "--fast-dev-run",
               f"train.output_dir={run}").stdout
    assert "Accuracy (top-1, %)" in out and "target" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and {"source_acc", "target_acc", "domain_acc"} <= set(summary["metrics"])
    assert (run / "embeddings.png").is_file() and (run / "embeddings_final.npz").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/lambda" in r and "train/domain_acc" in r for r in records)
    assert (run / "model" / "classifier.json").is_file()


@pytest.mark.slow
def test_fast_dev_run_emoji(tmp_path, run_script):
    run = tmp_path / "run"
    out = run_script("scripts/domain_adapt.py", "--config", "configs/emoji_openmoji_noto_dann.yaml", "--fast-dev-run",
               f"train.output_dir={run}", f"data.feature_cache_dir={tmp_path / 'features'}").stdout
    assert "zero-shot top-1" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and {"source_acc", "target_acc"} <= set(summary["metrics"])
    assert (run / "embeddings.png").is_file()
    assert (run / "model" / "model.safetensors").is_file()
