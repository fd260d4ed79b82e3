"""Choosing a checkpoint or a hyper-parameter without target labels.

Picking the step or the setting with the best target accuracy uses target
labels, which an unsupervised domain-adaptation user does not have (and a
benchmark that does so overstates its methods). The risks here need labelled
source images held out from training and unlabelled target images only:

- **Importance-weighted validation** (IWV, Sugiyama et al. 2007): the held-out
  source loss with each image weighted by the density ratio
  w(x) = p_target(x) / p_source(x), an unbiased estimate of the target loss
  under covariate shift. The ratio comes from a cross-fitted, calibrated
  logistic domain classifier on the model's own features
  (:func:`mmtransfer.losses.reweight.classifier_density_ratio`).
- **Deep embedded validation** (DEV, You et al. 2019): IWV with the weights as
  a control variate (their mean is 1 in expectation), which removes most of
  IWV's variance:

      L = w * loss,  eta = -Cov(L, w) / Var(w),  DEV = mean(L) + eta * mean(w) - eta.

Lower is better for both. :func:`select` picks the candidate with the lowest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .losses.reweight import classifier_density_ratio


@dataclass
class ValidationRisk:
    """Label-free estimates of the target risk of one model (lower is better).

    ``dev`` and ``iwv`` estimate the target loss; ``source`` is the plain held-out
    source loss; ``eta`` is DEV's control-variate coefficient; ``ess`` the effective
    sample size of the weights as a fraction of the held-out rows.
    """

    dev: float
    iwv: float
    source: float
    eta: float
    ess: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def dev_risk(losses: torch.Tensor, weights: torch.Tensor) -> ValidationRisk:
    """DEV and IWV risks from per-example held-out source losses and their density ratios.

    Shapes:
        losses: (N,) per-example losses; weights: (N,) p_target / p_source at those examples.

    Example:
        >>> r = dev_risk(torch.tensor([0.1, 0.2, 2.0, 0.1]), torch.tensor([0.5, 0.5, 2.5, 0.5]))
        >>> round(r.dev, 3), round(r.iwv, 3), round(r.source, 3)  # the weights' mean is 1 here: DEV = IWV
        (1.3, 1.3, 0.6)
    """
    if losses.shape != weights.shape or losses.ndim != 1 or losses.numel() < 2:
        raise ValueError(f"losses and weights must be two (N,) tensors with N >= 2, got {tuple(losses.shape)} and "
                         f"{tuple(weights.shape)}.")
    losses, weights = losses.double(), weights.double()
    weighted = weights * losses  # (N,)
    var = weights.var()
    eta = float(-((weighted - weighted.mean()) * (weights - weights.mean())).sum() / (len(weights) - 1) / var) if var > 0 else 0.0
    dev = float(weighted.mean() + eta * weights.mean() - eta)
    ess = float(weights.sum() ** 2 / (weights.pow(2).sum() * len(weights)))
    return ValidationRisk(dev=dev, iwv=float(weighted.mean()), source=float(losses.mean()), eta=eta, ess=ess)


def label_free_risk(holdout_features: torch.Tensor, holdout_losses: torch.Tensor, target_features: torch.Tensor,
                    seed: int = 0, max_target: int = 4000) -> ValidationRisk:
    """DEV and IWV of one model from its features of held-out source and unlabelled target images.

    Args:
        holdout_features: (N_s, D) the model's features of labelled source images it did not train on.
        holdout_losses: (N_s,) its loss on each of them (e.g. cross-entropy with the true label).
        target_features: (N_t, D) its features of unlabelled target images.
        seed: cross-fitting folds (and which target rows are kept when there are more than ``max_target``).
        max_target: at most this many target rows fit the domain classifier.
    """
    if len(target_features) > max_target:
        keep = torch.randperm(len(target_features), generator=torch.Generator().manual_seed(seed))[:max_target]
        target_features = target_features[keep]
    ratio, _ = classifier_density_ratio(holdout_features.double(), target_features.double(), seed=seed)
    return dev_risk(holdout_losses, ratio)


def select(candidates: Mapping[Any, ValidationRisk | Mapping[str, float]], by: str = "dev") -> Any:
    """The key of the candidate (a step, a setting, a run) with the lowest risk ``by`` ("dev", "iwv" or "source").

    Example:
        >>> select({500: {"dev": 0.4}, 1000: {"dev": 0.3}, 1500: {"dev": 0.35}})
        1000
    """
    if by not in ("dev", "iwv", "source"):
        raise ValueError(f"Unknown risk '{by}'; use dev, iwv or source.")
    if not candidates:
        raise ValueError("No candidates to select from.")

    def value(risk: ValidationRisk | Mapping[str, float]) -> float:
        return float(risk[by] if isinstance(risk, Mapping) else getattr(risk, by))

    return min(candidates, key=lambda k: value(candidates[k]))


def rank_agreement(risks: Sequence[float], accuracies: Sequence[float]) -> float:
    """Spearman correlation between -risk and accuracy over candidates (1: the risk orders them exactly as the labels would)."""
    if len(risks) != len(accuracies) or len(risks) < 2:
        raise ValueError("Need the same number (>= 2) of risks and accuracies.")

    def ranks(values: Sequence[float]) -> torch.Tensor:
        order = torch.tensor(values, dtype=torch.float64).argsort()
        r = torch.empty(len(values), dtype=torch.float64)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        return r

    a, b = ranks([-x for x in risks]), ranks(list(accuracies))
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
