"""Ensembles of separately trained runs: one model whose image projection averages theirs.

Runs of one recipe that differ only in their seed share their frozen towers and
text side; their image projections make partly independent errors, which the
mean of their normalised outputs averages out (docs/results/transfer.md). An
:class:`EnsembleModel` is a :class:`~mmtransfer.MultimodalModel` in every use
(encoding, zero-shot classifiers, ``save_pretrained``); its folder adds
``ensemble.json`` (how many projections), which :func:`mmtransfer.load` reads.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, to_dict
from .fusion import Projection
from .image import ImageEncoder
from .multimodal import MultimodalModel
from .text import TextEncoder

ENSEMBLE_FILE = "ensemble.json"


class ProjectionEnsemble(nn.Module):
    """K projections trained apart; the output is the mean of their normalised outputs.

    The output is not unit length; normalise it as any projection's output.

    Shapes:
        (B, D_in) -> (B, E); members: (B, D_in) -> (K, B, E) normalised.
    """

    def __init__(self, projections: Sequence[nn.Module]) -> None:
        super().__init__()
        self.projections = nn.ModuleList(projections)

    def members(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(p(x), dim=-1) for p in self.projections])  # (K, B, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.members(x).mean(0)  # (B, E)


def image_projections(model: MultimodalModel) -> list[nn.Module]:
    """The image projections of ``model``: its own one, or every member of an ensemble's."""
    if isinstance(model.image_projection, ProjectionEnsemble):
        return list(model.image_projection.projections)
    return [model.image_projection]


class EnsembleModel(MultimodalModel):
    """A multimodal model whose image projection is a :class:`ProjectionEnsemble` of ``members`` projections."""

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder, image_encoder: ImageEncoder, members: int) -> None:
        super().__init__(config, text_encoder, image_encoder)
        if members < 2:
            raise ValueError(f"An ensemble has at least two image projections, got {members}.")
        kind = config.image_projection or config.projection
        self.image_projection = ProjectionEnsemble(
            [Projection(image_encoder.width, config.embed_dim, kind, config.projection_dropout) for _ in range(members)])

    @property
    def members(self) -> int:
        return len(self.image_projection.projections)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        target = super().save_pretrained(directory)
        (target / ENSEMBLE_FILE).write_text(json.dumps({"image_projections": self.members}, indent=2))
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "EnsembleModel":
        from .files import read_json

        members = int(read_json(Path(directory) / ENSEMBLE_FILE)["image_projections"])
        return load_ensemble(directory, members, map_location)


def load_ensemble(directory: str | os.PathLike, members: int, map_location: str | torch.device = "cpu") -> EnsembleModel:
    """An ensemble saved in ``directory`` with ``members`` image projections (see :meth:`MultimodalModel.from_pretrained`)."""
    return MultimodalModel.from_pretrained(directory, map_location, build=lambda c, t, i: EnsembleModel(c, t, i, members))


def ensemble_image_projections(models: Sequence[MultimodalModel]) -> EnsembleModel:
    """One model whose image projection is the ensemble of the image projections of ``models``.

    For models trained apart (e.g. the same recipe with different seeds) on the
    same frozen towers and text side: everything but the image projection and the
    temperature must be identical, which holds when the towers were frozen and the
    text projection is "none" (``configs/openmoji_transfer.yaml``). An image's
    embedding is then the mean of every member's normalised embedding (members of
    ensembles count one by one); the logit scale is the geometric mean of theirs.

    Example:
        >>> runs = [mmtransfer.load(f"runs/transfer_seed{s}/model") for s in range(3)]
        >>> ensemble_image_projections(runs).save_pretrained("runs/transfer_ensemble")
    """
    if len(models) < 2:
        raise ValueError(f"An ensemble needs at least two models, got {len(models)}.")
    first = models[0]

    def shared_state(m: MultimodalModel) -> dict[str, torch.Tensor]:
        return {k: v for k, v in m.state_dict().items() if not k.startswith("image_projection.") and k != "logit_scale"}

    config, reference = to_dict(first.config), shared_state(first)
    for i, m in enumerate(models[1:], start=1):
        if (other := to_dict(m.config)) != config:
            diff = sorted(k for k, v in other.items() if config.get(k) != v)
            raise ValueError(f"Model {i} is configured differently from model 0 ({', '.join(diff)}): "
                             "ensemble models of one recipe that differ only in their seed.")
        differing = sorted({k.split(".")[0] for k, v in shared_state(m).items() if not torch.equal(v, reference[k])})
        if differing:
            raise ValueError(
                f"Model {i} differs from model 0 in {', '.join(differing)}, not only in its image projection: only the image "
                "projection is ensembled. Train with frozen towers (freeze.text/freeze.image), text_projection=none and "
                "no fusion layer (fusion.num_layers=0), as configs/openmoji_transfer.yaml does."
            )
    projections = [copy.deepcopy(p) for m in models for p in image_projections(m)]
    merged = EnsembleModel(first.config, copy.deepcopy(first.text_encoder), copy.deepcopy(first.image_encoder), len(projections))
    merged.image_projection = ProjectionEnsemble(projections)
    state: dict[str, Any] = {k: v for k, v in first.state_dict().items() if not k.startswith("image_projection.")}
    missing, unexpected = merged.load_state_dict(state, strict=False)  # everything but the projections set above
    assert not unexpected and all(k.startswith("image_projection.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        merged.logit_scale.copy_(torch.stack([m.logit_scale.detach() for m in models]).mean())
    return merged.eval()
