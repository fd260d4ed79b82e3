"""What every task (objective) exchanges with the training loop.

A task is an ``nn.Module`` mapping ``(batch, StepInfo)`` to a :class:`TaskOutput`;
schedules inside it are pure functions of the :class:`StepInfo`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepInfo:
    """Where training stands; schedules inside tasks are pure functions of it."""

    step: int
    total_steps: int

    @property
    def progress(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


@dataclass
class TaskOutput:
    """A task's loss and the scalar metrics to log with it."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
