"""Text tower: any Hugging Face ``AutoModel`` with its tokenizer, plus pooling."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..config import TextEncoderConfig
from ..registry import TEXT_ALIASES, UnknownModelError, resolve_text_name
from .common import find_blocks
from .files import check_hf_folder
from .outputs import TextEncoderOutput

logger = logging.getLogger(__name__)

TEXT_CONFIG_DIR = "text_config"
TOKENIZER_DIR = "tokenizer"


def _load_hf(what: str, loader: Any, source: str, **kwargs: Any) -> Any:
    """Call a Hugging Face ``from_pretrained`` and turn its failures into one clear sentence.

    A local folder whose config.json or safetensors weights are broken raises
    :class:`~mmtransfer.ModelFileError` naming the file; anything else that cannot
    be loaded is an :class:`UnknownModelError`.
    """
    from safetensors import SafetensorError

    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:
        if Path(source).is_dir():
            # Only now, on the error path, read the folder's files to find the broken one.
            check_hf_folder(Path(source))
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        where = "a local folder" if Path(source).exists() else "a Hugging Face hub name"
        raise UnknownModelError(
            f"Cannot load the text {what} '{source}' as {where}: {str(err).splitlines()[0]} "
            f"Packaged offline aliases: {', '.join(TEXT_ALIASES)}."
            + (" HF_HUB_OFFLINE=1 is set, so hub names must already be in the local cache." if offline else "")
        ) from err


class TextEncoder(nn.Module):
    """A Hugging Face encoder and its tokenizer, pooled to one vector per text.

    Args:
        config: which model, pooling and truncation.
        model: the ``transformers`` model (``AutoModel``) to wrap.
        tokenizer: its tokenizer.

    Shapes:
        input_ids, attention_mask: (B, T) -> tokens (B, T, D), pooled (B, D).

    Example:
        >>> enc = TextEncoder.from_config(TextEncoderConfig("minilm-l6"))
        >>> enc(**enc.tokenize(["a cat"])).pooled.shape
        torch.Size([1, 384])
    """

    def __init__(
        self, config: TextEncoderConfig, model: nn.Module, tokenizer: Any, load_report: dict[str, list[str]] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        # The tower pools its own tokens (mean or first token), so a BERT-style pooler head
        # (`pooler.dense`) would be computed and never reach a loss: under several processes
        # DDP then stops on parameters that get no gradient. It is dropped, not frozen, so no
        # freezing policy can make it trainable again.
        if isinstance(getattr(model, "pooler", None), nn.Module):
            model.pooler = None
        self.model = model
        self.tokenizer = tokenizer
        # Keys the pretrained checkpoint lacked or had in excess (empty when it fit exactly).
        self.load_report = load_report or {"missing_keys": [], "unexpected_keys": []}

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_config(cls, config: TextEncoderConfig) -> "TextEncoder":
        """Build from a name or folder, with pretrained or random weights."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = resolve_text_name(config.name)
        hf_config = _load_hf("model config", AutoConfig, source)
        for key, value in config.config_overrides.items():
            if not hasattr(hf_config, key):
                raise UnknownModelError(
                    f"text.config_overrides: '{key}' is not a field of the {type(hf_config).__name__} of '{config.name}'."
                )
            setattr(hf_config, key, value)
        tokenizer = _load_hf("tokenizer", AutoTokenizer, source)
        report = None
        if config.pretrained:
            model, info = _load_hf("model", AutoModel, source, config=hf_config, output_loading_info=True)
            # The pooler head is dropped (see __init__): whether the checkpoint had one does not matter.
            report = {k: sorted(n for n in info.get(k, ()) if not n.startswith("pooler.")) for k in ("missing_keys", "unexpected_keys")}
            if report["missing_keys"] or report["unexpected_keys"]:
                logger.warning(
                    "Text encoder '%s': %d weights missing from the checkpoint (freshly initialised), %d unused: %s",
                    config.name, len(report["missing_keys"]), len(report["unexpected_keys"]), report,
                )
        else:
            model = AutoModel.from_config(hf_config)
        return cls(config, model, tokenizer, report)

    @classmethod
    def from_saved(cls, config: TextEncoderConfig, directory: str | Path) -> "TextEncoder":
        """Rebuild the architecture and tokenizer written by :meth:`save_extras` (weights load separately)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        directory = Path(directory)
        hf_config = AutoConfig.from_pretrained(directory / TEXT_CONFIG_DIR)
        model = AutoModel.from_config(hf_config)
        tokenizer = AutoTokenizer.from_pretrained(directory / TOKENIZER_DIR)
        return cls(config, model, tokenizer)

    def save_extras(self, directory: str | Path) -> None:
        """Write the Hugging Face config and the tokenizer files into ``directory``."""
        directory = Path(directory)
        self.model.config.save_pretrained(directory / TEXT_CONFIG_DIR)
        self.tokenizer.save_pretrained(directory / TOKENIZER_DIR)

    # -- use -----------------------------------------------------------------------

    @property
    def is_pretrained_tower(self) -> bool:
        """True when the weights came pretrained: the trainer gives them the lower tower learning rate."""
        return bool(self.config.pretrained)

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def blocks(self) -> list[nn.Module]:
        return find_blocks(self.model)

    @property
    def gradient_checkpointing(self) -> bool:
        """True when the transformer's layers recompute their activations in the backward pass."""
        return any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules())

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer layer in the backward pass instead of keeping its activations.

        Hugging Face checkpoints a layer only in training mode with gradients enabled, so
        evaluation and feature caching run as before. Non-reentrant checkpointing needs no
        input that requires grad: the hook transformers adds to make the embeddings' output
        require grad is removed again, so a frozen tower still builds no graph.
        """
        model = self.model
        if not enable:
            if self.gradient_checkpointing:
                (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
            return
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"The text tower '{self.config.name}' ({type(model).__name__}) does not support gradient "
                             "checkpointing: set model.gradient_checkpointing=false.")
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
            model.disable_input_require_grads()
        if getattr(model.config, "use_cache", False):  # an encoder keeps no cache; this silences transformers' warning
            model.config.use_cache = False

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids`` and ``attention_mask``, (B, T), padded to the longest."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"Texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}.")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, D)
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]  # (B, D)
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, D)
        return TextEncoderOutput(tokens=tokens, attention_mask=attention_mask, pooled=pooled)
