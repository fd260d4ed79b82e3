"""Knowledge-distillation losses over a student's and a frozen teacher's outputs.

Both losses are modules with no state that map (student, teacher) tensors to
one :class:`DistillOutput`. The teacher's tensors are treated as targets: they
are detached here, so no gradient reaches the teacher even when its forward
pass was not run under ``torch.no_grad``. Both are computed in float32 (safe
under bf16/fp16 autocast) and are exactly zero when the student's tensors equal
the teacher's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillOutput:
    """Loss and diagnostics of one distillation step.

    Shapes (all scalars):
        loss: () the quantity to add (times a weight) to the student's loss.
        agreement: () for :class:`KDLoss`, the share of rows whose top-1 class is the
            teacher's; for :class:`EmbeddingDistillLoss`, the mean cosine similarity
            of student and teacher vectors.
    """

    loss: torch.Tensor
    agreement: torch.Tensor

    def metrics(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Detached values to log, keys prefixed by ``prefix``."""
        return {f"{prefix}loss": self.loss.detach(), f"{prefix}agreement": self.agreement.detach()}


class KDLoss(nn.Module):
    """Hinton et al. (2015): KL(teacher || student) on temperature-softened class probabilities, times T².

    ``L = T² · (1/B) Σ_b Σ_c p_t(c) (log p_t(c) − log p_s(c))`` with
    ``p = softmax(logits / T)``. The T² factor keeps the gradient's size
    independent of T, so the weight of this term need not change with T.

    Args:
        temperature: T > 0; higher spreads the teacher's probability over more classes.

    Shapes:
        student_logits (B, C), teacher_logits (B, C) -> :class:`DistillOutput` of scalars.

    Example:
        >>> kd = KDLoss(temperature=4.0)
        >>> logits = torch.randn(8, 10)
        >>> kd(logits, logits).loss
        tensor(0.)
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KDLoss temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> DistillOutput:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"KDLoss needs student and teacher logits of one shape; got {tuple(student_logits.shape)} and "
                f"{tuple(teacher_logits.shape)} (do both models have the same classes?)."
            )
        T = self.temperature
        log_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (B, C)
        log_t = F.log_softmax(teacher_logits.detach().float() / T, dim=-1)  # (B, C)
        # kl_div with log_target computes exp(log_t) * (log_t - log_s): exactly 0 where the two agree.
        loss = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * (T * T)
        agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        return DistillOutput(loss=loss, agreement=agreement)


class EmbeddingDistillLoss(nn.Module):
    """Match the student's embeddings to the teacher's: cosine or mean squared error.

    ``cosine``: ``(1/B) Σ_b ½ ‖ŝ_b − t̂_b‖²`` with ``x̂ = x / ‖x‖``, which equals
    ``1 − cos(s_b, t_b)`` and is computed in this form because it is exactly zero
    for equal inputs (a cosine of a vector with itself can round to 1 ± 1 ulp).
    ``mse``: ``(1/(B·D)) Σ (s − t)²``, on the raw vectors (or the normalised
    ones with ``normalize=True``).

    Args:
        kind: "cosine" or "mse".
        normalize: for "mse", L2-normalise both sides first.

    Shapes:
        student (B, D), teacher (B, D) -> :class:`DistillOutput` of scalars.

    Example:
        >>> loss = EmbeddingDistillLoss("cosine")
        >>> z = torch.randn(4, 256)
        >>> loss(z, z).loss, loss(z, -z).loss
        (tensor(0.), tensor(2.))
    """

    def __init__(self, kind: Literal["cosine", "mse"] = "cosine", normalize: bool = False) -> None:
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"EmbeddingDistillLoss kind must be 'cosine' or 'mse', got '{kind}'.")
        self.kind = kind
        self.normalize = normalize

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> DistillOutput:
        if student.shape != teacher.shape:
            raise ValueError(
                f"EmbeddingDistillLoss needs student and teacher embeddings of one shape; got {tuple(student.shape)} "
                f"and {tuple(teacher.shape)}."
            )
        s = student.float()
        t = teacher.detach().float()
        s_hat, t_hat = F.normalize(s, dim=-1), F.normalize(t, dim=-1)  # (B, D)
        if self.kind == "cosine":
            loss = 0.5 * (s_hat - t_hat).pow(2).sum(-1).mean()
        else:
            loss = F.mse_loss(s_hat, t_hat) if self.normalize else F.mse_loss(s, t)
        agreement = (s_hat * t_hat).sum(-1).mean()
        return DistillOutput(loss=loss, agreement=agreement)
