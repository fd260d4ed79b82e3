"""Configuration as dataclasses, loaded from YAML recipes with dotted overrides.

Every recipe key maps one-to-one onto a dataclass field, and an unknown key is
an error that lists the valid ones. Overrides use the same dotted names as the
YAML nesting: ``model.embed_dim=512``.

This module imports only the standard library and PyYAML so that
``import mmtransfer`` stays light.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


ENV_CACHE_DIR = "MMTRANSFER_CACHE_DIR"


def cache_home() -> Path:
    """Where built data sets, feature caches and converted towers go: ``$MMTRANSFER_CACHE_DIR``, else ``~/.cache/mmtransfer``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmtransfer"


class ConfigError(ValueError):
    """A recipe or override names a key that does not exist or has a bad value."""


# ----------------------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Range:
    """The values a numeric config field admits; a bound of None leaves that side open-ended."""

    low: float | None = None
    high: float | None = None
    # Exclude the bound itself (a temperature must be above 0, a dropout below 1).
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        # Comparisons written as "inside" tests so that NaN, for which every comparison is false, is refused.
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"between {low} and {high}"
        parts = []
        if self.low is not None:
            parts.append(f"{'greater than' if self.low_open else 'at least'} {low}")
        if self.high is not None:
            parts.append(f"{'less than' if self.high_open else 'at most'} {high}")
        return " and ".join(parts)


def _number(x: float | None) -> str:
    # Whole bounds print as integers (4294967295, not 4.29497e+09).
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def at_least(low: float) -> Range:
    return Range(low)


def above(low: float) -> Range:
    return Range(low, low_open=True)


# A share or a probability, 0 and 1 included.
FRACTION = Range(0.0, 1.0)
# A dropout rate: 1 would drop everything.
DROPOUT = Range(0.0, 1.0, high_open=True)


class OutOfRange(ConfigError):
    """A numeric field outside its :class:`Range`; ``key`` is its name inside its dataclass."""

    def __init__(self, owner: str, key: str, rule: Range, value: float) -> None:
        self.key, self.rule, self.value = key, rule, value
        super().__init__(self.message(f"{owner}.{key}"))

    def message(self, where: str) -> str:
        return f"{where} must be {self.rule}, got {self.value!r}."


def check_ranges(config: Any, **rules: Range) -> None:
    """Raise :class:`OutOfRange` for the first field of ``config`` outside its rule (call it from ``__post_init__``).

    None (an unset optional field) passes; list and tuple fields are checked item by item.
    :func:`from_dict` puts the dotted key of the recipe in the message.

    Example:
        >>> check_ranges(FusionConfig(), num_heads=at_least(1), dropout=DROPOUT)
    """
    for key, rule in rules.items():
        value = getattr(config, key)
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, (list, tuple)) else [(key, value)]
        for name, item in items:
            # Wrong types are from_dict's to report; only numbers are compared here.
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not rule.admits(item):
                raise OutOfRange(type(config).__name__, name, rule, item)


# ----------------------------------------------------------------------------- model


@dataclass
class TextEncoderConfig:
    """A Hugging Face text encoder (any ``AutoModel``) and its tokenizer."""

    # Packaged alias (``minilm-l6``), a Hugging Face hub name, or a local folder.
    name: str = "minilm-l6"
    # Load pretrained weights; False builds the architecture with random weights.
    pretrained: bool = True
    # Pooled vector: "mean" over the attention mask, or the first ("cls") token.
    pooling: Literal["mean", "cls"] = "mean"
    # Texts longer than this many tokens are truncated.
    max_length: int = 64
    # Fields that replace those of the Hugging Face config (e.g. a tiny random
    # model for tests: {"hidden_size": 32, "num_hidden_layers": 2}).
    config_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self, max_length=at_least(1))


@dataclass
class ImageEncoderConfig:
    """An image backbone: any timm model name, or ``torchvision:<resnet>``."""

    # Packaged alias (``efficientnet-lite0``), a timm name, or ``torchvision:resnet50``.
    name: str = "efficientnet-lite0"
    # Load pretrained weights; False builds the architecture with random weights.
    pretrained: bool = True
    # Pooled vector: "auto" uses the backbone's own head pooling (global average
    # for CNNs, the class token or mean for ViTs), "mean" averages the grid or
    # patch tokens, "cls" takes the class token (ViTs only).
    pooling: Literal["auto", "mean", "cls"] = "auto"
    # Input resolution; None uses the one that belongs to the weights.
    image_size: int | None = None
    # Extra keyword arguments for ``timm.create_model`` (e.g. img_size, depth).
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ranges(self, image_size=at_least(1))


@dataclass
class FusionConfig:
    """Cross-attention fusion of text tokens with image tokens."""

    # Number of pre-norm residual fusion layers (0 disables fusion and matching).
    num_layers: int = 2
    # Token width inside the fusion stack; None uses the shared embedding width.
    width: int | None = None
    # Attention heads; must divide the width.
    num_heads: int = 8
    # Hidden width of the feed-forward block, as a multiple of the width.
    mlp_ratio: float = 4.0
    # Dropout on attention weights and residual branches.
    dropout: float = 0.0
    # Also let image tokens attend to text tokens in every layer.
    bidirectional: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, num_layers=at_least(0), width=at_least(1), num_heads=at_least(1), mlp_ratio=above(0),
                     dropout=DROPOUT)


@dataclass
class ModelConfig:
    """A multimodal model: two towers, a shared space and a fusion stack."""

    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    # Width of the shared image-text embedding space.
    embed_dim: int = 256
    # Projection from each tower into the shared space: "linear" or a 2-layer "mlp".
    projection: Literal["linear", "mlp"] = "linear"
    # The text tower's projection, when it differs from `projection`: "linear", "mlp", or
    # "none" (the tower's own pooled vector, as a sentence encoder gives it; embed_dim must
    # equal the tower's width). Keeping a pretrained sentence space as it is lets the image
    # side learn to meet it, and class names never seen in training stay where the text
    # tower puts them. None: same as `projection`.
    text_projection: Literal["linear", "mlp", "none"] | None = None
    # The image tower's projection, when it differs from `projection` (as text_projection).
    image_projection: Literal["linear", "mlp", "none"] | None = None
    # Dropout on the input and hidden layer of MLP projections (a regulariser when few
    # images train them).
    projection_dropout: float = 0.0
    # Initial softmax temperature of the contrastive logits (CLIP uses 0.07).
    init_temperature: float = 0.07
    # The learnable logit scale 1/temperature is clamped to at most this value.
    max_logit_scale: float = 100.0
    # Gradient (activation) checkpointing in both towers: each block's activations are
    # recomputed in the backward pass instead of kept (ViT-B/16 + BERT-base, batch 8, CPU:
    # 0.09x the activations kept, 0.63x the step's peak memory, 1.14x the step time;
    # docs/results/benchmarks.md). Only training with gradients through a tower changes;
    # frozen towers, cached features and evaluation run as before. A CNN with batch norm in
    # training updates its running statistics twice per step.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        # The logit scale is clamped to [1, max_logit_scale], so below 1 the clamp has no room.
        check_ranges(self, embed_dim=at_least(1), projection_dropout=DROPOUT, init_temperature=above(0),
                     max_logit_scale=at_least(1))


# ----------------------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    place = f" in '{where}'" if where else ""
    return ConfigError(
        f"Unknown config key '{key}'{place}.{hint} Valid keys: {', '.join(sorted(valid))}."
    )


_YAML_TRUE = ("yes", "on", "true", "y")
_YAML_FALSE = ("no", "off", "false", "n")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where YAML is loose."""
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping of {tp.__name__} fields, got {value!r}.")
        return from_dict(tp, value, prefix=where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"'{where}' has a bad value {value!r}.")
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads no/off/yes/on as booleans: train.mixed_precision=no means the choice "no".
            spelled = [a for a in args if isinstance(a, str) and a.lower() in (_YAML_TRUE if value else _YAML_FALSE)]
            if len(spelled) == 1:
                return spelled[0]
        if value not in args:
            raise ConfigError(f"'{where}' must be one of {list(args)}, got {value!r}.")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{where}' must be a list, got {value!r}.")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{where}' must be a mapping, got {value!r}.")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{where}' must be true or false, got {value!r}.")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"'{where}' must be of type {name}, got {value!r}.")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, rejecting unknown keys.

    Example:
        >>> from_dict(ModelConfig, {"embed_dim": 128, "text": {"pooling": "cls"}}).text.pooling
        'cls'
    """
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_:
            raise _unknown_key(key, list(types_), prefix)
        where = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, types_[key], where)
    try:
        return cls(**kwargs)
    except OutOfRange as err:
        # Name the value the way the recipe or override wrote it: train.max_steps, not TrainConfig.max_steps.
        raise ConfigError(err.message(f"{prefix}.{err.key}" if prefix else err.key)) from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config dataclass (JSON and YAML friendly)."""
    return dataclasses.asdict(config)


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (``1e-4``, ``true``, ``[1, 2]``)."""
    import yaml

    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-4" as a string; people mean a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested mapping (returns a new one).

    With ``cls``, every dotted path is checked against the dataclass tree first,
    so that a typo fails naming the valid keys at that level.
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like dotted.key=value (e.g. train.lr=1e-4).")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if cls is not None:
            _check_path(cls, parts)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        try:
            node[parts[-1]] = parse_value(raw)
        except Exception as err:  # yaml.YAMLError: the value is not valid YAML
            first = str(err).splitlines()[0]
            raise ConfigError(
                f"Cannot read the value of override '{key}': {raw!r} is not valid YAML ({first}). "
                f"Quote it for the shell as one argument, e.g. '{key}=[\"a {{}}\", \"{{}}\"]'."
            ) from None
    return out


def _check_path(cls: type, parts: list[str]) -> None:
    tp: Any = cls
    for i, part in enumerate(parts):
        if not _is_dataclass_type(tp):
            # Free-form mappings (dict fields) accept any key below them.
            if typing.get_origin(tp) is dict or tp is dict:
                return
            raise ConfigError(f"'{'.'.join(parts[:i])}' is not a section; it has no key '{part}'.")
        types_ = _field_types(tp)
        if part not in types_:
            raise _unknown_key(part, list(types_), ".".join(parts[:i]))
        tp = types_[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 else tp


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe into a mapping, with a clear error when it is missing or malformed."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Recipes live in configs/ (e.g. configs/openmoji_contrastive.yaml).")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys at its top level.")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load the dataclass ``cls`` from an optional YAML file plus dotted overrides.

    Example:
        >>> cfg = load_config(ModelConfig, None, ["embed_dim=128", "fusion.num_layers=1"])
        >>> cfg.embed_dim, cfg.fusion.num_layers
        (128, 1)
    """
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data)


def dumps(config: Any) -> str:
    """The config as indented JSON."""
    return json.dumps(to_dict(config), indent=2, sort_keys=False)
