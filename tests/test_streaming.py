"""Caption data bigger than memory: WebDataset and Parquet shards streamed into training.

Small shards are written on the fly from tiny generated images; processes are simulated
by building each rank's stream with an explicit (rank, world_size), DataLoader workers are real.
"""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mmtransfer import data
from mmtransfer.data import DataError, ShardStream, StreamLoader

try:
    from data_helpers import REPO, save_image, write_jsonl
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import REPO, save_image, write_jsonl

N = 40  # images in the source folder


def caption_folder(root: Path, n: int = N, captions_per_image: int = 2) -> Path:
    rows = []
    for i in range(n):
        save_image(root / f"{i:03d}.png", color=(6 * i, 255 - 6 * i, (37 * i) % 256))
        rows.append({"file_name": f"{i:03d}.png", "text": [f"colour {i}", f"shade {i}"][:captions_per_image]})
    write_jsonl(root / "metadata.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """The folder, and its 40 samples as 8 WebDataset and 8 Parquet shards of 5."""
    root = tmp_path_factory.mktemp("streaming")
    folder = caption_folder(root / "src")
    ds = data.load(str(folder))
    data.write_shards(ds, root / "wds", samples_per_shard=5)
    data.write_shards(ds, root / "parquet", samples_per_shard=5, format="parquet")
    return {"folder": folder, "wds": root / "wds", "parquet": root / "parquet"}


def name_of(shards: dict[str, Path], kind: str) -> str:
    return f"{kind}:{shards[kind]}"


def keys_of(rows: list[dict]) -> dict:
    """A collate_fn for tests (module level: DataLoader workers pickle it)."""
    return {"keys": [r["__key__"] for r in rows], "image_index": torch.tensor([r["image_id"] for r in rows])}


def stream_keys(name: str, rank: int, world: int, workers: int, **kw) -> list[str]:
    stream = ShardStream(name, num_workers=workers, rank=rank, world_size=world, **kw)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [sample["__key__"] for sample in loader]


# ----------------------------------------------------------------------------- the slot rule


@pytest.mark.parametrize("kind", ["wds", "parquet"])
@pytest.mark.parametrize("epoch", [0, 1])
def test_every_sample_once_across_two_processes_and_two_workers(shards, kind, epoch):
    seen = collections.Counter()
    for rank in range(2):
        stream = ShardStream(name_of(shards, kind), num_workers=2, rank=rank, world_size=2, shuffle_buffer=4)
        stream.set_epoch(epoch)
        for sample in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2):
            seen[sample["__key__"]] += 1
            assert sample["image"].mode == "RGB" and sample["captions"] == [f"colour {int(sample['__key__'])}",
                                                                           f"shade {int(sample['__key__'])}"]
    assert sorted(seen) == [f"{i:09d}" for i in range(N)] and set(seen.values()) == {1}


def test_batches_are_equal_in_number_on_every_process_and_never_repeat(tmp_path):
    """43 samples in 9 shards (8 of 5, 1 of 3) over 2 processes x 2 workers, batches of 2: the same
    number of steps everywhere, no sample twice, and only tails and the longer process's extra left out."""
    ds = data.load(str(caption_folder(tmp_path / "src", n=43)))
    data.write_shards(ds, tmp_path / "wds", samples_per_shard=5)
    seen = collections.Counter()
    steps = []
    for rank in range(2):
        stream = ShardStream(f"wds:{tmp_path / 'wds'}", num_workers=2, rank=rank, world_size=2, batch_size=2, collate_fn=keys_of)
        loader = StreamLoader(stream)
        batches = list(loader)
        steps.append((len(batches), len(loader)))
        seen.update(k for b in batches for k in b["keys"])
    assert steps[0] == steps[1] and steps[0][0] == steps[0][1] > 0
    assert set(seen.values()) == {1}
    # Left out: per worker a tail of at most one sample (odd counts), and the longer process's extra shard(s) beyond the shorter's.
    assert 43 - len(seen) <= 4 + 10, len(seen)


def test_fewer_shards_than_slots_says_how_many_to_write(shards):
    with pytest.raises(DataError) as err:
        ShardStream(name_of(shards, "wds"), num_workers=3, rank=0, world_size=3)
    message = str(err.value)
    assert "8 shard(s) for 3 process(es) x 3 DataLoader worker(s) = 9 slots" in message
    assert "write at least 9 shards" in message and "scripts/write_shards.py" in message and "train.num_workers" in message


def test_shuffle_changes_the_order_between_epochs_and_seeds_but_not_the_set(shards):
    name = name_of(shards, "wds")

    def order(seed: int, epoch: int, buffer: int = 8) -> list[str]:
        stream = ShardStream(name, rank=0, world_size=1, seed=seed, shuffle_buffer=buffer)
        stream.set_epoch(epoch)
        return [s["__key__"] for s in stream]

    base = order(0, 0)
    assert order(0, 0) == base  # seeded: repeatable
    for other in (order(0, 1), order(1, 0)):
        assert other != base and sorted(other) == sorted(base) == [f"{i:09d}" for i in range(N)]
    # The buffer mixes shards: a buffer of 8 takes samples out of file order, shard order alone does not.
    unbuffered = order(0, 0, buffer=0)
    assert all(int(a) // 5 == int(b) // 5 for a, b in zip(unbuffered[::5], unbuffered[4::5]))  # whole shards in a row
    assert base != unbuffered


def test_brace_ranges_globs_and_missing_shards(shards):
    folder = shards["wds"]
    assert len(ShardStream(f"wds:{folder}/shard-{{000000..000003}}.tar", rank=0, world_size=1).paths) == 4
    assert len(ShardStream(f"wds:{folder}/shard-00000[0-5].tar", rank=0, world_size=1).paths) == 6
    with pytest.raises(DataError, match="2 shard\\(s\\) do not exist"):
        ShardStream(f"wds:{folder}/shard-{{000006..000009}}.tar", rank=0, world_size=1)
    with pytest.raises(DataError, match="not wds shards"):
        ShardStream(f"wds:{shards['parquet']}/*", rank=0, world_size=1)


def test_a_stream_outside_caption_training_is_explained(shards):
    with pytest.raises(DataError, match="only data.train of scripts/finetune_captions.py"):
        data.load(name_of(shards, "wds"))


# ----------------------------------------------------------------------------- bad samples


def _png(color=(10, 20, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (12, 10), color).save(out, format="PNG")
    return out.getvalue()


def _truncated_png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(out, format="PNG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def bad_shards(folder: Path) -> Path:
    """Two shards: the first with a truncated image (k02), a sample without caption (k03) and a caption without image (k04)."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "bad-0.tar", "w") as tar:
        _add(tar, "k01.png", _png())
        _add(tar, "k01.txt", b"good one")
        _add(tar, "k02.png", _truncated_png())
        _add(tar, "k02.txt", b"truncated image")
        _add(tar, "k03.png", _png())
        _add(tar, "k04.txt", b"caption without image")
        _add(tar, "../../k05.png", _png((1, 2, 3)))  # a name that would escape on extraction: only a key here
        _add(tar, "../../k05.json", json.dumps({"caption": "escaping name"}).encode())
    with tarfile.open(folder / "bad-1.tar", "w") as tar:
        for i in range(3):
            _add(tar, f"m{i}.png", _png((i, i, i)))
            _add(tar, f"m{i}.json", json.dumps({"captions": [f"fine {i}", "two"]}).encode())
    return folder


def test_bad_samples_are_skipped_and_counted(tmp_path):
    name = f"wds:{bad_shards(tmp_path / 'bad')}"
    stream = ShardStream(data.DataConfig(name=name, on_bad_sample="skip"), rank=0, world_size=1, shuffle_buffer=0)
    samples = {s["__key__"]: s["captions"] for s in stream}
    assert samples == {"k01": ["good one"], "../../k05": ["escaping name"], **{f"m{i}": [f"fine {i}", "two"] for i in range(3)}}
    assert not (tmp_path / "k05.png").exists() and not (tmp_path.parent / "k05.png").exists()

    loader = StreamLoader(ShardStream(data.DataConfig(name=name, on_bad_sample="skip"), rank=0, world_size=1,
                                      batch_size=1, collate_fn=keys_of, num_workers=2))
    assert sum(len(b["keys"]) for b in loader) == len(loader)
    assert loader.report["skipped"] == 3
    problems = "\n".join(loader.report["problems"])
    for key, reason in (("k02", "truncated"), ("k03", "no caption"), ("k04", "no image member")):
        assert f"bad-0.tar key {key}: " in problems and reason in problems, problems


@pytest.mark.parametrize("workers", [0, 2])
def test_error_policy_names_the_shard_and_the_key(tmp_path, workers):
    name = f"wds:{bad_shards(tmp_path / 'bad')}"
    stream = ShardStream(name, rank=0, world_size=1, batch_size=1, collate_fn=keys_of, num_workers=workers, shuffle_buffer=0)
    with pytest.raises(DataError) as err:
        list(StreamLoader(stream))
    message = str(err.value)
    assert "bad-0.tar key k02: the image is truncated" in message or "bad-0.tar key k03: no caption" in message, message
    assert "on_bad_sample=skip" in message and "Traceback" not in message


def test_a_broken_archive_and_a_parquet_row_without_caption(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = bad_shards(tmp_path / "bad")
    whole = (folder / "bad-1.tar").read_bytes()
    (folder / "bad-1.tar").write_bytes(whole[: len(whole) // 2 + 100])  # breaks off inside a member
    stream = ShardStream(data.DataConfig(name=f"wds:{folder}", on_bad_sample="skip"), rank=0, world_size=1, shuffle_buffer=0)
    keys = [s["__key__"] for s in stream]
    assert "k01" in keys and len(keys) < 6

    table = pa.table({"image": [_png(), _png(), None], "text": ["one", None, "three"], "__key__": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "rows.parquet")
    stream = ShardStream(data.DataConfig(name=f"parquet:{tmp_path / 'rows.parquet'}", on_bad_sample="skip"), rank=0, world_size=1)
    assert [s["__key__"] for s in stream] == ["a"]
    with pytest.raises(DataError, match=r"rows.parquet key b: no caption"):
        list(ShardStream(f"parquet:{tmp_path / 'rows.parquet'}", rank=0, world_size=1, shuffle_buffer=0))
    with pytest.raises(DataError, match="has no caption column .* Set data.train.caption_column"):
        list(ShardStream(data.DataConfig(name=f"parquet:{tmp_path / 'rows.parquet'}", caption_column="title"), rank=0, world_size=1))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_samples_an_uninterrupted_epoch_reads_next(shards, workers):
    def loader() -> StreamLoader:
        stream = ShardStream(name_of(shards, "wds"), rank=0, world_size=1, batch_size=3, collate_fn=keys_of,
                             num_workers=workers, shuffle_buffer=6, seed=3)
        out = StreamLoader(stream, seed=3)
        out.set_epoch(1)
        return out

    straight = [b["keys"] for b in loader()]
    resumed = loader()
    assert resumed.resume_at(5) == 0  # the trainer drops nothing itself
    assert [b["keys"] for b in resumed] == straight[5:]
    assert [b["keys"] for b in resumed] == straight  # the next pass reads the whole epoch again


# ----------------------------------------------------------------------------- training


def _config(tmp_path: Path, train_name: str, validation: Path | None, **train):
    from mmtransfer.config import from_dict
    from mmtransfer.recipes import captions as finetune
    from mmtransfer.registry import get_preset

    cfg = from_dict(finetune.FinetuneConfig, {
        "data": {"train": {"name": train_name}, "validation": {"name": str(validation)} if validation else None, "test": None},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 4, "eval_every": 0, "save_every": 0,
                  "progress_bar": False, "trackers": [], **train},
    })
    cfg.model = get_preset("tiny-random")
    return cfg


@pytest.mark.parametrize("kind,workers", [("wds", 2), ("parquet", 0)])
def test_three_training_steps_stream_from_shards(shards, tmp_path, kind, workers, fresh_accelerator_state):
    from mmtransfer.recipes import captions as finetune

    summary = finetune.run(_config(tmp_path, name_of(shards, kind), shards["folder"], num_workers=workers))
    assert summary["steps"] == 3 and "val/t2i_R@1" in summary["validation"]
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["feature_cache"] is False  # frozen image tower, yet no cache for a stream
    assert written["data"]["train"]["streamed"] == kind and written["data"]["train"]["skipped"] == 0
    assert written["data"]["validation"]["num_rows"] == N


def test_fast_dev_run_on_a_stream_and_skipped_samples_in_the_summary(tmp_path, fresh_accelerator_state):
    from mmtransfer.recipes import captions as finetune

    folder = bad_shards(tmp_path / "bad")
    # 8 samples in the shards, 3 of them bad: the 2 steps of 4 read every shard (and the good ones again).
    cfg = _config(tmp_path, f"wds:{folder}", None, batch_size=4)
    cfg.data.train.on_bad_sample = "skip"
    summary = finetune.run(cfg, fast_dev_run=True)
    assert summary["steps"] == 2
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["data"]["train"]["skipped"] == 3 and "bad-0.tar key k0" in written["data"]["train"]["problems"][0]


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, fresh_accelerator_state):
    """One caption per image, no augmentation: the workers draw nothing at random, so resuming mid-epoch
    (epoch of 10 batches from 2 workers, checkpoint at step 3: worker 1's batch is due next) must give exactly
    the uninterrupted run's weights."""
    from accelerate.state import AcceleratorState, PartialState
    from safetensors.torch import load_file

    from mmtransfer.recipes import captions as finetune

    ds = data.load(str(caption_folder(tmp_path / "src", captions_per_image=1)))
    data.write_shards(ds, tmp_path / "wds", samples_per_shard=5)
    name = f"wds:{tmp_path / 'wds'}"

    def run(folder: str, **train) -> Path:
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        finetune.run(_config(tmp_path / folder, name, None, num_workers=2, max_steps=6, **train))
        return tmp_path / folder / "run"

    straight = run("a")
    first = run("b", save_every=3, keep_last=3)
    middle = first / "checkpoints" / "checkpoint-3"
    resumed = run("c", resume=str(middle))
    a, b = load_file(str(straight / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- the shard-writing script


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_write_shards_script_round_trips_a_folder(shards, tmp_path, run_script, fmt):
    out = tmp_path / "out"
    proc = run_script("scripts/write_shards.py", str(shards["folder"]), "--output", str(out), "--samples-per-shard", "7",
                      "--format", fmt)
    assert f"data.train.name={fmt}:{out}" in proc.stdout
    sizes = json.loads((out / "sizes.json").read_text())
    assert sorted(sizes.values()) == [5, 7, 7, 7, 7, 7] and len(list(out.glob("shard-*"))) == 6
    source = data.load(str(shards["folder"]))
    expected = {f"{r['image_id']:09d}": r["captions"] for r in source.select_columns(["image_id", "captions"])}
    read = {s["__key__"]: s["captions"] for s in ShardStream(f"{fmt}:{out}", rank=0, world_size=1)}
    assert read == expected
    if fmt == "wds":  # the image bytes are the files' own
        with tarfile.open(out / "shard-000000.tar") as tar:
            assert tar.extractfile("000000000.png").read() == (shards["folder"] / "000.png").read_bytes()
    again = run_script("scripts/write_shards.py", str(shards["folder"]), "--output", str(out), check=False)
    assert again.returncode == 2 and "already holds shards" in again.stderr and "--overwrite" in again.stderr


def test_write_shards_help_explains(run_script):
    out = run_script("scripts/write_shards.py", "--help").stdout
    for word in ("--samples-per-shard", "--output", "--format", "wds", "parquet", "data.train.name=wds:"):
        assert word in out


def test_written_shards_read_with_webdataset_and_datasets(shards):
    """Other readers take the shards as written: the webdataset package and datasets' Parquet streaming."""
    import datasets

    files = sorted(str(p) for p in shards["parquet"].glob("*.parquet"))
    row = next(iter(datasets.load_dataset("parquet", data_files=files, streaming=True, split="train")))
    assert row["__key__"] == "000000000" and row["captions"] == ["colour 0", "shade 0"] and row["image"].size == (24, 20)
    wds = pytest.importorskip("webdataset")
    sample = next(iter(wds.WebDataset(sorted(str(p) for p in shards["wds"].glob("*.tar")), shardshuffle=False).decode("pil")))
    assert sample["__key__"] == "000000000" and sample["txt"] == "colour 0" and sample["json"]["captions"][1] == "shade 0"


# ----------------------------------------------------------------------------- two real processes


@pytest.mark.slow
def test_two_processes_train_on_their_own_shards(shards, tmp_path, tiny_model):
    """torchrun with 2 gloo processes: both take the same number of steps and the summary counts for both."""
    model = tiny_model.save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    args = [f"init_from={model}", f"data.train.name=wds:{shards['wds']}", f"data.validation.name={shards['folder']}",
            "data.test=null", "data.train.on_bad_sample=skip", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
            "train.batch_size=4", "train.num_workers=2", "train.trackers=[]", "optim.warmup_steps=0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "scripts/finetune_captions.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["data"]["train"]["skipped"] == 0
    assert proc.stdout.count("Run folder:") == 1
