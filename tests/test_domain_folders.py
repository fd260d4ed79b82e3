"""A user's own class folders in a domain recipe: splits they do not have, class names spelt differently."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mmtransfer.assemble.domain_data import align_classes, class_key, match_classes, whole_folder
from mmtransfer.config import ConfigError
from mmtransfer.data import DataConfig, DataError, load


def class_folders(root: Path, names: list[str], per_class: int = 8, seed: int = 0) -> Path:
    """``root/<name>/<i>.png``: 28 px grey images, a bar whose position tells the class."""
    rng = random.Random(seed)
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = Image.new("L", (28, 28), rng.randint(0, 60))
            x = 4 + 8 * (k % 3) + rng.randint(-1, 1)
            ImageDraw.Draw(image).rectangle([x, 4, x + 4, 24], fill=rng.randint(180, 255))
            image.save(root / name / f"{i}.png")
    return root


def test_class_names_match_across_spellings():
    assert class_key("Golden_Retriever") == class_key("golden  retriever") == "golden retriever"
    assert class_key("0") == class_key("Zero") == "zero"
    assert match_classes(["zero", "one", "two"], ["2", "0", "1"], "data.target_test") == [2, 0, 1]
    assert match_classes(["0", "1", "2"], ["one", "two"], "data.target_test") == [1, 2]  # a subset of the classes
    assert match_classes(["Cat", "cat"], ["cat"], "data.target_test") == [1]  # an equal name wins over a key


@pytest.mark.parametrize("source, other, problem", [
    (["zero", "one"], ["0", "bird"], "'bird'] match no source class"),
    (["0", "zero"], ["ZERO"], "'ZERO'] match several source classes"),
    (["zero", "one"], ["0", "zero"], "'0', 'zero'] match the same source class"),
])
def test_names_that_do_not_match_one_to_one_are_explained(source, other, problem):
    with pytest.raises(ConfigError) as err:
        match_classes(source, other, "data.target_test")
    text = str(err.value)
    assert problem in text and str(source).replace('"', "'") in text and str(other).replace('"', "'") in text
    assert "data.target_test.class_names" in text


def test_target_test_labels_are_renumbered_onto_the_source_classes(tmp_path, caplog):
    source = load(class_folders(tmp_path / "src", ["0", "1", "2"]))
    test = load(class_folders(tmp_path / "test", ["zero", "one", "two"], per_class=2))
    assert test.features["label"].names == ["one", "two", "zero"]  # folders are read in sorted order
    caplog.set_level(logging.INFO, logger="mmtransfer.assemble.domain_data")
    aligned = align_classes(test, source.features["label"].names, "data.target_test")
    assert aligned.features["label"].names == ["0", "1", "2"] and aligned.column_names == test.column_names
    assert aligned["label"] == [1, 1, 2, 2, 0, 0]  # one, one, two, two, zero, zero
    assert "data.target_test: class names matched to the source's: one -> 1, two -> 2, zero -> 0." in caplog.text


def test_a_split_of_a_folder_without_splits_is_ignored_and_logged(tmp_path, caplog):
    plain = class_folders(tmp_path / "plain", ["a", "b"], per_class=1)
    caplog.set_level(logging.INFO, logger="mmtransfer.assemble.domain_data")
    section = whole_folder(DataConfig(name=str(plain), split="test"), "data.target_test")
    assert section.split is None
    assert f"data.target_test: {plain} has no split sub-folders, so split 'test' is ignored" in caplog.text
    assert "data.target_test.split=null" in caplog.text

    split = tmp_path / "split"
    class_folders(split / "train", ["a", "b"], per_class=1)
    kept = DataConfig(name=str(split), split="validation")
    assert whole_folder(kept, "data.target") is kept  # split folders exist: the split is meant, and wrong
    with pytest.raises(DataError, match="no split sub-folder 'validation'.*split: null"):
        load(kept)
    assert whole_folder(DataConfig(name="usps", split="test"), "data.target").split == "test"


def _adapt(run_script, tmp_path: Path, config: str, *overrides: str):
    source = class_folders(tmp_path / "my_source", ["0", "1", "2"])
    target = class_folders(tmp_path / "my_target", ["zero", "one", "two"], seed=1)
    run = tmp_path / "run"
    proc = run_script("scripts/domain_adapt.py", "--config", config, "--fast-dev-run", "train.max_steps=2",
                      f"data.source.name={source}", f"data.target.name={target}", f"data.target_test.name={target}",
                      f"train.output_dir={run}", "plot.enabled=false", *overrides)
    return proc, json.loads((run / "summary.json").read_text())


def test_digits_recipe_runs_on_own_folders(tmp_path, run_script):
    """The MNIST->USPS recipe as it is (split: train / test, classes zero..nine) on folders named 0, 1, 2."""
    proc, summary = _adapt(run_script, tmp_path, "configs/digits_mnist_usps_dann.yaml")
    log = proc.stderr
    assert "data.source: " in log and "split 'train' is ignored" in log and "split 'test' is ignored" in log
    assert "data.target_test: class names matched to the source's: one -> 1, two -> 2, zero -> 0." in log
    assert summary["steps"] == 2 and {"source_acc", "target_acc"} <= set(summary["metrics"])
    assert summary["task_info"]["class_names"] == ["0", "1", "2"]


def test_cpu_folder_recipe_runs(tmp_path, run_script):
    proc, summary = _adapt(run_script, tmp_path, "configs/domain_folders_cpu.yaml")
    assert summary["steps"] == 2 and "target_acc" in summary["metrics"]
    assert "class names matched" in proc.stderr
