"""Unsupervised domain adaptation: the recipe behind ``scripts/domain_adapt.py``.

A labelled (or captioned) *source* domain and an unlabelled *target* domain
train together, one batch of each per step. Two tasks:

- ``classify``: an image classifier (a LeNet-style CNN from scratch, or any
  timm / torchvision backbone) learns the source labels; a domain loss
  (DANN, CDAN, CDAN+E, MK-MMD or CORAL) acts on its features so that they stop
  telling the domains apart. Accuracy is measured on labelled target images.
- ``multimodal``: a :class:`~mmtransfer.MultimodalModel` learns from source
  captions with the contrastive loss; a domain loss acts on the shared image
  embedding (or the image tower's pooled features, or fused image-text
  features). Accuracy is zero-shot top-1: images against their class names.

Two extensions of the same recipe:

- **Importance re-weighting** (``reweight``): before training, the density
  ratio p_target(x) / p_source(x) is estimated on features (a logistic domain
  classifier or kernel mean matching, :mod:`mmtransfer.losses.reweight`); the
  clipped, normalised weights ride with the source rows and weight the source
  cross-entropy or the contrastive loss, alone or with a domain loss.
- **Several labelled sources** (``data.extra_sources``): domain generalisation.
  The sources are pooled (balanced by default); the domain loss becomes a
  K-way discriminator or CORAL/MMD between every pair of training domains, the
  target, if any, being one more domain; ``data.target_test`` is a domain never
  trained on. ``method.name: none`` is the pooled baseline.

Everything goes through the one training loop: one optimizer, one backward
per step, the gradient-reversal strength a pure function of the step.
"""

from __future__ import annotations

from typing import Any

from ..assemble.domain_run import fit_domain_run
from ..assemble.domains import AdaptConfig


def run(cfg: AdaptConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Train and evaluate per ``cfg``; returns the summary (also in the run folder's summary.json)."""
    return fit_domain_run(cfg, fast_dev_run)
