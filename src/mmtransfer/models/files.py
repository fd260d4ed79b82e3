"""Reading the files of a saved model folder, with errors that name the broken file and say what to do.

A folder copied half-way, or a download cut short, leaves a truncated ``model.safetensors`` or
``config.json``; the libraries that read them raise ``SafetensorError`` or ``JSONDecodeError``
without a file name. These helpers raise :class:`~mmtransfer.registry.ModelFileError` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..registry import ModelFileError

FIX = "save the model again (save_pretrained) or copy its folder again"


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; a missing, truncated or invalid file raises :class:`ModelFileError` naming it."""
    if not path.is_file():
        raise ModelFileError(f"'{path}' is missing from the model folder; {FIX}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise ModelFileError(f"'{path}' is truncated or not valid JSON ({err}); {FIX}.") from None


def check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file, which also checks that the file is as long as it says."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"'{path}' is truncated or not a safetensors file ({err}); {FIX}.") from None


def load_weights(model: nn.Module, path: Path, device: str = "cpu", obsolete: tuple[str, ...] = ()) -> None:
    """Load the safetensors file ``path`` into ``model`` (every key must match), naming the file when it cannot.

    Keys starting with one of ``obsolete`` may be in the file without a place in the
    model (weights that an older version saved and this one no longer has).
    """
    from safetensors.torch import load_model

    if not path.is_file():
        raise ModelFileError(f"'{path}' is missing from the model folder; {FIX}.")
    check_safetensors(path)
    try:
        missing, unexpected = load_model(model, str(path), strict=False, device=device)
        unexpected = [k for k in unexpected if not k.startswith(obsolete)] if obsolete else unexpected
        if missing or unexpected:
            raise RuntimeError(f"Error(s) in loading state_dict\nmissing keys {sorted(missing)[:5]}, "
                               f"unexpected keys {sorted(unexpected)[:5]}")
    except RuntimeError as err:
        # torch's message starts "Error(s) in loading state_dict"; the next line says which keys or shapes differ.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:300] if lines else type(err).__name__
        raise ModelFileError(
            f"'{path}' holds the weights of a different model than its folder's config describes ({detail}); "
            f"keep the config and weights of one save together: {FIX}."
        ) from None


def check_hf_folder(folder: Path) -> None:
    """Raise :class:`ModelFileError` for the first broken ``config.json`` or ``*.safetensors`` in a Hugging Face folder."""
    if (folder / "config.json").is_file():
        read_json(folder / "config.json")
    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)
