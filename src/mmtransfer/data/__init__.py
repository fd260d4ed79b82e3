"""Data layer: captioned, labelled and domain data sets on Hugging Face ``datasets``.

Public API::

    from mmtransfer import data
    ds = data.load("openmoji", split="train")           # built-in: rendered emoji + CLDR names
    ds = data.load("my_photos/")                         # imagefolder with metadata.jsonl, or class folders
    ds = data.load("captions.csv", caption_column="text", on_bad_sample="skip")
    report = data.validate("my_photos/"); print(report)  # every image decoded, captions/labels checked
    collate = data.CaptionCollator.from_model(model, train=True)
    loader = data.make_loader(ds, collate, batch_size=64, shuffle=True, num_workers=2)
    data.write_shards(ds, "shards/", samples_per_shard=1000)   # then train on "wds:shards/" (docs/data.md)

Importing this package is light (standard library only); ``datasets``, PIL and
torch are imported when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import LoadedData, list_datasets, load, load_with_report, validate
from .config import BUILTIN_DATASETS, DataConfig, DataError
from .report import DataReport, Problem

if TYPE_CHECKING:
    from .builtin import emoji_build_info
    from .collate import (
        CaptionCollator,
        ImageCollator,
        LabelCollator,
        PairedLoader,
        RetrievalSet,
        make_loader,
        retrieval_set,
        undecoded,
    )
    from .images import image_problem, open_image
    from .shard_writer import write_shards
    from .streaming import ShardStream, StreamLoader

__all__ = [
    "BUILTIN_DATASETS",
    "CaptionCollator",
    "DataConfig",
    "DataError",
    "DataReport",
    "ImageCollator",
    "LabelCollator",
    "LoadedData",
    "PairedLoader",
    "Problem",
    "RetrievalSet",
    "ShardStream",
    "StreamLoader",
    "emoji_build_info",
    "image_problem",
    "list_datasets",
    "load",
    "load_with_report",
    "make_loader",
    "open_image",
    "retrieval_set",
    "undecoded",
    "validate",
    "write_shards",
]

_LAZY = {
    "CaptionCollator": "collate",
    "ImageCollator": "collate",
    "LabelCollator": "collate",
    "PairedLoader": "collate",
    "RetrievalSet": "collate",
    "make_loader": "collate",
    "retrieval_set": "collate",
    "undecoded": "collate",
    "emoji_build_info": "builtin",
    "image_problem": "images",
    "open_image": "images",
    "ShardStream": "streaming",
    "StreamLoader": "streaming",
    "write_shards": "shard_writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmtransfer.data' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
