"""Resumable checkpoints without pickle: safetensors for tensors, JSON for everything else.

A checkpoint folder is read back when a run resumes, and run folders are
copied between machines and people, so nothing in it may run code when it is
loaded. Accelerate's ``save_state`` pickles the loop's registered objects and
unpickles them with ``weights_only=False``; this module writes the same state
as plain files instead:

    model.safetensors          the task's weights (the model, heads, loss modules)
    optimizer.safetensors      the optimizer's tensors (AdamW moments, step counts)
    optimizer.json             the optimizer's structure and hyper-parameters
    rng-<rank>.safetensors     each process's torch (and CUDA) generator states
    rng-<rank>.json            each process's Python and NumPy generator states
    scaler.json                the fp16 loss scaler, when there is one
    trainer_state.json         step, epoch and batch within the epoch

Loading reads only these files. A folder with pickles in it (an older run, or
a planted file) is refused without reading them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import sharding

MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCALER_FILE = "scaler.json"
STATE_FILE = "trainer_state.json"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from; the message names the folder and what to do."""


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng-{rank}.safetensors", folder / f"rng-{rank}.json"


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{path}' cannot be read ({err}); resume from another checkpoint or start afresh.") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{path}' is missing: the checkpoint is incomplete. Resume from another checkpoint.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{path}' is not valid JSON ({err}); resume from another checkpoint.") from None


def _write_json(data: Any, path: Path) -> None:
    path.write_text(json.dumps(data, indent=1))


# ----------------------------------------------------------------------------- optimizer


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (parameters keyed by index, or by name under FSDP) into flat tensors and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for key, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{key}/{name}"] = value
            else:
                plain.setdefault(str(key), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def _read_optimizer(folder: Path) -> dict[str, Any]:
    """The optimizer state dict as written: parameters keyed by index ("0") or by name, as strings."""
    structure = _read_json(folder / OPTIMIZER_JSON)
    state: dict[str, dict[str, Any]] = {k: dict(v) for k, v in structure["state"].items()}
    tensors = _load_tensors(folder / OPTIMIZER_TENSORS) if (folder / OPTIMIZER_TENSORS).is_file() else {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(index, {})[name] = value
    return {"state": state, "param_groups": structure["param_groups"]}


def _keyed(state: dict[str, Any], names: list[str], by_name: bool) -> dict[str, Any]:
    """``state`` with its parameters keyed by name (FSDP) or by index (the optimizer's own), whichever it was written with."""
    position = {n: i for i, n in enumerate(names)}
    key = (lambda k: k if not k.isdigit() else names[int(k)]) if by_name else (lambda k: int(k) if k.isdigit() else position[k])
    groups = [{**g, "params": [key(str(p)) for p in g["params"]]} for g in state["param_groups"]]
    return {"state": {key(k): v for k, v in state["state"].items()}, "param_groups": groups}


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any], device: torch.device) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        for name, value in values.items():
            if not isinstance(value, torch.Tensor) or name == "step":
                continue  # AdamW keeps `step` on the CPU unless it runs fused or capturable
            if value.shape != params[index].shape and value.numel() == params[index].numel():
                value = value.reshape(params[index].shape)  # e.g. the logit scale, once a scalar, now one element
            values[name] = value.to(device)  # moments sit with their parameter
    optimizer.load_state_dict(state)


# ----------------------------------------------------------------------------- random generators


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy/keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    plain = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k.split("/")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy/keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ----------------------------------------------------------------------------- save / load


def save(folder: Path, accelerator: Any, task: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, int],
         shell: nn.Module | None = None) -> None:
    """Write a checkpoint of every process into ``folder`` (which must exist; called on every process).

    The main process writes the weights, the optimizer and the loop's state
    (identical on every process under data parallelism); each process writes
    its own random generator states. Under FSDP, ``shell`` is the task's
    :func:`~mmtransfer.sharding.meta_copy`: every process helps gather the full
    weights into it and the full optimizer state, keyed by parameter name.
    """
    from safetensors.torch import save_model

    rank = accelerator.process_index
    if shell is not None:
        weights = sharding.full_weights(accelerator, task, shell)
        optimizer_state = sharding.full_optimizer_state(task, optimizer)
    if accelerator.is_main_process:
        if shell is None:
            weights, optimizer_state = accelerator.unwrap_model(task), optimizer.state_dict()
        save_model(weights, str(folder / MODEL_FILE))
        tensors, structure = _split_optimizer_state(optimizer_state)
        if tensors:
            _save_tensors(tensors, folder / OPTIMIZER_TENSORS)
        _write_json(structure, folder / OPTIMIZER_JSON)
        if accelerator.scaler is not None:
            _write_json(accelerator.scaler.state_dict(), folder / SCALER_FILE)
        _write_json(state, folder / STATE_FILE)
    tensors, plain = _rng_state()
    rng_tensors, rng_json = _rng_files(folder, rank)
    _save_tensors(tensors, rng_tensors)
    _write_json(plain, rng_json)


def check_folder(folder: Path) -> None:
    """Refuse a checkpoint folder that holds pickles, or lacks the files of this format, before reading anything."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"Checkpoint '{folder}' holds pickle files ({', '.join(pickles[:3])}{' ...' if len(pickles) > 3 else ''}). "
            "mmtransfer never unpickles files from a run folder, since loading a pickle can run any code. "
            "If the run is yours and was written by an older mmtransfer, start it afresh (or load its model/ folder "
            "with mmtransfer.load and continue with init_from); otherwise delete the folder."
        )
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"'{folder}' is not a checkpoint of this mmtransfer version (no {STATE_FILE}). "
                              "Resume from another checkpoint folder, or start afresh.")


def load(folder: Path, accelerator: Any, task: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Restore weights, optimizer, loss scaler and this process's generators; returns the loop's state.

    A checkpoint written under FSDP resumes without it and the other way round (the optimizer
    state is re-keyed between parameter indices and names).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    check_folder(folder)
    state = _read_json(folder / STATE_FILE)
    sharded = sharding.is_sharded(accelerator)
    bare = task if sharded else accelerator.unwrap_model(task)
    optimizer_state = _keyed(_read_optimizer(folder), sharding.parameter_names(bare, optimizer), by_name=sharded)
    try:
        if sharded:  # every process reads the full weights; each keeps its shards
            sharding.load_full(task, optimizer, _load_tensors(folder / MODEL_FILE), optimizer_state)
        else:
            device = accelerator.device
            load_model(bare, str(folder / MODEL_FILE), strict=True,
                       device="cpu" if device.type == "cpu" else str(device))  # safetensors refuses "cpu:0"
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"'{folder / MODEL_FILE}' cannot be read ({err}); resume from another checkpoint.") from None
    except RuntimeError as err:  # missing or unexpected keys, wrong shapes
        raise CheckpointError(f"'{folder / MODEL_FILE}' does not fit this run's model ({str(err).splitlines()[0]}): "
                              "was the recipe changed since the checkpoint was written?") from None
    if not sharded:
        _load_optimizer(optimizer, optimizer_state, accelerator.device)
    if accelerator.scaler is not None and (folder / SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(_read_json(folder / SCALER_FILE))
    rng_tensors, rng_json = _rng_files(folder, accelerator.process_index)
    if rng_tensors.is_file():
        _set_rng_state(_load_tensors(rng_tensors), _read_json(rng_json))
    return {k: int(state[k]) for k in ("step", "epoch", "batches_in_epoch")}
