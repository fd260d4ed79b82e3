"""Smoke runs of scripts/domain_adapt.py on each recipe family, the way a user calls it."""

from __future__ import annotations

import json

import pytest

try:
    from data_helpers import load_repo_module
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import load_repo_module


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
               f"train.output_dir={run}", f"data.features.folder={tmp_path / 'features'}").stdout
    assert "zero-shot top-1" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and {"source_acc", "target_acc"} <= set(summary["metrics"])
    assert (run / "embeddings.png").is_file()
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fast_dev_run_weighted_digits(tmp_path, run_script):
    run = tmp_path / "run"
    out = run_script("scripts/domain_adapt.py", "--config", "configs/digits_mnist_usps_dann_weighted.yaml", "--fast-dev-run",
                     f"train.output_dir={run}").stdout
    assert "Importance weights" in out and "effective sample size" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reweight"]["method"] == "classifier" and 0 < summary["reweight"]["ess_fraction"] <= 1
    assert (run / "source_weights.safetensors").is_file() and (run / "source_weights.png").is_file()


@pytest.mark.slow
def test_fast_dev_run_domain_generalisation_digits(tmp_path, run_script):
    run = tmp_path / "run"
    out = run_script("scripts/domain_adapt.py", "--config", "configs/digits_dg_mnist_mnistm_usps_dann.yaml", "--fast-dev-run",
                     f"train.output_dir={run}").stdout
    assert "Sources: mnist5k:train + mnist_m:train" in out
    summary = json.loads((run / "summary.json").read_text())
    assert {"source_acc", "target_acc"} <= set(summary["metrics"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/domain_acc" in r for r in records)


SYMBOLA = "/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"


@pytest.mark.slow
def test_render_font_then_generalise_to_it(tmp_path, run_script):
    import os

    if not os.path.isfile(SYMBOLA) or not os.path.isfile("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"):
        pytest.skip("needs Debian's fonts-symbola and fonts-noto-color-emoji")
    folder = tmp_path / "symbola"
    out = run_script("scripts/render_emoji_font.py", SYMBOLA, "--out", str(folder), "--views", "0", "--image-size", "64").stdout
    assert "emoji drawn" in out and (folder / "metadata.jsonl").is_file()
    run = tmp_path / "run"
    out = run_script("scripts/domain_adapt.py", "--config", "configs/emoji_dg_openmoji_noto_symbola_dann.yaml", "--fast-dev-run",
                     f"data.target_test.name={folder}", f"train.output_dir={run}", f"data.features.folder={tmp_path / 'features'}").stdout
    assert "zero-shot top-1" in out
    summary = json.loads((run / "summary.json").read_text())
    assert {"source_acc", "target_acc"} <= set(summary["metrics"])


def test_render_script_missing_font_is_one_line(tmp_path, run_script):
    proc = run_script("scripts/render_emoji_font.py", str(tmp_path / "none.ttf"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_benchmark_refuses_overrides_swallowed_by_recipes(monkeypatch, capsys):
    bench = load_repo_module("benchmarks/domain_digits.py")
    monkeypatch.setattr(bench, "run_one", lambda *a, **k: pytest.fail("no run should start"))
    monkeypatch.setattr("sys.argv", ["domain_digits.py", "--recipes", "digits_mnist_usps_source_only_weighted", "reweight.power=0.5"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2 and "overrides" in capsys.readouterr().err
