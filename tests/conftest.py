"""Shared fixtures. Tests run offline: hub names must never be fetched."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Digits are never downloaded in tests (the download tests replace the downloaders and unset it).
os.environ.setdefault("MMTRANSFER_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "MMTRANSFER_DATA_DIR" not in os.environ and _shared.is_dir():
    os.environ["MMTRANSFER_DATA_DIR"] = str(_shared)


@pytest.fixture
def fresh_accelerator_state():
    """Reset Accelerate's process-wide state after the test, so the next one builds its own."""
    from accelerate.state import AcceleratorState, PartialState

    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random preset (2-layer BERT, 2-layer ViT at 32 px), in eval mode."""
    import torch

    import mmtransfer

    torch.manual_seed(0)
    return mmtransfer.create_model("tiny-random").eval()


@pytest.fixture(scope="session")
def default_model():
    """The offline default preset with its real packaged weights, in eval mode."""
    import mmtransfer

    return mmtransfer.create_model(mmtransfer.DEFAULT_PRESET).eval()


@pytest.fixture(scope="session")
def sample_photos():
    """scikit-learn's two real photos (a Chinese palace, a flower) as PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(im) for im in load_sample_images().images]


@pytest.fixture(scope="session")
def run_script():
    """Run ``python <args>`` from the project root, offline, the way a user would; fail with its output."""

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return run
