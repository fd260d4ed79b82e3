"""Knowledge distillation: the recipe behind ``scripts/distill.py``.

A trained model, loaded with :func:`mmtransfer.load`, is the *teacher*; a new
model, the *student*, learns to reproduce its outputs:

- ``task: classify``: an image classifier student (e.g. a smaller LeNet) learns
  from a classifier teacher (e.g. the ``scripts/domain_adapt.py`` DANN model):
  cross-entropy on the labelled source images, plus KL(teacher || student) on
  temperature-softened class probabilities (:class:`~mmtransfer.losses.distill.KDLoss`)
  and/or the teacher's features (:class:`~mmtransfer.losses.distill.EmbeddingDistillLoss`)
  on labelled and/or unlabelled images, e.g. the unlabelled target domain.
- ``task: multimodal``: a :class:`~mmtransfer.MultimodalModel` student with a
  cheaper image tower (a lower input resolution, a smaller tower) learns the
  teacher's shared image embedding; the text side can be copied from the
  teacher so that zero-shot classification keeps working.

A distillation recipe is a domain-adaptation recipe (:class:`~mmtransfer.assemble.domains.AdaptConfig`:
the same data sections, student model sections, training and evaluation) plus
``teacher`` and ``distill``; it runs through :func:`mmtransfer.assemble.domain_run.fit_domain_run` (as adaptation does) and the
one training loop, with the distillation task in place of the adaptation task.
The teacher is frozen, in eval mode, on the accelerator's device and outside
the task's modules: it is neither trained, nor wrapped for DDP, nor saved in
checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..assemble.domain_run import fit_domain_run
from ..assemble.domains import AdaptConfig, AdaptDataConfig
from ..config import ConfigError
from ..features import FeatureCacheConfig
from ..models.classifier import BackboneClassifier
from ..objectives.distill import (
    ClassifyDistillTask,
    DistillLossConfig,
    ModelCost,
    MultimodalDistillTask,
    check_class_order,
    image_cost,
    load_teacher,
)
from ..objectives.domain import MethodConfig
from ..run_folder import update_summary
from ..train import TrainConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


@dataclass
class DistillConfig(AdaptConfig):
    """A distillation run: an adaptation recipe (data, student, training) plus the teacher and the losses."""

    # Folder of the trained teacher, loaded by mmtransfer.load: a classifier (classifier.json,
    # e.g. a domain_adapt run's model/) for task classify, a multimodal model (config.json)
    # for task multimodal.
    teacher: str | None = None
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    # Must stay "none": distillation adds no domain loss (train a DANN student with
    # scripts/domain_adapt.py).
    method: MethodConfig = field(default_factory=lambda: MethodConfig(name="none"))
    # The teacher runs on the pixels, so the multimodal student's image features are never cached.
    data: AdaptDataConfig = field(default_factory=lambda: AdaptDataConfig(features=FeatureCacheConfig(cache=False)))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill", trackers=[], eval_batch_size=256))


def check_distill_config(cfg: DistillConfig) -> None:
    """Settings that cannot work, each named in one sentence."""
    d = cfg.distill
    if not cfg.teacher:
        raise ConfigError("teacher is not set: give the folder of a trained model, e.g. teacher=runs/digits_mnist_usps_dann/model.")
    for name in ("label_weight", "kd_weight", "embed_weight"):
        if getattr(d, name) < 0:
            raise ConfigError(f"distill.{name} must be >= 0, got {getattr(d, name)}.")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature must be > 0, got {d.temperature}.")
    if cfg.method.name != "none":
        raise ConfigError(f"method.name={cfg.method.name}: distillation does not add a domain loss; set method.name=none "
                          "(train a DANN student with scripts/domain_adapt.py instead).")
    if cfg.task == "multimodal":
        if d.kd_weight > 0:
            raise ConfigError("distill.kd_weight needs class logits, which a multimodal model does not make: set distill.kd_weight=0 "
                              "and distil the image embedding with distill.embed_weight.")
        if cfg.data.features.cache:
            raise ConfigError("data.features.cache=true: the teacher sees the training images, so distillation cannot train on "
                              "cached features; set data.features.cache=false.")
    if d.kd_weight == 0 and d.embed_weight == 0:
        raise ConfigError("distill.kd_weight and distill.embed_weight are both 0: nothing would be distilled.")


# ----------------------------------------------------------------------------- teacher


# ----------------------------------------------------------------------------- cost


# ----------------------------------------------------------------------------- tasks


def _set_image_size(model: Any, size: int) -> None:
    """Feed the multimodal ``model`` ``size`` px images from now on (a CNN tower takes any side)."""
    from dataclasses import replace

    from ..models.preprocess import ImagePreprocessor

    encoder = model.image_encoder
    if getattr(encoder.backbone, "patch_embed", None) is not None:
        raise ConfigError("distill.student_image_size changes the input side of CNN image towers only; this student's is a ViT.")
    encoder.preprocessor = ImagePreprocessor(replace(encoder.preprocessor.config, image_size=size))
    encoder.config = replace(encoder.config, image_size=size)
    model.config = replace(model.config, image=encoder.config)


def _copy_text_side(student: Any, teacher: Any) -> None:
    """The teacher's text tower, text projection and temperature, copied into the student and frozen."""
    how = "match multimodal.model's text tower and projections to the teacher's, or set distill.copy_teacher_text=false"
    if student.config.text != teacher.config.text or student.config.embed_dim != teacher.config.embed_dim:
        raise ConfigError(f"distill.copy_teacher_text needs the student's text tower and embed_dim to be the teacher's: {how}.")
    for name in ("text_encoder", "text_projection"):
        try:
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
        except RuntimeError:
            raise ConfigError(f"distill.copy_teacher_text: the student's {name.replace('_', ' ')} is built differently from "
                              f"the teacher's: {how}.") from None
        getattr(student, name).requires_grad_(False)
    with torch.no_grad():
        student.logit_scale.copy_(teacher.logit_scale)
    student.logit_scale.requires_grad_(False)


# ----------------------------------------------------------------------------- the recipe


def _fraction(student: float | None, teacher: float | None) -> float | None:
    return round(student / teacher, 4) if student is not None and teacher else None


@torch.no_grad()
def teacher_accuracy(teacher: BackboneClassifier, cfg: DistillConfig) -> dict[str, float]:
    """The classifier teacher's top-1 accuracy (%) on the run's evaluation sets (the student's are in its summary).

    Uses the sets and the sample limit that the student is evaluated on.
    """
    from .. import data as mmdata
    from ..assemble.domain_data import _labels, accuracy, preprocess_all
    from ..assemble.domains import eval_sets

    sets = {name: mmdata.load(section) for name, section in
            (("source", cfg.data.source), ("source_test", cfg.data.source_test), ("target_test", cfg.data.target_test))
            if section is not None}
    out = {}
    for name, ds in eval_sets(cfg, sets).items():
        pixels = preprocess_all(ds, teacher.preprocessor)  # (N, 3, S, S)
        logits = torch.cat([teacher(pixels[i:i + 512]).logits for i in range(0, len(pixels), 512)])  # (N, C)
        out[f"{name}_acc"] = accuracy(logits, _labels(ds))
    return out


def run(cfg: DistillConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into a student per ``cfg``; returns the summary (also in the run folder's summary.json).

    The summary adds ``teacher`` (its folder, its accuracy on the evaluation sets for a
    classifier teacher, parameters and FLOPs per image), ``student`` (parameters and
    FLOPs) and ``student_over_teacher`` (accuracy fractions, cost ratios).
    """
    check_distill_config(cfg)
    teacher = load_teacher(cfg.teacher, cfg.task)
    d = cfg.distill
    if d.student_from_teacher:
        if cfg.task == "classify":
            cfg.classifier = teacher.config
        else:
            cfg.multimodal.init_from = cfg.teacher
    costs: dict[str, ModelCost] = {}

    def measure(role: str, model: nn.Module) -> None:
        costs[role] = cost = image_cost(model)
        logger.info("%s: %s parameters, %s FLOPs per %d px image", role, f"{cost.parameters:,}", f"{cost.flops:,}", cost.image_size)

    measure("teacher", teacher)

    def make_task(model: nn.Module, accelerator: Any) -> nn.Module:
        teacher.to(accelerator.device)
        if cfg.task == "classify":
            measure("student", model)
            check_class_order(teacher.class_names, model.class_names)
            if d.student_from_teacher:
                model.load_state_dict(teacher.state_dict())
            return ClassifyDistillTask(model, teacher, d, seed=cfg.train.seed)
        if model.config.embed_dim != teacher.config.embed_dim:
            raise ConfigError(f"The student's embed_dim ({model.config.embed_dim}) is not the teacher's ({teacher.config.embed_dim}): "
                              "the image embedding is distilled as it is; set multimodal.model.embed_dim to the teacher's.")
        if d.student_image_size:
            _set_image_size(model, d.student_image_size)
        if d.copy_teacher_text:
            _copy_text_side(model, teacher)
        measure("student", model)
        return MultimodalDistillTask(model, teacher, d, seed=cfg.train.seed)

    summary = fit_domain_run(cfg, fast_dev_run=fast_dev_run, make_task=make_task)
    if "minutes" not in summary:  # not the main process
        return summary
    teacher_metrics = teacher_accuracy(teacher.cpu(), cfg) if cfg.task == "classify" else {}
    s, t = costs["student"], costs["teacher"]
    extra = {
        "teacher": {"path": str(cfg.teacher), "metrics": teacher_metrics, **asdict(t)},
        "student": asdict(s),
        "student_over_teacher": {
            **{k: _fraction(summary["metrics"].get(k), v) for k, v in teacher_metrics.items()},
            "parameters": round(s.parameters / t.parameters, 4),
            "flops": round(s.flops / t.flops, 4),
        },
    }
    summary.update(extra)
    update_summary(Path(summary["run_dir"]), extra)  # main process: the others returned above
    return summary
