"""The digit sets from the data folder ($MMTRANSFER_DATA_DIR), and their errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmtransfer.data import DataError, load

try:
    from data_helpers import shared_cache_dir, shared_data_dir
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import shared_cache_dir, shared_data_dir

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture
def data_dir(monkeypatch, request, tmp_path_factory):
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("The digit archives are absent: set MMTRANSFER_DATA_DIR to the folder with mnist5k.npz, usps.npz, mnist_m.npz")
    monkeypatch.setenv("MMTRANSFER_DATA_DIR", str(folder))  # the code reads the folder through the variable
    monkeypatch.setenv("MMTRANSFER_CACHE_DIR", shared_cache_dir(request, tmp_path_factory))
    return folder


def _check(ds, n: int, mode: str, side: int, name: str) -> None:
    assert len(ds) == n
    assert ds.features["label"].names == DIGITS
    first = ds[0]
    assert first["image"].mode == mode and first["image"].size == (side, side)
    assert first["captions"] == [DIGITS[first["label"]]] and first["domain"] == name
    assert set(ds["label"]) == set(range(10))


@pytest.mark.slow
def test_mnist5k(data_dir):
    ds = load("mnist5k")
    _check(ds, 5000, "L", 28, "mnist5k")
    assert Counter(ds["label"]) == {d: 500 for d in range(10)}
    raw = np.load(data_dir / "mnist5k.npz")
    assert np.array_equal(np.asarray(ds[123]["image"]), raw["images"][123]) and ds[123]["label"] == raw["labels"][123]


@pytest.mark.slow
def test_usps_train_and_test_are_the_same_images(data_dir):
    train, test = load("usps", split="train"), load("usps", split="test")
    _check(train, 9298, "L", 16, "usps")
    _check(test, 9298, "L", 16, "usps")
    assert np.array_equal(np.asarray(train[9000]["image"]), np.asarray(test[9000]["image"]))


@pytest.mark.slow
def test_mnist_m(data_dir):
    train, test = load("mnist_m", split="train"), load("mnist_m", split="test")
    _check(train, 10000, "RGB", 32, "mnist_m")
    _check(test, 9001, "RGB", 32, "mnist_m")
    raw = np.load(data_dir / "mnist_m.npz")
    assert np.array_equal(np.asarray(test[5]["image"]), raw["test_images"][5])


def test_unknown_digit_split(data_dir):
    with pytest.raises(DataError, match="'mnist5k' has no split 'test'; its splits are: train"):
        load("mnist5k", split="test")


def test_no_data_folder_set(monkeypatch, tmp_path):
    monkeypatch.delenv("MMTRANSFER_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="needs usps.npz.*no data folder is set.*MMTRANSFER_DATA_DIR.*data_dir"):
        load("usps", cache_dir=str(tmp_path))


def test_missing_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MMTRANSFER_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="data folder '.*nope' .*MMTRANSFER_DATA_DIR.*does not exist"):
        load("mnist5k", cache_dir=str(tmp_path))


def test_missing_file_names_the_file_the_setting_and_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MMTRANSFER_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load("mnist_m", cache_dir=str(tmp_path))
    text = str(err.value)
    assert str(tmp_path / "mnist_m.npz") in text and "data_dir" in text and "MMTRANSFER_DATA_DIR" in text
    with pytest.raises(DataError, match="from data_dir"):
        load("mnist_m", data_dir=str(tmp_path / "other"), cache_dir=str(tmp_path))
