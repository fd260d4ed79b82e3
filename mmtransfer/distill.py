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

A distillation recipe is a domain-adaptation recipe (:class:`~mmtransfer.adapt.AdaptConfig`:
the same data sections, student model sections, training and evaluation) plus
``teacher`` and ``distill``; it runs through :func:`mmtransfer.adapt.run` and the
one training loop, with the distillation task in place of the adaptation task.
The teacher is frozen, in eval mode, on the accelerator's device and outside
the task's modules: it is neither trained, nor wrapped for DDP, nor saved in
checkpoints.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .adapt import (
    AdaptConfig,
    AdaptDataConfig,
    ClassifyAdaptTask,
    ImageClassifier,
    MethodConfig,
    MultimodalAdaptTask,
)
from .config import ConfigError, above, at_least, check_ranges
from .losses.distill import DistillOutput, EmbeddingDistillLoss, KDLoss
from .models.preprocess import PreprocessConfig
from .train import StepInfo, TaskOutput, TrainConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


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
    data: AdaptDataConfig = field(default_factory=lambda: AdaptDataConfig(cache_features=False))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill", trackers=[]))


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
        if cfg.data.cache_features:
            raise ConfigError("data.cache_features=true: the teacher sees the training images, so distillation cannot train on "
                              "cached features; set data.cache_features=false.")
    if d.kd_weight == 0 and d.embed_weight == 0:
        raise ConfigError("distill.kd_weight and distill.embed_weight are both 0: nothing would be distilled.")


# ----------------------------------------------------------------------------- teacher


def load_teacher(path: str | Path, task: str) -> nn.Module:
    """The teacher for ``task`` ("classify" or "multimodal"): loaded, frozen, in eval mode, on the CPU."""
    import mmtransfer
    from .models.multimodal import MultimodalModel

    teacher = mmtransfer.load(path)
    wanted = ImageClassifier if task == "classify" else MultimodalModel
    if not isinstance(teacher, wanted):
        kind = "an image classifier" if isinstance(teacher, ImageClassifier) else "a multimodal model"
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


# ----------------------------------------------------------------------------- cost


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
    """Parameters and FLOPs of one image through an :class:`ImageClassifier` (to its logits) or a
    :class:`~mmtransfer.MultimodalModel` (image tower and projection, to its embedding).

    Example:
        >>> image_cost(ImageClassifier(ClassifierConfig(), 10)).flops
        5738000
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = int(model.preprocessor.config.image_size)
    if isinstance(model, ImageClassifier):
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


# ----------------------------------------------------------------------------- tasks


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

    def __init__(self, model: ImageClassifier, teacher: ImageClassifier, distill: DistillLossConfig, seed: int = 0) -> None:
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
        from .objectives import caption_groups

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


def _set_image_size(model: Any, size: int) -> None:
    """Feed the multimodal ``model`` ``size`` px images from now on (a CNN tower takes any side)."""
    from dataclasses import replace

    from .models.preprocess import ImagePreprocessor

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
def teacher_accuracy(teacher: ImageClassifier, cfg: DistillConfig) -> dict[str, float]:
    """The classifier teacher's top-1 accuracy (%) on the run's evaluation sets (the student's are in its summary).

    Uses the sets and the sample limit that the student is evaluated on.
    """
    from . import data as mmdata
    from .adapt import _accuracy, _eval_sets, _labels, preprocess_all

    sets = {name: mmdata.load(section) for name, section in
            (("source", cfg.data.source), ("source_test", cfg.data.source_test), ("target_test", cfg.data.target_test))
            if section is not None}
    out = {}
    for name, ds in _eval_sets(cfg, sets).items():
        pixels = preprocess_all(ds, teacher.preprocessor)  # (N, 3, S, S)
        logits = torch.cat([teacher(pixels[i:i + 512]).logits for i in range(0, len(pixels), 512)])  # (N, C)
        out[f"{name}_acc"] = _accuracy(logits, _labels(ds))
    return out


def run(cfg: DistillConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Distil ``cfg.teacher`` into a student per ``cfg``; returns the summary (also in the run folder's summary.json).

    The summary adds ``teacher`` (its folder, its accuracy on the evaluation sets for a
    classifier teacher, parameters and FLOPs per image), ``student`` (parameters and
    FLOPs) and ``student_over_teacher`` (accuracy fractions, cost ratios).
    """
    from . import adapt

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

    summary = adapt.run(cfg, fast_dev_run=fast_dev_run, make_task=make_task)
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
    path = Path(summary["run_dir"]) / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(extra)
    path.write_text(json.dumps(data, indent=2))
    return summary
