"""L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning"): ``alpha / 2 * sum ||w - w0||^2``.

The penalty pulls the trainable parameters of pretrained towers (modules that declare
``is_pretrained_tower = True``) toward ``w0``, the values they had when the penalty was
built; new parameters (projections, fusion, heads) are not penalised, frozen ones not either.

    l2sp = L2SP(task, alpha=0.01)   # snapshot w0 before any checkpoint is loaded into the task
    loss = l2sp.add_to(task_loss, metrics)

``w0`` is held here, not in a module: it never enters a state dict, a checkpoint's
``model.safetensors`` or an exported model, so a resumed run must build this object from
the pretrained weights again (the trainer does, before it loads the checkpoint).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def tower_parameter_ids(module: nn.Module) -> set[int]:
    """The ids of every parameter inside a submodule that declares ``is_pretrained_tower = True``."""
    ids: set[int] = set()
    for m in module.modules():
        if getattr(m, "is_pretrained_tower", False):
            ids.update(id(p) for p in m.parameters())
    return ids


class L2SP:
    """``alpha / 2 * sum ||w - w0||^2`` over the trainable tower parameters of ``module``.

    Args:
        module: the unwrapped task or model, its parameters already on their device; the
            parameters of pretrained towers with ``requires_grad=True`` are snapshotted now.
        alpha: the strength; 0 disables (``bool(l2sp)`` is then False and nothing is copied).

    With ``alpha > 0`` and no trainable tower parameter, one warning says so and the penalty stays off.
    """

    def __init__(self, module: nn.Module, alpha: float) -> None:
        self.alpha = float(alpha)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.anchors: list[torch.Tensor] = []
        if self.alpha <= 0:
            return
        towers = tower_parameter_ids(module)
        for name, p in module.named_parameters():  # shared parameters are listed once
            if p.requires_grad and id(p) in towers:
                self.names.append(name)
                self.params.append(p)
                self.anchors.append(p.detach().clone())  # same device and dtype as the parameter
        if not self.params:
            logger.warning("optim.l2sp=%g, but no parameter of a pretrained tower is trainable: L2-SP has "
                           "nothing to act on and is off (unfreeze some tower blocks, e.g. freeze.text_keep_last=2).",
                           self.alpha)

    def __bool__(self) -> bool:
        return bool(self.params)

    def penalty(self) -> torch.Tensor:
        """The penalty as a 0-d float32 tensor on the parameters' device, differentiable in the parameters."""
        if not self.params:
            return torch.zeros(())
        total = sum(((p.float() - w0.float()) ** 2).sum() for p, w0 in zip(self.params, self.anchors))
        return 0.5 * self.alpha * total

    def add_to(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor | float]) -> torch.Tensor:
        """``loss`` plus the penalty, whose value is also written to ``metrics["l2sp"]``; ``loss`` when off."""
        if not self.params:
            return loss
        penalty = self.penalty()
        metrics["l2sp"] = penalty.detach()
        return loss + penalty
