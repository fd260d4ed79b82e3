"""Fast dev runs: a recipe shrinks its data sections to a balanced sample and marks the run; the loop then runs two steps."""

from __future__ import annotations

from typing import Any, Iterable

from ..train import TrainConfig


def fast_dev_slice(config: TrainConfig, sections: Iterable[Any], rows: int) -> None:
    """Turn a run into a fast dev run: two steps, one evaluation (:func:`~mmtransfer.train.loop_settings`), at most ``rows`` rows per data section."""
    config.fast_dev_run = True
    for section in sections:
        if section is not None:
            section.max_samples = min(section.max_samples or rows, rows)
            section.sample = "balanced"  # the first rows of a set sorted by class are one class: accuracies would mean nothing
