"""How the losses of a multi-task run add up: fixed weights, or learned uncertainty weighting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn


@dataclass
class WeightedLoss:
    """Task losses combined into one.

    Shapes (all scalars):
        loss: () the combined loss to minimise.
        weights: task -> () the effective multiplier of its loss (w_k, or exp(-s_k) w_k).
        log_vars: task -> () s_k (uncertainty weighting; empty for fixed weights).
    """

    loss: torch.Tensor
    weights: dict[str, torch.Tensor]
    log_vars: dict[str, torch.Tensor] = field(default_factory=dict)


class FixedWeighting(nn.Module):
    """L = sum_k w_k L_k with fixed weights w_k.

    Example:
        >>> FixedWeighting({"a": 1.0, "b": 0.5})({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}).loss
        tensor(4.)
    """

    def __init__(self, weights: dict[str, float]) -> None:
        super().__init__()
        self.fixed = dict(weights)

    def forward(self, losses: dict[str, torch.Tensor]) -> WeightedLoss:
        total = sum(self.fixed[k] * loss for k, loss in losses.items())
        weights = {k: torch.tensor(self.fixed[k]) for k in losses}
        return WeightedLoss(loss=total, weights=weights)


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting with learnable log-variances.

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics" (CVPR 2018). The variant used here gives
    every task the same form, with s_k = log sigma_k^2 and no 1/2 factors:

        L = sum_k exp(-s_k) w_k L_k + s_k

    (w_k the fixed weights, 1 by default). For fixed L_k the minimum over s_k is
    at s_k = log(w_k L_k): a task's effective weight exp(-s_k) w_k tends to the
    inverse of its loss, and the + s_k term keeps the weights from collapsing to 0.

    Gradients:
        dL/ds_k = 1 - exp(-s_k) w_k L_k;   dL/dtheta = sum_k exp(-s_k) w_k dL_k/dtheta.

    The s_k are parameters of the module (so of the task): the optimizer trains
    them, checkpoints save them and a resumed run continues from them.

    Args:
        names: the tasks, in a fixed order (``log_vars[i]`` belongs to ``names[i]``).
        weights: fixed weights w_k (None: all 1).
        init: s_k at the start.

    Shapes:
        log_vars: (K,); losses: task -> () -> :class:`WeightedLoss`.

    Example:
        >>> uw = UncertaintyWeighting(["captions", "labels"])
        >>> out = uw({"captions": torch.tensor(2.0), "labels": torch.tensor(3.0)})
        >>> float(out.loss)  # exp(0) * 2 + 0 + exp(0) * 3 + 0
        5.0
    """

    def __init__(self, names: Sequence[str], weights: dict[str, float] | None = None, init: float = 0.0) -> None:
        super().__init__()
        if not names:
            raise ValueError("UncertaintyWeighting needs at least one task name.")
        self.names = list(names)
        self.fixed = {k: float((weights or {}).get(k, 1.0)) for k in self.names}
        self.log_vars = nn.Parameter(torch.full((len(self.names),), float(init)))

    def forward(self, losses: dict[str, torch.Tensor]) -> WeightedLoss:
        unknown = sorted(set(losses) - set(self.names))
        if unknown:
            raise KeyError(f"UncertaintyWeighting has no log-variance for {unknown}; it was built for {self.names}.")
        total = self.log_vars.new_zeros(())
        weights, log_vars = {}, {}
        for i, name in enumerate(self.names):
            if name not in losses:
                continue
            s = self.log_vars[i]
            precision = torch.exp(-s) * self.fixed[name]
            total = total + precision * losses[name].to(s.dtype) + s
            weights[name], log_vars[name] = precision.detach(), s.detach()
        return WeightedLoss(loss=total, weights=weights, log_vars=log_vars)
