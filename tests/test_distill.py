"""Knowledge distillation: the losses, loading the teacher, the tasks, the recipes and the script."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_domain import _batch  # source (B, 3, 16, 16) with labels in 0..2, target shifted by +1

import mmtransfer
from mmtransfer.config import ConfigError, load_config
from mmtransfer.losses.distill import EmbeddingDistillLoss, KDLoss
from mmtransfer.models.classifier import BackboneClassifier, ClassifierConfig
from mmtransfer.models.lenet import LeNetConfig
from mmtransfer.models.preprocess import PreprocessConfig
from mmtransfer.objectives.base import StepInfo
from mmtransfer.objectives.distill import (
    ClassifyDistillTask,
    DistillLossConfig,
    MultimodalDistillTask,
    check_class_order,
    convert_pixels,
    image_cost,
    load_teacher,
)
from mmtransfer.recipes.distill import DistillConfig, check_distill_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _classifier(channels=(4, 8), bottleneck=16, names=None, seed=0) -> BackboneClassifier:
    torch.manual_seed(seed)
    cfg = ClassifierConfig(lenet=LeNetConfig(channels=list(channels), image_size=16), bottleneck_dim=bottleneck, dropout=0.0)
    return BackboneClassifier(cfg, num_classes=3, class_names=names or ["a", "b", "c"])


# ----------------------------------------------------------------------------- losses


def test_kd_loss_is_zero_when_student_equals_teacher():
    logits = torch.randn(16, 10) * 5
    for T in (1.0, 2.0, 4.0):
        out = KDLoss(T)(logits, logits.clone())
        assert out.loss.item() == 0.0
        assert out.agreement.item() == 1.0


def test_kd_loss_is_zero_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    student = torch.nn.Linear(8, 10)
    teacher = copy.deepcopy(student)
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s, t = student(x), teacher(x)
        assert s.dtype == torch.bfloat16
        out = KDLoss(4.0)(s, t)
    assert out.loss.dtype == torch.float32 and out.loss.item() == 0.0
    out.loss.backward()
    assert student.weight.grad is not None and teacher.weight.grad is None  # the teacher's side is a detached target


def test_kd_loss_is_t_squared_kl_of_softened_probabilities():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    p_t = F.softmax(t / T, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert KDLoss(T)(s, t).loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert KDLoss(T)(s, t).loss > 0


def test_kd_loss_explains_mismatched_classes():
    with pytest.raises(ValueError, match="same classes"):
        KDLoss()(torch.zeros(2, 10), torch.zeros(2, 9))
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_embedding_loss_is_zero_when_student_equals_teacher(kind):
    z = torch.randn(9, 33) * 3
    out = EmbeddingDistillLoss(kind)(z, z.clone())
    assert out.loss.item() == 0.0
    assert out.agreement.item() == pytest.approx(1.0, abs=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zb = torch.nn.functional.linear(z, torch.eye(33))
        assert EmbeddingDistillLoss(kind)(zb, zb.clone()).loss.item() == 0.0


def test_cosine_embedding_loss_is_one_minus_cosine():
    torch.manual_seed(0)
    s, t = torch.randn(6, 12), torch.randn(6, 12)
    expected = (1 - F.cosine_similarity(s, t)).mean()
    assert EmbeddingDistillLoss("cosine")(s, t).loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert EmbeddingDistillLoss("cosine")(s, -s).loss.item() == pytest.approx(2.0)
    assert EmbeddingDistillLoss("mse")(s, t).loss.item() == pytest.approx(F.mse_loss(s, t).item())


# ----------------------------------------------------------------------------- loading the teacher


def test_load_dispatches_on_what_the_folder_holds(tmp_path, tiny_model):
    clf = _classifier()
    clf.save_pretrained(tmp_path / "clf")
    loaded = mmtransfer.load(tmp_path / "clf")
    assert isinstance(loaded, BackboneClassifier) and not loaded.training
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x).logits, clf.eval()(x).logits)
    tiny_model.save_pretrained(tmp_path / "mm")
    assert isinstance(mmtransfer.load(str(tmp_path / "mm")), mmtransfer.MultimodalModel)
    with pytest.raises(FileNotFoundError, match="config.json .* classifier.json"):
        mmtransfer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        mmtransfer.load(tmp_path / "missing")


def test_load_teacher_freezes_and_checks_the_kind(tmp_path, tiny_model):
    _classifier().save_pretrained(tmp_path / "clf")
    teacher = load_teacher(tmp_path / "clf", "classify")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="is an image classifier, but task=multimodal"):
        load_teacher(tmp_path / "clf", "multimodal")


def test_class_order_must_agree():
    check_class_order(DIGITS, list(DIGITS))
    with pytest.raises(ConfigError, match="different order"):
        check_class_order(DIGITS, DIGITS[1:] + DIGITS[:1])
    with pytest.raises(ConfigError, match="differ from"):
        check_class_order(DIGITS, DIGITS[:5])


def test_convert_pixels():
    same = PreprocessConfig(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = torch.randn(2, 3, 16, 16)
    assert convert_pixels(x, same, same) is x
    other = PreprocessConfig(image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert torch.allclose(convert_pixels(x, same, other), x * 0.5 + 0.5)
    assert convert_pixels(x, same, PreprocessConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)).shape == (2, 3, 32, 32)


# ----------------------------------------------------------------------------- tasks


def test_classify_distillation_is_zero_when_student_equals_teacher():
    teacher = _classifier().eval()
    student = copy.deepcopy(teacher)
    task = ClassifyDistillTask(student, teacher, DistillLossConfig(label_weight=0.0, kd_weight=1.0, embed_weight=1.0))
    out = task(_batch(), StepInfo(0, 10))
    assert out.loss.item() == 0.0
    assert out.metrics["kd_loss"].item() == 0.0 and out.metrics["kd_agreement"].item() == 1.0
    assert out.metrics["embed_loss"].item() == 0.0


def test_teacher_is_frozen_and_outside_the_task():
    teacher = _classifier(channels=(6, 12), bottleneck=24, seed=1)
    student = _classifier()
    task = ClassifyDistillTask(student, teacher, DistillLossConfig(embed_weight=0.5, images="target"))
    task.train()
    assert not teacher.training  # task.train() does not reach it
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in task.parameters()}  # not optimised, not wrapped by DDP
    assert not any(k.startswith("teacher") for k in task.state_dict())  # not in checkpoints
    assert isinstance(task.adapter, torch.nn.Linear) and task.adapter.out_features == 24  # widths bridged
    out = task(_batch(), StepInfo(3, 10))
    out.loss.backward()
    assert out.loss > 0 and {"cls_loss", "kd_loss", "kd_agreement", "embed_loss"} <= set(out.metrics)
    assert all(p.grad is None for p in teacher.parameters())
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_multimodal_distillation_copies_the_text_side_and_is_zero_for_equal_towers(tiny_model):
    teacher = copy.deepcopy(tiny_model).eval()
    student = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    for p in student.text_projection.parameters():
        torch.nn.init.normal_(p)
    from mmtransfer.recipes.distill import _copy_text_side

    _copy_text_side(student, teacher)
    for k, v in teacher.text_projection.state_dict().items():
        assert torch.equal(student.text_projection.state_dict()[k], v), k
    task = MultimodalDistillTask(student, teacher, DistillLossConfig(label_weight=0.0, kd_weight=0.0, embed_weight=1.0))
    task.eval()
    batch = {"source": {"pixel_values": torch.randn(4, 3, 32, 32), **student.tokenize(["a", "b", "c", "d"])},
             "target": {"pixel_values": torch.randn(4, 3, 32, 32)}}
    assert task(batch, StepInfo(0, 10)).loss.item() == 0.0
    task.train()
    out = task(batch, StepInfo(0, 10))
    out.loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    assert not any(p.requires_grad for p in student.text_encoder.parameters())


# ----------------------------------------------------------------------------- configs, cost, recipes


def test_bad_settings_are_explained():
    with pytest.raises(ConfigError, match="teacher is not set"):
        check_distill_config(DistillConfig())
    with pytest.raises(ConfigError, match="nothing would be distilled"):
        check_distill_config(DistillConfig(teacher="t", distill=DistillLossConfig(kd_weight=0.0)))
    with pytest.raises(ConfigError, match="kd_weight needs class logits"):
        check_distill_config(DistillConfig(teacher="t", task="multimodal"))
    cfg = DistillConfig(teacher="t")
    cfg.method.name = "dann"
    with pytest.raises(ConfigError, match="method.name=none"):
        check_distill_config(cfg)


def test_digits_student_is_at_least_3x_cheaper_than_its_teacher():
    teacher = load_config(DistillConfig, ROOT / "configs" / "digits_mnist_usps_dann.yaml")
    student = load_config(DistillConfig, ROOT / "configs" / "distill_digits_usps_lenet_small.yaml")
    for other in ("digits_mnist_usps_small_source_only", "digits_mnist_usps_small_dann"):
        assert load_config(DistillConfig, ROOT / "configs" / f"{other}.yaml").classifier == student.classifier
    t = image_cost(BackboneClassifier(teacher.classifier, 10))
    s = image_cost(BackboneClassifier(student.classifier, 10))
    assert t.parameters == 557_408 and t.flops == 4_837_120  # the DANN recipe: gray input, a 500-d layer, a 256-d bottleneck
    assert t.parameters / s.parameters >= 3 and t.flops / s.flops >= 3


def test_distill_recipes_load_and_check():
    recipes = sorted((ROOT / "configs").glob("distill_*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        cfg = load_config(DistillConfig, path)
        check_distill_config(cfg)


# ----------------------------------------------------------------------------- the script


def test_help_lists_distillation_keys(run_script):
    out = run_script("scripts/distill.py", "--help").stdout
    for key in ("--fast-dev-run", "teacher", "distill.temperature", "distill.kd_weight", "distill.embed_loss", "distill.images",
                "classifier.lenet.channels", "data.target.name"):
        assert key in out, key


def test_missing_teacher_is_one_clear_line(tmp_path, run_script):
    proc = run_script("scripts/distill.py", "--config", "configs/distill_digits_usps_lenet_small.yaml",
                      f"teacher={tmp_path / 'nothing'}", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "holds no saved mmtransfer model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fast_dev_run_digits(tmp_path, run_script):
    pytest.importorskip("sklearn")
    cfg = load_config(DistillConfig, ROOT / "configs" / "digits_mnist_usps_dann.yaml")
    BackboneClassifier(cfg.classifier, 10, DIGITS).save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    out = run_script("scripts/distill.py", "--config", "configs/distill_digits_usps_lenet_small.yaml", "--fast-dev-run",
                     f"teacher={tmp_path / 'teacher'}", f"train.output_dir={run}").stdout
    assert "student/teacher" in out and "target" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and {"source_acc", "target_acc"} <= set(summary["metrics"])
    assert summary["student_over_teacher"]["parameters"] < 1 / 3 and summary["student_over_teacher"]["flops"] < 1 / 3
    assert "target_acc" in summary["teacher"]["metrics"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kd_loss" in r and "train/cls_loss" in r for r in records)
    student = mmtransfer.load(run / "model")
    assert isinstance(student, BackboneClassifier) and student.config.lenet.channels == [10, 20]
    # Teacher classes in another order: one clear line.
    names = DIGITS[1:] + DIGITS[:1]
    BackboneClassifier(cfg.classifier, 10, names).save_pretrained(tmp_path / "shuffled")
    proc = run_script("scripts/distill.py", "--config", "configs/distill_digits_usps_lenet_small.yaml", "--fast-dev-run",
                      f"teacher={tmp_path / 'shuffled'}", f"train.output_dir={tmp_path / 'run2'}", check=False)
    assert proc.returncode == 2 and "different order" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fast_dev_run_multimodal_embedding(tmp_path, run_script):
    from mmtransfer.assemble.captions import FinetuneConfig

    teacher = load_config(FinetuneConfig, ROOT / "configs" / "openmoji_frozen_baseline.yaml").model
    mmtransfer.create_model(teacher).save_pretrained(tmp_path / "teacher")
    run = tmp_path / "run"
    out = run_script("scripts/distill.py", "--config", "configs/distill_emoji_lite0_80px.yaml", "--fast-dev-run",
                     f"teacher={tmp_path / 'teacher'}", f"train.output_dir={run}", "plot.enabled=false").stdout
    assert "zero-shot top-1" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["student_over_teacher"]["flops"] < 1 / 2.5
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/embed_loss" in r for r in records)
    student = mmtransfer.load(run / "model")
    assert isinstance(student, mmtransfer.MultimodalModel) and student.preprocessor.config.image_size == 80
