"""Small helpers shared by the towers: finding blocks, freezing, counting."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """The longest ``ModuleList``/``Sequential`` of repeated blocks inside ``module``.

    This is the layer stack of a transformer (``encoder.layer``, ``blocks``) or
    the stage list of a CNN. Nested containers are searched too; the longest
    wins, the earliest on a tie.
    """
    best: list[nn.Module] = []
    for child in module.modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > len(best):
            # Prefer stacks whose members hold parameters (not a list of activations).
            members = list(child)
            if all(any(True for _ in m.parameters()) for m in members):
                best = members
    return best


def freeze(module: nn.Module, keep_last_blocks: int = 0, blocks: list[nn.Module] | None = None) -> None:
    """Freeze ``module``, optionally keeping its last ``keep_last_blocks`` blocks trainable.

    Everything registered after the first kept block (final norms, heads,
    poolers) stays trainable with it, since it sits above those blocks.
    """
    params = list(module.named_parameters())
    for _, p in params:
        p.requires_grad_(False)
    if keep_last_blocks <= 0:
        return
    blocks = blocks if blocks is not None else find_blocks(module)
    if not blocks:
        raise ValueError(f"Cannot find a block stack in {type(module).__name__} to keep the last {keep_last_blocks} blocks of.")
    first_kept = blocks[max(0, len(blocks) - keep_last_blocks)]
    first_param = next(first_kept.parameters())
    start = next(i for i, (_, p) in enumerate(params) if p is first_param)
    for _, p in params[start:]:
        p.requires_grad_(True)


def keep_frozen_norms_in_eval(module: nn.Module) -> None:
    """Put batch-norm layers whose parameters are all frozen into eval mode.

    A frozen CNN must not update its running statistics when the model trains.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ps = list(m.parameters(recurse=False))
            if ps and not any(p.requires_grad for p in ps):
                m.eval()


@dataclass
class ParameterCount:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_parameters(module: nn.Module) -> ParameterCount:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return ParameterCount(trainable, frozen)


def compile_towers(module: nn.Module) -> list[str]:
    """``torch.compile`` every tower inside ``module`` in place (the outermost modules that declare
    ``is_pretrained_tower``: text and image encoders, LeNet) and return their names.

    The towers hold nearly all of a step's work; the objectives' per-batch Python (caption hashing,
    hard-negative mining, gathers) stays eager. Compiling a whole task instead, whose objective takes
    the model as an argument, returned a loss without a graph on torch 2.14 when only the
    contrastive loss was on, so the towers are compiled one by one. Parameter names and
    checkpoints stay as they are.
    """
    names: list[str] = []
    for name, sub in module.named_modules():
        if hasattr(sub, "is_pretrained_tower") and not any(name.startswith(n + ".") for n in names):
            sub.compile()
            names.append(name)
    if not names:
        raise ValueError(f"train.compile found no tower to compile in {type(module).__name__}; set train.compile=false.")
    return names
