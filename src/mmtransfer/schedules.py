"""Schedules as pure functions of the step: nothing to restore on resume but the step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up from 0 to 1, then cosine decay to ``min_ratio``.

    Example:
        >>> warmup_cosine(0, 100, 10), warmup_cosine(10, 100, 10), round(warmup_cosine(100, 100, 10), 6)
        (0.0, 1.0, 0.0)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up, then a constant multiplier of 1."""
    return step / warmup_steps if warmup_steps > 0 and step < warmup_steps else 1.0


def warmup_linear(step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Linear warm-up, then linear decay to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - (1.0 - min_ratio) * progress


def warmup_inverse(step: int, total_steps: int, warmup_steps: int = 0, gamma: float = 0.001, power: float = 0.75) -> float:
    """Linear warm-up, then (1 + gamma * s) ** -power with s the steps after warm-up.

    Example:
        >>> warmup_inverse(0, 1500), round(warmup_inverse(1500, 1500), 4)
        (1.0, 0.503)
    """
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    return (1.0 + gamma * (step - warmup_steps)) ** -power


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """Gradient-reversal strength of DANN: 2 / (1 + exp(-gamma * p)) - 1, for progress p in [0, 1].

    Example:
        >>> dann_lambda(0.0), round(dann_lambda(1.0), 4)
        (0.0, 0.9999)
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


LR_SCHEDULES = {"cosine": warmup_cosine, "constant": warmup_constant, "linear": warmup_linear}
