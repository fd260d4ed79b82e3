"""Fully sharded data parallel (FSDP2) in the training loop: what Accelerate leaves to it.

``accelerate launch --config_file configs/accelerate/fsdp_2gpu.yaml`` makes ``Accelerator.prepare``
shard the task's parameters, gradients and optimizer state over the processes. The loop then
still needs, on every process at once, the full weights to write a checkpoint or export the
model (gathered into :func:`meta_copy`, a copy of the task without memory of its own, on the
main process), the full optimizer state (by parameter name), and the root module's parameters
unsharded to evaluate outside the task's forward pass (:func:`full_parameters`).

On CPUs Accelerate shards nothing: it hands FSDP only to accelerator devices and would train
with DDP instead. torch's FSDP2 runs on gloo, and Accelerate's preparation of it runs there
too, so :func:`route_fsdp` hands it over itself (what the multi-process tests use).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

import torch
from torch import nn

from .distributed import LaunchError


def fsdp_requested() -> bool:
    """True when the launcher asked for FSDP (``distributed_type: FSDP`` in an accelerate config file)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def is_sharded(accelerator: Any) -> bool:
    return str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)) == "FSDP"


def route_fsdp(accelerator: Any) -> None:
    """Check an FSDP launch once the Accelerator exists; on CPUs, switch Accelerate's state to FSDP itself.

    Only FSDP2 (``fsdp_version: 2``) is supported: the loop gathers and loads state with
    ``torch.distributed.checkpoint.state_dict``, and FSDP1 on CPUs stops on its device id.
    """
    if not fsdp_requested():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise LaunchError("FSDP needs fsdp_version: 2 in the accelerate config file (FSDP1 is not supported by the "
                          "training loop); see configs/accelerate/fsdp_2gpu.yaml.")
    if is_sharded(accelerator) or accelerator.num_processes < 2:
        return
    if accelerator.device.type != "cpu":
        raise LaunchError(f"FSDP was asked for, but Accelerate set up {accelerator.distributed_type} on {accelerator.device}.")
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    for state in (PartialState(), AcceleratorState()):
        state.distributed_type = DistributedType.FSDP
    AcceleratorState().fsdp_plugin = plugin


def before_prepare(accelerator: Any, task: nn.Module, l2sp: float) -> nn.Module | None:
    """Under FSDP, before ``accelerator.prepare`` shards ``task``: name its towers' blocks and return its :func:`meta_copy`.

    Without ``fsdp_transformer_layer_cls_to_wrap`` in the config file, Accelerate shards the
    classes the task lists in ``_no_split_modules`` one by one: here the towers' blocks.
    Returns None when the run is not sharded.
    """
    if not is_sharded(accelerator):
        return None
    if l2sp > 0:
        raise ValueError("optim.l2sp does not work under FSDP yet (its reference weights would be shards): set optim.l2sp=0.")
    if getattr(task, "_no_split_modules", None) is None:
        task._no_split_modules = tower_block_names(task)
    for p in task.parameters():
        if not p.is_contiguous():  # FSDP2 shards only contiguous tensors; CNN towers keep channels-last weights
            p.data = p.data.contiguous()
    return meta_copy(task)


def tower_block_names(task: nn.Module) -> list[str]:
    """Class names of the towers' blocks (a CNN stage's members, where its blocks are plain containers)."""
    containers = (nn.Sequential, nn.ModuleList)
    names: set[str] = set()
    for module in task.modules():
        if hasattr(module, "is_pretrained_tower") and callable(getattr(module, "blocks", None)):
            for block in module.blocks():
                members = list(block) if type(block) in containers else [block]
                names.update(type(m).__name__ for m in members)
    return sorted(names)


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device: the shell that gathered weights load into.

    Made before FSDP shards ``module`` in place; buffers and everything else are copied.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_weights(accelerator: Any, task: nn.Module, shell: nn.Module) -> nn.Module | None:
    """Every process: gather the sharded task's full weights. The main process gets ``shell`` holding them on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(task, options=_options(cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    # A gathered tensor can be a view into a larger (padded) buffer, which safetensors refuses to write.
    state = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone() for k, v in state.items()}
    shell.load_state_dict(state, strict=True, assign=True)
    return shell


def full_optimizer_state(task: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every process: the full optimizer state, keyed by parameter name (complete on the main process)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(task, optimizer, options=_options(cpu_offload=True))


def load_full(task: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
              optimizer_state: dict[str, Any]) -> None:
    """Every process, each with the full state: load it into the sharded task and optimizer."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(task, weights, options=_options(strict=True))
    set_optimizer_state_dict(task, optimizer, optimizer_state, options=_options())


def parameter_names(task: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order of its state dict's indices ("" for one outside ``task``)."""
    names = {id(p): n for n, p in task.named_parameters()}
    return [names.get(id(p), "") for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def full_parameters(task: nn.Module) -> Iterator[None]:
    """Unshard the root module's own parameters for a while (FSDP2), e.g. to evaluate through the model's methods.

    Sub-modules sharded on their own (the towers' blocks) gather theirs in their forward
    hooks; without FSDP this does nothing.
    """
    if not hasattr(task, "unshard"):
        yield
        return
    task.unshard()
    try:
        yield
    finally:
        task.reshard()
