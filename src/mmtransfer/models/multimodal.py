"""MultimodalModel: two pretrained towers, a shared embedding space and a fusion stack.

    texts  -> TextEncoder  -> tokens (B, T, Dt), pooled (B, Dt) -> text_projection  -> (B, E)
    images -> ImageEncoder -> tokens (B, P, Di), pooled (B, Di) -> image_projection -> (B, E)
    (text tokens, image tokens) -> Fusion -> fused tokens (B, T, W), pooled (B, W) -> ITM logits (B, 2)

Contrastive logits are cosine similarities times a learnable inverse
temperature, clamped to ``config.max_logit_scale``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, from_dict, to_dict
from ..registry import ModelFileError
from .common import count_parameters, freeze, keep_frozen_norms_in_eval
from .files import FIX, load_weights, read_json
from .fusion import Fusion, Projection
from .image import ImageEncoder
from .outputs import FusionOutput, ImageEncoderOutput, MultimodalOutput, TextEncoderOutput
from .preprocess import ImagePreprocessor
from .text import TEXT_CONFIG_DIR, TextEncoder

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPE = "mmtransfer-multimodal"

TextInput = str | Sequence[str] | torch.Tensor | dict[str, torch.Tensor]


def _logit_scale_as_vector(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load hook: a scalar ``logit_scale`` (saved before it had one dimension) loads as one element."""
    value = state_dict.get(prefix + "logit_scale")
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        state_dict[prefix + "logit_scale"] = value.reshape(1)


def _autograd(grad: bool) -> contextlib.AbstractContextManager:
    """No autograd for the inference helpers unless asked: their outputs then hold no graph, and
    ``float(emb.norm())`` does not warn. ``no_grad`` rather than ``inference_mode``, so that the
    outputs can still enter a training computation (e.g. as distillation targets)."""
    return contextlib.nullcontext() if grad else torch.no_grad()


class MultimodalModel(nn.Module):
    """A text tower and an image tower aligned in one embedding space, with fusion.

    Args:
        config: the full model configuration.
        text_encoder: the text tower (built from ``config.text``).
        image_encoder: the image tower (built from ``config.image``).

    Shapes:
        ``encode_text``: B texts -> (B, E); ``encode_image``: B images -> (B, E).
        ``forward(pixel_values (B, 3, S, S), input_ids (B, T), attention_mask (B, T))``
        -> :class:`MultimodalOutput` with (B, B) logits.

    Example:
        >>> model = mmtransfer.create_model("minilm-l6-efficientnet-lite0")
        >>> model.similarity([image], ["a cat", "a dog"]).shape
        torch.Size([1, 2])
    """

    def __init__(self, config: ModelConfig, text_encoder: TextEncoder, image_encoder: ImageEncoder) -> None:
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        E = config.embed_dim
        drop = config.projection_dropout
        self.text_projection = Projection(text_encoder.width, E, config.text_projection or config.projection, drop)
        self.image_projection: nn.Module = Projection(image_encoder.width, E, config.image_projection or config.projection, drop)
        # One element rather than a scalar: FSDP2 shards only tensors with a dimension. Files written
        # when it was a scalar still load (see _logit_scale_as_vector).
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / config.init_temperature)))
        self.register_load_state_dict_pre_hook(_logit_scale_as_vector)
        self.fusion = (
            Fusion(config.fusion, text_encoder.width, image_encoder.width, config.fusion.width or E)
            if config.fusion.num_layers > 0
            else None
        )
        if config.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    # -- construction --------------------------------------------------------------

    @classmethod
    def from_config(cls, config: ModelConfig, pretrained: bool = True) -> "MultimodalModel":
        """Build both towers (pretrained unless ``pretrained=False``) and fresh heads."""
        if not pretrained:
            config = replace(
                config, text=replace(config.text, pretrained=False), image=replace(config.image, pretrained=False)
            )
        model = cls(config, TextEncoder.from_config(config.text), ImageEncoder.from_config(config.image))
        logger.warning(
            "The projections, temperature%s of this model are freshly initialised: "
            "train them (scripts/finetune_captions.py) before relying on its similarities.",
            ", fusion layers and matching head" if model.fusion is not None else "",
        )
        return model

    # -- inputs --------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def tokenizer(self) -> Any:
        return self.text_encoder.tokenizer

    @property
    def preprocessor(self) -> ImagePreprocessor:
        return self.image_encoder.preprocessor

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids``/``attention_mask`` (B, T) on the model's device."""
        return {k: v.to(self.device) for k, v in self.text_encoder.tokenize(texts).items()}

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL images (any mode) -> pixel tensor (B, 3, S, S) on the model's device."""
        return self.preprocessor(images).to(self.device)

    def _text_batch(self, texts: TextInput, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if isinstance(texts, str) or (isinstance(texts, Sequence) and not isinstance(texts, torch.Tensor)):
            return self.tokenize(texts)
        if isinstance(texts, torch.Tensor):
            return {"input_ids": texts, "attention_mask": attention_mask if attention_mask is not None else torch.ones_like(texts)}
        if isinstance(texts, dict) or hasattr(texts, "keys"):
            return {"input_ids": texts["input_ids"], "attention_mask": texts.get("attention_mask", attention_mask)}
        raise TypeError(f"encode_text takes strings, token ids or a tokenizer output, not {type(texts).__name__}.")

    def _pixels(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"Pixel tensors must be (B, 3, H, W); got shape {tuple(images.shape)}.")
            return images
        return self.preprocess(images)

    # -- towers and shared space ---------------------------------------------------

    def text_features(self, texts: TextInput, attention_mask: torch.Tensor | None = None) -> TextEncoderOutput:
        """Text tower output (tokens and pooled vector) before projection."""
        return self.text_encoder(**self._text_batch(texts, attention_mask))

    def image_features(self, images: Any) -> ImageEncoderOutput:
        """Image tower output (tokens and pooled vector) before projection."""
        return self.image_encoder(self._pixels(images))

    def project_text(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, Dt) pooled text features -> (B, E) shared-space embeddings."""
        z = self.text_projection(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def project_image(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, Di) pooled image features -> (B, E) shared-space embeddings."""
        z = self.image_projection(pooled)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(
        self, texts: TextInput, normalize: bool = True, attention_mask: torch.Tensor | None = None, grad: bool = False
    ) -> torch.Tensor:
        """Texts (strings, token ids or a tokenizer output) -> (B, E) embeddings.

        Runs without autograd; ``grad=True`` keeps the graph, to train through the result.
        """
        with _autograd(grad):
            return self.project_text(self.text_features(texts, attention_mask).pooled, normalize)

    def encode_image(self, images: Any, normalize: bool = True, grad: bool = False) -> torch.Tensor:
        """PIL images or a pixel tensor (B, 3, S, S) -> (B, E) embeddings.

        Runs without autograd; ``grad=True`` keeps the graph, to train through the result.
        """
        with _autograd(grad):
            return self.project_image(self.image_features(images).pooled, normalize)

    def get_logit_scale(self) -> torch.Tensor:
        """The inverse temperature, clamped to [1, ``max_logit_scale``]: a scalar tensor ()."""
        return self.logit_scale.clamp(0.0, math.log(self.config.max_logit_scale)).exp().reshape(())

    @torch.no_grad()
    def similarity(self, images: Any, texts: TextInput) -> torch.Tensor:
        """Cosine similarity of every image with every text: (N_images, N_texts)."""
        return self.encode_image(images) @ self.encode_text(texts).T

    # -- fusion --------------------------------------------------------------------

    def fuse(
        self,
        image_tokens: torch.Tensor,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> FusionOutput:
        """Fuse aligned pairs: image_tokens (B, P, Di) with text_tokens (B, T, Dt) -> :class:`FusionOutput`."""
        if self.fusion is None:
            raise RuntimeError("This model has no fusion layers (fusion.num_layers = 0).")
        return self.fusion(text_tokens, text_mask, image_tokens, output_attentions)

    def match(self, images: Any, texts: TextInput, grad: bool = False) -> torch.Tensor:
        """Image-text matching probability of each aligned (image, text) pair: (B,).

        Runs without autograd unless ``grad=True``.
        """
        with _autograd(grad):
            img = self.image_features(images)
            txt = self.text_features(texts)
            return self.fuse(img.tokens, txt.tokens, txt.attention_mask).itm_logits.softmax(-1)[:, 1]

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        fuse: bool = True,
        output_attentions: bool = False,
    ) -> MultimodalOutput:
        """Embed a batch of aligned image-text pairs, score all pairs, and fuse the aligned ones."""
        img = self.image_encoder(pixel_values)
        txt = self.text_encoder(input_ids, attention_mask)
        image_embeds = self.project_image(img.pooled)  # (B, E)
        text_embeds = self.project_text(txt.pooled)  # (B, E)
        scale = self.get_logit_scale()
        logits_per_image = scale * image_embeds @ text_embeds.T  # (B, B)
        fusion = None
        if fuse and self.fusion is not None:
            fusion = self.fuse(img.tokens, txt.tokens, txt.attention_mask, output_attentions)
        return MultimodalOutput(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            logit_scale=scale,
            image=img,
            text=txt,
            fusion=fusion,
        )

    # -- freezing ------------------------------------------------------------------

    def _towers(self, tower: str) -> list[TextEncoder | ImageEncoder]:
        towers = {"text": [self.text_encoder], "image": [self.image_encoder], "both": [self.text_encoder, self.image_encoder]}
        if tower not in towers:
            raise ValueError(f"tower must be one of {list(towers)}, got '{tower}'.")
        return towers[tower]

    def freeze(self, tower: str = "both", keep_last_blocks: int = 0) -> "MultimodalModel":
        """Freeze a tower ("text", "image" or "both"), keeping its last N blocks trainable."""
        for enc in self._towers(tower):
            freeze(enc, keep_last_blocks, enc.blocks())
        self.train(self.training)  # re-apply eval mode to frozen batch norms
        return self

    def unfreeze(self, tower: str = "both") -> "MultimodalModel":
        for enc in self._towers(tower):
            enc.requires_grad_(True)
        self.train(self.training)
        return self

    def set_gradient_checkpointing(self, enable: bool = True) -> "MultimodalModel":
        """Recompute both towers' blocks in the backward pass instead of keeping their activations.

        The setting is ``config.gradient_checkpointing``, so it is saved with the model. It
        matters only when training with gradients through a tower.
        """
        self.text_encoder.set_gradient_checkpointing(enable)
        self.image_encoder.set_gradient_checkpointing(enable)
        self.config = replace(self.config, gradient_checkpointing=enable)
        return self

    def train(self, mode: bool = True) -> "MultimodalModel":
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self)
        return self

    def parameter_summary(self) -> str:
        """A table of trainable and frozen parameter counts per part."""
        parts = {
            "text tower": self.text_encoder,
            "image tower": self.image_encoder,
            "projections": nn.ModuleList([self.text_projection, self.image_projection]),
        }
        if self.fusion is not None:
            parts["fusion + ITM head"] = self.fusion
        rows = [(name, count_parameters(m)) for name, m in parts.items()]
        total = count_parameters(self)
        lines = [f"{'part':<20}{'trainable':>14}{'frozen':>14}"]
        lines += [f"{name:<20}{c.trainable:>14,}{c.frozen:>14,}" for name, c in rows]
        lines.append(f"{'total':<20}{total.trainable:>14,}{total.frozen:>14,}")
        return "\n".join(lines)

    # -- persistence ---------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write config, safetensors weights, tokenizer and preprocessing into ``directory``.

        The folder is written beside the target and renamed into place, so an
        interrupted save never leaves a half-written model.
        """
        from safetensors.torch import save_model

        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            meta = {"model_type": MODEL_TYPE, "config": to_dict(self.config)}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            save_model(self, str(tmp / WEIGHTS_FILE))
            self.text_encoder.save_extras(tmp)
            self.preprocessor.save_pretrained(tmp)
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        build: Callable[[ModelConfig, TextEncoder, ImageEncoder], "MultimodalModel"] | None = None) -> "MultimodalModel":
        """Load a model written by :meth:`save_pretrained`. Needs nothing outside ``directory``.

        ``build(config, text_encoder, image_encoder)`` makes the model the weights load into
        (an ensemble's, :mod:`mmtransfer.models.ensemble`); by default this class.
        A missing, truncated or mismatched file raises :class:`~mmtransfer.ModelFileError` naming it.
        """
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(
                f"'{directory}' holds no saved mmtransfer model (no {CONFIG_FILE}). "
                "Save one with model.save_pretrained(folder), or build one with mmtransfer.create_model(name)."
            )
        meta = read_json(config_path)
        if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE or not isinstance(meta.get("config"), dict):
            found = f"model_type={meta.get('model_type')!r}" if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
            raise ModelFileError(f"'{config_path}' is not an mmtransfer model config ({found}); {FIX}.")
        # Ensembles used to be written as one config field; those folders still load as ensembles.
        members = meta["config"].pop("image_projection_members", 1)
        if build is None and isinstance(members, int) and members > 1:
            from .ensemble import load_ensemble

            return load_ensemble(directory, members, map_location)
        try:
            config = from_dict(ModelConfig, meta["config"])
        except ConfigError as err:
            raise ModelFileError(f"'{config_path}' does not describe a model this version can build: {err}") from None
        # The towers read these with transformers, whose errors do not say what to do.
        read_json(directory / TEXT_CONFIG_DIR / "config.json")
        model = (build or cls)(config, TextEncoder.from_saved(config.text, directory), ImageEncoder.from_saved(config.image, directory))
        # Models saved before the text tower dropped its unused pooler head still load.
        load_weights(model, directory / WEIGHTS_FILE, device=str(map_location), obsolete=("text_encoder.model.pooler.",))
        return model.eval()
