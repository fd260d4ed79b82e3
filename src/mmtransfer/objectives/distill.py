"""Distillation objectives: a student learns a teacher's softened outputs (and, multimodal, its embeddings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, above, at_least, check_ranges
from ..losses.distill import DistillOutput, EmbeddingDistillLoss, KDLoss
from ..models.classifier import BackboneClassifier
from ..models.preprocess import PreprocessConfig
from .base import StepInfo, TaskOutput
from .domain import ClassifyAdaptTask, MethodConfig, MultimodalAdaptTask

logger = logging.getLogger(__name__)


def load_teacher(path: str | Path, task: str) -> nn.Module:
    """The teacher for ``task`` ("classify" or "multimodal"): loaded, frozen, in eval mode, on the CPU."""
    from ..models.factory import load
    from ..models.multimodal import MultimodalModel

    teacher = load(path)
    wanted = BackboneClassifier if task == "classify" else MultimodalModel
    if not isinstance(teacher, wanted):
        kind = "an image classifier" if isinstance(teacher, BackboneClassifier) else "a multimodal model"
        raise ConfigError(f"teacher '{path}' is {kind}, but task={task} needs "
                          f"{'an image classifier' if task == 'classify' else 'a multimodal model'}: set task to match the teacher.")
    teacher.requires_grad_(False)
    return teacher.eval()


def check_class_order(teacher_names: list[str], student_names: list[str]) -> None:
    """Raise a :class:`ConfigError` unless teacher and student list the same classes in the same order."""
    if list(teacher_names) == list(student_names):
        return
    if sorted(teacher_names) == sorted(student_names):
        moved = [f"{i}: teacher '{t}' / student '{s}'" for i, (t, s) in enumerate(zip(teacher_names, student_names)) if t != s]
        raise ConfigError(f"The teacher and the student's data list the same classes in a different order ({'; '.join(moved[:3])}): "
                          "set class_names on the data sections to the teacher's order.")
    raise ConfigError(f"The teacher's {len(teacher_names)} classes {teacher_names[:5]}... differ from the {len(student_names)} "
                      f"classes of the student's data {student_names[:5]}...: distil on data with the teacher's classes.")


def convert_pixels(pixels: torch.Tensor, source: PreprocessConfig, target: PreprocessConfig) -> torch.Tensor:
    """Pixels prepared for one model, re-prepared for another: undo ``source``'s mean/std, resize, apply ``target``'s.

    The identity when both use the same side, mean and std. Crops are not redone: a
    different ``crop_pct`` only changes the framing slightly.

    Shapes:
        (B, 3, S, S) -> (B, 3, S', S'), S' = ``target.image_size``.
    """
    same_norm = tuple(source.mean) == tuple(target.mean) and tuple(source.std) == tuple(target.std)
    if same_norm and source.image_size == target.image_size:
        return pixels
    view = (1, 3, 1, 1)
    mean_s, std_s = pixels.new_tensor(source.mean).view(view), pixels.new_tensor(source.std).view(view)
    mean_t, std_t = pixels.new_tensor(target.mean).view(view), pixels.new_tensor(target.std).view(view)
    x = pixels * std_s + mean_s  # (B, 3, S, S) in [0, 1]
    if source.image_size != target.image_size:
        size = (target.image_size, target.image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=target.image_size < source.image_size)
    return (x - mean_t) / std_t  # (B, 3, S', S')


def _teacher_input(teacher: nn.Module, student: nn.Module) -> tuple[PreprocessConfig, PreprocessConfig]:
    s, t = student.preprocessor.config, teacher.preprocessor.config
    if (s.image_size, tuple(s.mean), tuple(s.std)) != (t.image_size, tuple(t.mean), tuple(t.std)):
        logger.info("The teacher takes %d px input normalised by mean %s, std %s; the student's pixels (%d px) are converted for it.",
                    t.image_size, tuple(t.mean), tuple(t.std), s.image_size)
    return s, t


@dataclass
class ModelCost:
    """Size and compute of a model's image path for one image.

    ``flops`` counts a multiply-add as two operations (convolutions and matrix
    products, as :class:`torch.utils.flop_counter.FlopCounterMode` does).
    """

    parameters: int
    flops: int
    image_size: int


def image_cost(model: nn.Module) -> ModelCost:
    """Parameters and FLOPs of one image through an :class:`BackboneClassifier` (to its logits) or a
    :class:`~mmtransfer.MultimodalModel` (image tower and projection, to its embedding).

    Example:
        >>> image_cost(BackboneClassifier(ClassifierConfig(), 10)).flops
        5738000
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = int(model.preprocessor.config.image_size)
    if isinstance(model, BackboneClassifier):
        parts: list[nn.Module] = [model]

        def forward(x: torch.Tensor) -> Any:
            return model(x)
    else:
        parts = [model.image_encoder, model.image_projection]

        def forward(x: torch.Tensor) -> Any:
            return model.encode_image(x)
    parameters = sum(p.numel() for part in parts for p in part.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward(torch.zeros(1, 3, size, size, device=device))
    model.train(was_training)
    return ModelCost(parameters=parameters, flops=int(counter.get_total_flops()), image_size=size)


class _TeacherMixin:
    """Holds the teacher outside the module tree, and runs it on the student's pixels."""

    def _set_teacher(self, teacher: nn.Module, student: nn.Module) -> None:
        # Set past nn.Module.__setattr__, so the teacher is no submodule: the optimizer,
        # DDP, .train() and checkpoints never see it.
        object.__setattr__(self, "teacher", teacher.eval())
        self._pixels_from, self._pixels_to = _teacher_input(teacher, student)

    def teacher_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """The student's pixels (B, 3, S, S), prepared the teacher's way, on the teacher's device."""
        device = next(self.teacher.parameters()).device
        return convert_pixels(pixels.to(device), self._pixels_from, self._pixels_to)


class ClassifyDistillTask(_TeacherMixin, ClassifyAdaptTask):
    """A classifier student learns from labels and from a frozen classifier teacher.

    Batches: ``{"source": {"pixel_values": (B, 3, S, S), "labels": (B,)}, "target": {"pixel_values": (B', 3, S, S)}}``.
    Source and target go through the student as one concatenated batch; the
    teacher sees the images of ``distill.images``.

    Objective:
        L = label_weight * CE(s(x_s), y_s)
            + kd_weight * T^2 * KL(softmax(t(x) / T) || softmax(s(x) / T))
            + embed_weight * D(A f_s(x), f_t(x)),
        x the images of ``distill.images``, f the features feeding each head, A a learned
        linear map (the identity when the widths agree), D cosine or MSE.

    Example:
        >>> task = ClassifyDistillTask(student, teacher, DistillLossConfig(temperature=2.0))
        >>> task(batch, StepInfo(0, 100)).loss
    """

    def __init__(self, model: BackboneClassifier, teacher: BackboneClassifier, distill: DistillLossConfig, seed: int = 0) -> None:
        super().__init__(model, MethodConfig(name="none"), seed=seed)
        self.distill = distill
        self._set_teacher(teacher, model)
        self.kd_loss = KDLoss(distill.temperature)
        self.embed_loss = EmbeddingDistillLoss(distill.embed_loss)
        width_s, width_t = model.features_dim, teacher.features_dim
        self.adapter: nn.Module = nn.Linear(width_s, width_t) if distill.embed_weight > 0 and width_s != width_t else nn.Identity()

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        d = self.distill
        src = batch["source"]
        xs, ys = src["pixel_values"], src["labels"]
        B = xs.shape[0]
        x = torch.cat([xs, batch["target"]["pixel_values"]]) if d.images != "source" else xs  # (B + B', 3, S, S)
        out = self.model(x)
        logits_s = out.logits[:B]  # (B, C)
        cls_loss = F.cross_entropy(logits_s.float(), ys)
        loss = d.label_weight * cls_loss
        metrics: dict[str, torch.Tensor | float] = {"cls_loss": cls_loss.detach(),
                                                    "source_acc": (logits_s.argmax(1) == ys).float().mean().detach()}
        rows = slice(B, None) if d.images == "target" else slice(None)
        with torch.no_grad():
            teacher = self.teacher(self.teacher_pixels(x[rows]))
        if d.kd_weight > 0:
            kd: DistillOutput = self.kd_loss(out.logits[rows], teacher.logits)  # (N, C) each
            loss = loss + d.kd_weight * kd.loss
            metrics.update(kd.metrics("kd_"))
        if d.embed_weight > 0:
            emb = self.embed_loss(self.adapter(out.features[rows]), teacher.features)  # (N, F_t) each
            loss = loss + d.embed_weight * emb.loss
            metrics.update(emb.metrics("embed_"))
        return TaskOutput(loss=loss, metrics=metrics)


class MultimodalDistillTask(_TeacherMixin, MultimodalAdaptTask):
    """A multimodal student's image embedding learns a frozen multimodal teacher's.

    Batches: ``source`` with ``pixel_values`` (B, 3, S, S) and ``input_ids``/``attention_mask``
    (B, T); ``target`` with ``pixel_values`` (B', 3, S, S).

    Objective:
        L = label_weight * InfoNCE(z_img_s, z_txt_s) + embed_weight * D(z_img(x), z_img^teacher(x)),
        x the images of ``distill.images``, z the L2-normalised shared-space embeddings, D cosine or MSE.
    """

    def __init__(self, model: Any, teacher: Any, distill: DistillLossConfig, seed: int = 0) -> None:
        super().__init__(model, MethodConfig(name="none"), seed=seed)
        self.distill = distill
        self._set_teacher(teacher, model)
        self.embed_loss = EmbeddingDistillLoss(distill.embed_loss, normalize=True)
        if distill.label_weight == 0:
            # Without the caption loss nothing reaches the text side; unused trainable
            # parameters would break DDP.
            for part in (model.text_encoder, model.text_projection):
                part.requires_grad_(False)
            model.logit_scale.requires_grad_(False)

    def forward(self, batch: dict[str, Any], info: StepInfo) -> TaskOutput:
        from .captions import caption_groups

        d, model = self.distill, self.model
        src = batch["source"]
        zi_s = model.project_image(self.image_features(src).pooled)  # (B, E)
        loss = zi_s.new_zeros(())
        metrics: dict[str, torch.Tensor | float] = {}
        if d.label_weight > 0:
            zt_s = model.project_text(self.text_features(src).pooled)  # (B, E)
            con = self.contrastive(zi_s, zt_s, model.get_logit_scale(), caption_groups(src["input_ids"], src["attention_mask"]))
            loss = loss + d.label_weight * con.loss
            metrics.update({"contrastive": con.loss.detach(), "acc_i2t": con.accuracy_i2t})
        student, pixels = [], []
        if d.images != "target":
            student.append(zi_s)
            pixels.append(src["pixel_values"])
        if d.images != "source":
            xt = batch["target"]["pixel_values"]
            student.append(model.project_image(self.image_features({"pixel_values": xt}).pooled))  # (B', E)
            pixels.append(xt)
        with torch.no_grad():
            teacher = self.teacher.encode_image(self.teacher_pixels(torch.cat(pixels)))  # (N, E)
        emb = self.embed_loss(torch.cat(student), teacher)
        loss = loss + d.embed_weight * emb.loss
        metrics.update(emb.metrics("embed_"))
        return TaskOutput(loss=loss, metrics=metrics)


@dataclass
class DistillLossConfig:
    """What the student learns from the labels and from the teacher, and on which images."""

    # Weight of the student's own supervised loss on the labelled source images
    # (cross-entropy with the labels; the caption contrastive loss for task multimodal).
    label_weight: float = 1.0
    # Weight of KL(teacher || student) on softened class probabilities, times T^2
    # (task classify).
    kd_weight: float = 1.0
    # Softmax temperature T of the class-probability distillation.
    temperature: float = 4.0
    # Weight of the embedding distillation: the classifier's features (the head's input;
    # a learned linear map bridges different widths) or the shared image embedding
    # (task multimodal).
    embed_weight: float = 0.0
    # Embedding distillation loss: "cosine" (1 - cos) or "mse".
    embed_loss: Literal["cosine", "mse"] = "cosine"
    # Images the teacher is distilled on: "both" (labelled source and unlabelled target),
    # "source" or "target" (the unlabelled images only).
    images: Literal["both", "source", "target"] = "both"
    # Start the student as a copy of the teacher (its architecture and weights): the
    # same model distilled onto a new domain. Otherwise task classify builds the student
    # from `classifier`, task multimodal from `multimodal`.
    student_from_teacher: bool = False
    # Task multimodal: the student's input side in pixels (a cheaper student at a lower
    # resolution, e.g. with student_from_teacher); None: the student's own.
    student_image_size: int | None = None
    # Task multimodal: copy the teacher's text tower, text projection and temperature into
    # the student and freeze them, so the student's image embedding learns the teacher's
    # space and zero-shot classification uses the teacher's class-name embeddings.
    copy_teacher_text: bool = True

    def __post_init__(self) -> None:
        check_ranges(self, label_weight=at_least(0), kd_weight=at_least(0), temperature=above(0), embed_weight=at_least(0),
                     student_image_size=at_least(1))
