"""The run folder under bad conditions: planted pickles, a torn log, a file in the way, a full disk."""

from __future__ import annotations

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch

from mmtransfer import checkpoint
from mmtransfer.checkpoint import CheckpointError
from mmtransfer.run_folder import RunFolderError, list_checkpoints, prepare_run_folder, read_metrics

try:
    from test_train import _trainer
except ImportError:  # tests/ collected as a package
    from tests.test_train import _trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _plant(folder: Path, name: str, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps(_Payload(marker)))


def test_checkpoints_hold_no_pickles(tmp_path):
    run = _trainer(tmp_path, max_steps=2, save_every=1).fit().run_dir
    files = {p.name for p in list_checkpoints(run)[-1].iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "trainer_state.json", "rng-0.json"} <= files
    assert not [f for f in files if f.endswith(checkpoint.PICKLE_SUFFIXES)], files
    assert json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_planted_pickle_in_a_checkpoint_is_never_loaded(tmp_path, name):
    """A crafted pickle beside a real checkpoint: resuming refuses the folder and the payload never runs."""
    run = _trainer(tmp_path, max_steps=2, save_every=1, keep_last=5).fit().run_dir
    marker = tmp_path / "marker.txt"
    _plant(run / "checkpoints" / "checkpoint-2", name, marker)
    with pytest.raises(CheckpointError, match=f"holds pickle files \\({name}\\).*never unpickles"):
        _trainer(tmp_path, max_steps=4, resume="latest").fit()
    assert not marker.exists()


def test_accelerate_style_checkpoint_is_refused_with_a_clear_error(tmp_path):
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "old" / "checkpoint-3"
    _plant(folder, "custom_checkpoint_0.pkl", marker)
    torch.save({"step": 3}, folder / "optimizer.bin")
    with pytest.raises(CheckpointError, match="older mmtransfer"):
        checkpoint.check_folder(folder)
    assert not marker.exists()


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint.*trainer_state.json"):
        _trainer(tmp_path / "r", max_steps=2, resume=str(tmp_path / "empty")).fit()


def test_truncated_checkpoint_weights_are_named(tmp_path):
    run = _trainer(tmp_path, max_steps=2, save_every=1, keep_last=5).fit().run_dir
    weights = run / "checkpoints" / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors' cannot be read"):
        _trainer(tmp_path, max_steps=4, resume="latest").fit()


# ----------------------------------------------------------------------------- metrics.jsonl


def test_torn_last_line_of_the_log_is_dropped_on_resume(tmp_path, caplog):
    """A kill during a write leaves half a line: the run resumes, says so, and the log is clean afterwards."""
    run = _trainer(tmp_path, max_steps=3, save_every=3).fit().run_dir
    log = run / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "train/lo')  # what a kill mid-write leaves
    with caplog.at_level("WARNING"):
        result = _trainer(tmp_path, max_steps=5, resume="latest").fit()
    assert result.step == 5
    assert "left out 1 unreadable line" in caplog.text
    records, bad = read_metrics(log)
    assert bad == 0
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5]


def test_read_metrics_skips_what_is_not_a_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "a": 1.0}\n[1, 2]\n\xff\xfe\n\n{"step": 2, "a": 2.0}\n{"step": 3')
    records, bad = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2] and bad == 3


# ----------------------------------------------------------------------------- the folder itself


def test_output_path_under_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    with pytest.raises(RunFolderError, match=r"notes.txt/run.*train.output_dir"):
        prepare_run_folder(tmp_path / "notes.txt" / "run")
    with pytest.raises(RunFolderError, match=r"notes.txt.*it is a file"):
        prepare_run_folder(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"


def test_read_only_output_folder_is_one_clear_line():
    target = Path("/proc/mmtransfer-run")  # cannot be created, whoever runs the test
    with pytest.raises(RunFolderError, match="/proc/mmtransfer-run"):
        prepare_run_folder(target)


def test_full_disk_while_checkpointing_leaves_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """ENOSPC in the middle of a checkpoint: one clear error, no half-written folder, resume uses the previous one."""
    trainer = _trainer(tmp_path, max_steps=4, save_every=2, keep_last=5)
    real_save = checkpoint.save

    def save(folder, *args, **kwargs):
        if folder.name.endswith("checkpoint-4"):
            (folder / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", save)
    with pytest.raises(RunFolderError, match="No space left on device.*train.resume=latest"):
        trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(checkpoint, "save", real_save)
    assert _trainer(tmp_path, max_steps=4, resume="latest").fit().step == 4
