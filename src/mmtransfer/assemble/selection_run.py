"""Label-free model selection inside a domain run: a held-out share of the source, and DEV/IWV at every evaluation.

With ``selection.holdout`` above 0, that share of each source's labelled images
(stratified by class, seeded) never trains; every evaluation then estimates the
target risk from them and from unlabelled target images (:mod:`mmtransfer.selection`),
logs ``eval/dev_risk``, ``eval/iwv_risk``, ``eval/holdout_loss`` and ``eval/holdout_acc``,
and the run's summary names the evaluated step with the lowest DEV risk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import FRACTION, at_least, check_ranges

logger = logging.getLogger(__name__)

HOLDOUT = "holdout"
TARGET_UNLABELLED = "target_unlabelled"


@dataclass
class SelectionConfig:
    """Label-free checkpoint and hyper-parameter selection (DEV and IWV; docs/domain_adaptation.md)."""

    # Share of each source's labelled images held out from training to estimate the target
    # risk without target labels at every evaluation (0: off; 0.1 is usual). classify task only.
    holdout: float = 0.0
    # Unlabelled target images (a seeded sample) that the density ratio's domain classifier sees.
    max_target: int = 4000

    def __post_init__(self) -> None:
        check_ranges(self, holdout=FRACTION, max_target=at_least(10))


def hold_out(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """Split ``dataset`` into (kept, held out): ``fraction`` of every class's rows, drawn with ``seed``."""
    labels = torch.tensor(dataset.select_columns(["label"])["label"])
    gen = torch.Generator().manual_seed(seed)
    held: list[int] = []
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        n = int(round(fraction * len(rows)))
        held += rows[torch.randperm(len(rows), generator=gen)[:n]].tolist()
    if not held or len(held) == len(labels):
        raise ValueError(f"selection.holdout={fraction} holds out {len(held)} of {len(labels)} source images; "
                         "choose a share that leaves images on both sides (e.g. 0.1).")
    held_set = set(held)
    kept = [i for i in range(len(labels)) if i not in held_set]
    return dataset.select(kept), dataset.select(sorted(held))


def target_sample(n: int, max_target: int, seed: int) -> list[int]:
    """Positions of at most ``max_target`` of ``n`` target images, a seeded sample in sorted order."""
    if n <= max_target:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_target].tolist())


def label_free_metrics(held: dict[str, torch.Tensor], target: dict[str, torch.Tensor], seed: int) -> dict[str, float]:
    """DEV and IWV risks and the held-out loss from the classifier's outputs (``features``, ``logits``, ``labels``)."""
    from ..selection import label_free_risk

    losses = F.cross_entropy(held["logits"], held["labels"], reduction="none")  # (N_s,)
    risk = label_free_risk(held["features"], losses, target["features"], seed)
    return {"dev_risk": risk.dev, "iwv_risk": risk.iwv, "holdout_loss": risk.source}


def lowest_risk_step(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """From metrics.jsonl rows, the evaluated step with the lowest ``eval/dev_risk`` and every step's risks."""
    rows = [r for r in history if "eval/dev_risk" in r]
    if not rows:
        return None
    best = min(rows, key=lambda r: r["eval/dev_risk"])
    return {"best_step": best["step"], "by": "dev",
            "risks": {r["step"]: {"dev": r["eval/dev_risk"], "iwv": r["eval/iwv_risk"]} for r in rows}}
