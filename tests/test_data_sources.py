"""Every source kind a user already has, read into the standard columns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage

import mmtransfer
from mmtransfer.data import DataConfig, DataError, load, load_with_report

try:
    from data_helpers import caption_folder, save_image, write_csv, write_jsonl
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import caption_folder, save_image, write_csv, write_jsonl


def captions_by_file(ds: Dataset) -> dict[str, list[str]]:
    raw = ds.cast_column("image", Image(decode=False))
    return {row["image"]["path"].rsplit("/", 1)[-1]: row["captions"] for row in raw}


# ----------------------------------------------------------------------------- caption folders and tables


def test_imagefolder_metadata_jsonl_groups_captions(tmp_path):
    root = caption_folder(tmp_path / "imgs", "jsonl")
    ds = load(root)
    assert len(ds) == 3
    assert isinstance(ds.features["image"], Image)
    assert ds.features["captions"] == List(Value("string"))
    caps = captions_by_file(ds)
    assert caps["a.png"] == ["a red square", "a crimson block"]  # two rows for one file
    assert caps["b.png"] == ["a blue square", "navy"]  # a list-valued caption
    assert caps["c.jpg"] == ["green"]
    row = ds[0]
    assert isinstance(row["image"], PILImage.Image) and row["image"].size == (24, 20)
    assert row["domain"] == str(root)
    assert sorted(ds["image_id"]) == [0, 1, 2]


def test_imagefolder_metadata_csv(tmp_path):
    root = caption_folder(tmp_path / "imgs", "csv")
    out = load_with_report(root)
    assert len(out.dataset) == 3
    assert captions_by_file(out.dataset)["b.png"] == ["a blue square", "navy"]
    assert out.report.ok and out.report.num_captions == 5 and out.report.checked_images == 3


def test_caption_table_elsewhere_with_configured_columns(tmp_path):
    images = tmp_path / "pictures"
    save_image(images / "x.png", color=(10, 10, 10))
    save_image(images / "y.png", color=(240, 240, 240))
    table = write_csv(tmp_path / "tables" / "caps.csv", ["picture", "short", "long", "group"], [
        ["x.png", "dark", "a dark square", "night"],
        ["y.png", "light", "a light square", "day"],
    ])
    ds = load(table, image_column="picture", caption_column=["short", "long"], image_root=str(images), domain_column="group")
    assert captions_by_file(ds) == {"x.png": ["dark", "a dark square"], "y.png": ["light", "a light square"]}
    assert ds["domain"] == ["night", "day"]


def test_caption_table_with_labels_and_json_list(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    table = tmp_path / "rows.json"
    table.write_text('[{"image": "a.png", "caption": "cat on a mat", "label": "cat"},'
                     ' {"image": "b.png", "caption": "a dog", "label": "dog"}]')
    ds = load(table)
    assert ds.features["label"] == ClassLabel(names=["cat", "dog"])
    assert ds["label"] == [0, 1]
    ds = load(table, class_names=["dog", "cat"])  # class_names fix the order
    assert ds["label"] == [1, 0]
    labels_only = write_csv(tmp_path / "labels.csv", ["file_name", "label"], [["a.png", "tabby cat"], ["b.png", "dog"]])
    ds = load(labels_only)
    assert ds["captions"] == [["tabby cat"], ["dog"]]  # class names stand in for captions


def test_relative_paths_resolve_against_the_table_folder(tmp_path):
    save_image(tmp_path / "data" / "img" / "p.png")
    write_jsonl(tmp_path / "data" / "caps.jsonl", [{"file_name": "img/p.png", "text": "a picture"}])
    assert len(load(tmp_path / "data" / "caps.jsonl")) == 1


# ----------------------------------------------------------------------------- labelled folders


def test_class_folders(tmp_path):
    for cls, n in (("golden_retriever", 2), ("cat", 3)):
        for i in range(n):
            save_image(tmp_path / "pets" / cls / f"{i}.png")
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image, ignored")
    ds = load(tmp_path / "pets")
    assert ds.features["label"].names == ["cat", "golden retriever"]  # readable names for prompts
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1]
    assert ds[4]["captions"] == ["golden retriever"]


def test_class_folders_with_split_subfolders(tmp_path):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            save_image(tmp_path / "set" / split / cls / "0.png")
    ds = load(tmp_path / "set", split="test")
    assert len(ds) == 2 and ds.features["label"].names == ["a", "b"]
    with pytest.raises(DataError, match="split='test'|split='train'"):
        load(tmp_path / "set")
    with pytest.raises(DataError, match="no split sub-folder 'validation'"):
        load(tmp_path / "set", split="validation")


# ----------------------------------------------------------------------------- saved and hub data sets


def _photos_dataset(tmp_path, n: int = 4) -> Dataset:
    paths = [str(save_image(tmp_path / "src" / f"{i}.png", color=(i * 40, 0, 0))) for i in range(n)]
    return Dataset.from_dict(
        {"img": paths, "sentence": [f"photo {i}" for i in range(n)], "y": [i % 2 for i in range(n)]},
        features=Features({"img": Image(), "sentence": Value("string"), "y": Value("int64")}),
    )


def test_saved_dataset_with_mapped_columns(tmp_path):
    src = _photos_dataset(tmp_path)
    src.save_to_disk(str(tmp_path / "saved"))
    ds = load(tmp_path / "saved", image_column="img", caption_column="sentence", label_column="y", class_names=["even", "odd"])
    assert ds.column_names == ["image", "captions", "label", "domain", "image_id"]
    assert ds[1]["captions"] == ["photo 1"] and ds.features["label"].int2str(ds[1]["label"]) == "odd"
    assert ds[0]["image"].size == (24, 20)


def test_saved_dataset_dict_splits_and_classlabel(tmp_path):
    src = _photos_dataset(tmp_path).cast_column("y", ClassLabel(names=["tabby_cat", "dog"]))
    DatasetDict({"train": src, "test": src.select([0])}).save_to_disk(str(tmp_path / "dd"))
    train = load(tmp_path / "dd", caption_column="sentence", label_column="y")  # image column found by type
    assert len(train) == 4 and train.features["label"].names == ["tabby cat", "dog"]
    assert len(load(tmp_path / "dd", split="test", caption_column="sentence")) == 1
    with pytest.raises(DataError, match="no split 'dev'.*train, test"):
        load(tmp_path / "dd", split="dev")


def test_hub_name_goes_to_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.append((name, config, split))
        return _photos_dataset(tmp_path).rename_column("sentence", "caption")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load("someone/photos", split="validation", hub_config="small", verify="none")
    assert calls == [("someone/photos", "small", "validation")]
    assert ds[2]["captions"] == ["photo 2"]
    assert load("hf:photos", verify="none")["captions"][0] == ["photo 0"]


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="openmoji.*noto-emoji.*mnist5k"):
        load("someone/not-here")


# ----------------------------------------------------------------------------- npz


def test_npz_archives(tmp_path):
    grey = np.arange(5 * 8 * 8, dtype=np.uint8).reshape(5, 8, 8)
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.array([0, 1, 2, 1, 0]))
    ds = load(tmp_path / "grey.npz", class_names=["zero", "one", "two"])
    assert len(ds) == 5 and ds[0]["image"].mode == "L" and ds[0]["image"].size == (8, 8)
    assert np.array_equal(np.asarray(ds[3]["image"]), grey[3])
    assert ds[1]["captions"] == ["one"] and ds["domain"][0] == "grey"

    rgb = np.random.default_rng(0).integers(0, 255, size=(3, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_images=rgb, train_labels=np.array([1, 0, 1]), test_images=rgb[:1], test_labels=np.array([0]))
    ds = load(tmp_path / "rgb.npz", split="train")
    assert ds[0]["image"].mode == "RGB" and np.array_equal(np.asarray(ds[2]["image"]), rgb[2])
    assert len(load(tmp_path / "rgb.npz", split="test")) == 1
    with pytest.raises(DataError, match="pass split"):
        load(tmp_path / "rgb.npz")


# ----------------------------------------------------------------------------- dispatch and options


def test_unknown_builtin_name_lists_the_builtins():
    with pytest.raises(DataError) as err:
        load("openmojii")
    text = str(err.value)
    assert "Did you mean 'openmoji'" in text
    for name in ("openmoji", "noto-emoji", "mnist5k", "usps", "mnist_m"):
        assert name in text


def test_missing_path_lists_the_builtins(tmp_path):
    with pytest.raises(DataError, match="no file or folder.*Built-in sets: openmoji"):
        load(tmp_path / "nowhere" / "captions.csv")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(mmtransfer.ConfigError, match="Unknown config key 'caption_col'.*Did you mean 'caption_column'.*on_bad_sample"):
        load("openmoji", caption_col="text")


def test_bad_option_value():
    with pytest.raises(mmtransfer.ConfigError, match="on_bad_sample.*'error', 'skip'"):
        load("openmoji", on_bad_sample="ignore")


def test_dataconfig_is_a_recipe_section(tmp_path):
    from mmtransfer.config import from_dict

    root = caption_folder(tmp_path / "imgs")
    config = from_dict(DataConfig, {"name": str(root), "on_bad_sample": "skip", "max_samples": 2})
    assert len(load(config)) == 2
    assert len(load({"name": str(root)})) == 3
    assert len(load(config, max_samples=1)) == 1  # keywords override fields


def test_import_is_light():
    code = (
        "import sys, mmtransfer; assert 'mmtransfer.data' not in sys.modules; "
        "import mmtransfer.data; heavy = [m for m in ('torch', 'datasets', 'PIL', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- class selection


def _class_folder(root):
    for cls, n in (("cat", 2), ("dog", 3), ("fox", 1)):
        for i in range(n):
            save_image(root / cls / f"{i}.png", color=(40 * i, 80, 120))
    return root


def test_include_and_exclude_classes_keep_label_ids(tmp_path):
    root = _class_folder(tmp_path / "animals")
    full = load(root)
    names = full.features["label"].names
    only = load(root, include_classes=["dog", "fox"])
    assert only.features["label"].names == names  # ids stay comparable with the full set
    assert sorted(names[y] for y in only["label"]) == ["dog", "dog", "dog", "fox"]
    listed = tmp_path / "held_out.txt"
    listed.write_text("# held out for zero-shot validation\ndog\n\n")
    rest = load(root, exclude_classes=str(listed))
    assert sorted(names[y] for y in rest["label"]) == ["cat", "cat", "fox"]
    both = load(root, include_classes=["dog", "fox"], exclude_classes=["dog"])
    assert [names[y] for y in both["label"]] == ["fox"]


def test_class_selection_errors_name_the_problem(tmp_path):
    root = _class_folder(tmp_path / "animals")
    with pytest.raises(DataError, match=r"include_classes: 1 of 2 names.*'dgo' \(did you mean 'dog'\?\)"):
        load(root, include_classes=["cat", "dgo"])
    with pytest.raises(DataError, match="exclude_classes: 'missing.txt' is not a file"):
        load(root, exclude_classes="missing.txt")
    with pytest.raises(DataError, match="leave no rows"):
        load(root, exclude_classes=["cat", "dog", "fox"])
    with pytest.raises(DataError, match="no label column"):
        load(caption_folder(tmp_path / "captions"), include_classes=["cat"])


def test_class_selection_applies_before_bad_sample_checks(tmp_path):
    root = _class_folder(tmp_path / "animals")
    (root / "fox" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="fox"):
        load(root)
    assert len(load(root, exclude_classes=["fox"])) == 5  # the bad image is in a class left out


# ----------------------------------------------------------------------------- max_samples: first or balanced


def _sorted_by_class(tmp_path, bad: tuple[int, ...] = ()) -> Path:
    """30 rows of each of 10 classes, sorted by class; rows in ``bad`` carry label 99 (outside the list)."""
    labels = np.repeat(np.arange(10), 30)
    labels[list(bad)] = 99
    images = (np.arange(300)[:, None, None] % 256).astype(np.uint8) * np.ones((1, 4, 4), np.uint8)
    np.savez(tmp_path / "sorted.npz", images=images, labels=labels)
    return tmp_path / "sorted.npz"


def test_max_samples_balanced_spreads_over_the_classes_and_repeats(tmp_path):
    path = _sorted_by_class(tmp_path)
    names = [str(i) for i in range(10)]
    first = load(path, class_names=names, max_samples=20)
    assert set(first["label"]) == {0}  # the default is unchanged: the first 20 rows
    balanced = load(path, class_names=names, max_samples=20, sample="balanced")
    assert len(balanced) == 20 and sorted(balanced["label"]) == sorted(list(range(10)) * 2)
    assert any(i % 30 >= 2 for i in balanced["image_id"])  # drawn at random within each class, not its first rows...
    again = load(path, class_names=names, max_samples=20, sample="balanced")
    assert again["image_id"] == balanced["image_id"]  # ...with a fixed seed
    uneven = load(path, class_names=names, max_samples=15, sample="balanced")
    assert sorted(np.bincount(uneven["label"], minlength=10)) == [1] * 5 + [2] * 5


def test_max_samples_balanced_without_labels_takes_the_first_rows(tmp_path):
    root = caption_folder(tmp_path / "imgs")
    assert load(root, max_samples=2, sample="balanced")["image_id"] == [0, 1]


def test_problems_follow_their_rows_into_a_balanced_sample(tmp_path):
    bad = tuple(range(0, 300, 7))  # some rows of every class
    path = _sorted_by_class(tmp_path, bad)
    names = [str(i) for i in range(10)]
    out = load_with_report(path, class_names=names, max_samples=40, sample="balanced", on_bad_sample="skip")
    kept = set(out.dataset["image_id"])
    flagged = {int(p.where.rsplit(" ", 1)[1]) for p in out.report.problems}
    assert flagged and flagged <= set(bad) and not (kept & set(bad))  # every bad sampled row, and only those, left out
    assert len(kept) + out.report.skipped == 40
    assert -1 not in out.dataset["label"]


def test_fast_dev_runs_take_balanced_samples():
    from mmtransfer.assemble import domains
    from mmtransfer.assemble.fast_dev import fast_dev_slice
    from mmtransfer.train import TrainConfig

    section = DataConfig(name="mnist5k", max_samples=1000)
    fast_dev_slice(TrainConfig(), [section, None], 64)
    assert section.max_samples == 64 and section.sample == "balanced"
    cfg = domains.AdaptConfig()
    domains._fast_dev(cfg)
    assert cfg.train.fast_dev_run and cfg.data.source.max_samples == 64 and cfg.data.source.sample == "balanced"
    assert cfg.data.target.sample == "balanced"
