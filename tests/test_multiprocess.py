"""Every training script under 2 real processes (torchrun, gloo on CPU) against 1 process on the same global batch.

Each script runs its own-data template (or default recipe) on small folders of
real images with the real packaged encoders, for a few steps: once as one
process with batch 2B, once as two processes with batch B each. Where the run
has no randomness that depends on the process (no dropout, no augmentation, no
batch norm in training mode, no ITM hard negatives: README, "Many GPUs, precision, resume"),
the final weights must agree within float tolerance. The templates as shipped
(dropout, ITM) must also run to the end under 2 processes and say so, the caption
template under FSDP2 too (configs/accelerate/fsdp_cpu_2proc.yaml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    from data_helpers import REPO
    from own_data import shapes_caption_folder, shapes_class_folder
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import REPO
    from tests.own_data import shapes_caption_folder, shapes_class_folder

pytestmark = pytest.mark.slow

STEPS = 3


def launch(script: str, processes: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``script`` as a user would: plain python for one process, torchrun (no Accelerate flags) for several."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    runner = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       "--nproc_per_node", str(processes)]
    proc = subprocess.run([*runner, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} x{processes} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"checkpoint-{STEPS}" / "model.safetensors"))


def assert_same_weights(one: Path, two: Path, moved: str) -> None:
    """Equal final weights, and the weights named by ``moved`` really trained (so equality means something)."""
    a, b = final_weights(one), final_weights(two)
    assert a.keys() == b.keys()
    worst = max(((k, float((a[k].double() - b[k].double()).abs().max())) for k in a if a[k].is_floating_point()), key=lambda kv: kv[1])
    assert worst[1] < 2e-5, f"largest difference between 1 and 2 processes: {worst}"
    assert any(moved in k for k in a), sorted(a)[:20]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def logged_once(run_dir: Path) -> None:
    """Only the main process writes the log: each step appears once."""
    steps = [r["step"] for r in train_records(run_dir)]
    assert steps and len(steps) == len(set(steps)), steps


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own_data")
    return {
        "captions": shapes_caption_folder(root / "my_photos"),
        "source": shapes_class_folder(root / "my_source", background=(255, 255, 255), per_class=12),
        "target": shapes_class_folder(root / "my_target", background=(40, 40, 40), per_class=12, unlabelled=True),
        "target_test": shapes_class_folder(root / "my_target_test", background=(40, 40, 40), per_class=4, seed=1),
        "cache": root / "features",
    }


# ----------------------------------------------------------------------------- finetune_captions.py


def caption_args(folders: dict[str, Path], out: Path, batch: int, *extra: str) -> list[str]:
    return ["--config", "configs/caption_folder_template.yaml",
            f"data.train.name={folders['captions'] / 'train'}", f"data.validation.name={folders['captions'] / 'validation'}",
            f"data.features.folder={folders['cache']}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
            f"train.batch_size={batch}", "train.num_workers=0", "train.eval_every=0", "train.save_every=0",
            "optim.warmup_steps=0", *extra]


def test_caption_template_two_processes_equal_one(folders, tmp_path):
    """The caption template with its trainable text blocks, dropout and ITM switched off: 2 x 8 equals 1 x 16."""
    exact = ["objective.itm_weight=0", "model.fusion.num_layers=0",
             "model.text.config_overrides={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]
    launch("scripts/finetune_captions.py", 1, *caption_args(folders, tmp_path / "one", 16, *exact, "train.log_every=1"))
    launch("scripts/finetune_captions.py", 2, *caption_args(folders, tmp_path / "two", 8, *exact, "train.log_every=1"))
    assert summary(tmp_path / "one")["processes"] == 1 and summary(tmp_path / "two")["processes"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two", "text_encoder.model.encoder.layer.5")
    # The logged loss is the global batch's (reduced over processes), not process 0's own.
    for one, two in zip(train_records(tmp_path / "one"), train_records(tmp_path / "two"), strict=True):
        assert one["train/loss"] == pytest.approx(two["train/loss"], rel=1e-5), (one, two)


def test_caption_template_as_shipped_runs_under_two_processes(folders, tmp_path):
    """Dropout, fusion and ITM on, checkpoints mid-run, resumed under 2 processes; one report, one log."""
    run = tmp_path / "run"
    proc = launch("scripts/finetune_captions.py", 2, *caption_args(folders, run, 8, "train.save_every=2"))
    assert proc.stdout.count("Run folder:") == 1, proc.stdout  # the main process reports, once
    assert summary(run)["processes"] == 2
    logged_once(run)
    resumed = launch("scripts/finetune_captions.py", 2, *caption_args(folders, run, 8, "train.resume=latest",
                                                                      f"train.max_steps={STEPS + 2}"))
    assert summary(run)["steps"] == STEPS + 2, resumed.stderr[-2000:]
    logged_once(run)


def test_caption_template_as_shipped_runs_under_fsdp(folders, tmp_path):
    """The template's towers (frozen image tower from the feature cache, partly frozen text tower, fusion and ITM)
    sharded by FSDP2 over 2 CPU processes, from configs/accelerate/fsdp_cpu_2proc.yaml; resumed the same way."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                "configs/accelerate/fsdp_cpu_2proc.yaml", "scripts/finetune_captions.py"]
    run = tmp_path / "run"
    for extra in (["train.save_every=2"], ["train.resume=latest", f"train.max_steps={STEPS + 2}"]):
        proc = subprocess.run([*launcher, *caption_args(folders, run, 8, *extra)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        assert proc.stdout.count("Run folder:") == 1
    assert summary(run)["distributed_type"] == "FSDP" and summary(run)["steps"] == STEPS + 2
    logged_once(run)
    from mmtransfer import load

    assert load(run / "model").encode_text(["a red circle"]).shape == (1, 256)


# ----------------------------------------------------------------------------- domain_adapt.py


def domain_args(folders: dict[str, Path], out: Path, batch: int, *extra: str) -> list[str]:
    return ["--config", "configs/domain_folders_template.yaml",
            f"data.source.name={folders['source']}", f"data.target.name={folders['target']}",
            f"data.target_test.name={folders['target_test']}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
            f"train.batch_size={batch}", "train.num_workers=0", "train.eval_every=0", "train.save_every=0",
            "optim.warmup_steps=0", "plot.enabled=false", *extra]


def test_domain_template_two_processes_equal_one(folders, tmp_path):
    """The domain template's CDAN+E with the batch-norm and dropout layers off (a LeNet backbone): 2 x 6 equals 1 x 12."""
    exact = ["classifier.backbone=lenet", "classifier.bottleneck_batch_norm=false", "classifier.dropout=0",
             "method.discriminator.batch_norm=false", "data.augment.crop_scale=null", "data.augment.hflip=0"]
    launch("scripts/domain_adapt.py", 1, *domain_args(folders, tmp_path / "one", 12, *exact))
    launch("scripts/domain_adapt.py", 2, *domain_args(folders, tmp_path / "two", 6, *exact))
    assert summary(tmp_path / "two")["processes"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two", "discriminator")


def test_domain_template_as_shipped_runs_under_two_processes(folders, tmp_path):
    run = tmp_path / "run"
    proc = launch("scripts/domain_adapt.py", 2, *domain_args(folders, run, 6))
    assert summary(run)["processes"] == 2
    assert proc.stdout.count("target") >= 1
    logged_once(run)


# ----------------------------------------------------------------------------- distill.py


def test_distill_two_processes_equal_one(folders, tmp_path):
    """A LeNet teacher adapted on the folders, then the distillation recipe's student: 2 x 6 equals 1 x 12."""
    teacher = tmp_path / "teacher"
    exact = ["classifier.backbone=lenet", "classifier.bottleneck_batch_norm=false", "classifier.dropout=0",
             "method.name=none", "data.augment.crop_scale=null", "data.augment.hflip=0"]
    launch("scripts/domain_adapt.py", 1, *domain_args(folders, teacher, 12, *exact))
    args = ["--config", "configs/distill_digits_usps_lenet_small.yaml", f"teacher={teacher / 'model'}",
            f"data.source.name={folders['source']}", "data.source.split=null", f"data.target.name={folders['target']}",
            "data.target.split=null", f"data.target_test.name={folders['target_test']}", "data.target_test.split=null",
            "classifier.dropout=0", "classifier.lenet.dropout=0", f"train.max_steps={STEPS}", "train.eval_every=0",
            "optim.warmup_steps=0"]
    launch("scripts/distill.py", 1, *args, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=12")
    launch("scripts/distill.py", 2, *args, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=6")
    assert summary(tmp_path / "two")["processes"] == 2
    assert_same_weights(tmp_path / "one", tmp_path / "two", "head")


# ----------------------------------------------------------------------------- transfer_classify.py


def test_transfer_few_shot_two_processes_equal_one(folders, tmp_path):
    """Zero-shot and a text-initialised 8-shot linear probe (24 images, 3 steps of 8) on the default preset: 2 x 4 against 1 x 8."""
    args = ["model=minilm-l6-efficientnet-lite0", f"data.train.name={folders['source']}",
            f"data.test.name={folders['target_test']}", "data.test.split=null", "data.shots=[8]", "method.mode=linear-probe",
            "method.head_init=text", "method.seeds=[0]", f"train.max_steps={STEPS}", "optim.warmup_steps=0"]
    one = launch("scripts/transfer_classify.py", 1, *args, f"train.output_dir={tmp_path / 'one'}", "train.batch_size=8")
    two = launch("scripts/transfer_classify.py", 2, *args, f"train.output_dir={tmp_path / 'two'}", "train.batch_size=4")
    probe_one = next((tmp_path / "one").rglob(f"checkpoint-{STEPS}")).parent.parent
    probe_two = next((tmp_path / "two").rglob(f"checkpoint-{STEPS}")).parent.parent
    assert_same_weights(probe_one, probe_two, "head")
    assert two.stdout.count("zero-shot") == 1  # reported once
    assert one.stdout.splitlines()[-3:-1] == two.stdout.splitlines()[-3:-1]  # the same accuracies


# ----------------------------------------------------------------------------- launchers


def test_accelerate_cpu_launch_of_several_processes_is_refused(folders, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process: the run stops and says what to type."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "--cpu", "scripts/finetune_captions.py",
                           *caption_args(folders, tmp_path / "run", 8)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "started only this one process" in proc.stderr and "torchrun --nproc_per_node N" in proc.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
