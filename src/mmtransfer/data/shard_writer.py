"""Writing a loaded caption data set as shards that ``wds:``/``parquet:`` data names read back.

WebDataset tar shards (open_clip's layout: ``<key>.<image ext>``, ``<key>.txt`` with the first
caption, ``<key>.json`` with every caption) are written with :mod:`tarfile`, Parquet shards with
pyarrow under the schema ``datasets`` gives an ``Image`` column, so that
``datasets.load_dataset("parquet", data_files=..., streaming=True)`` decodes them too. A
``sizes.json`` (open_clip's convention) lists each shard's sample count, so that readers need not
count. Keys are the rows' ``image_id`` (9 digits), the image bytes are the files' own.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from .config import DataError
from .shards import SIZES_FILE, STREAM_KINDS

if TYPE_CHECKING:
    from datasets import Dataset

# PIL format -> the extension WebDataset readers decode; other formats are written as PNG.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def _image_bytes(cell: Any, where: str) -> tuple[bytes, str]:
    """(bytes, extension) of a data set's undecoded image cell: the file's own bytes when PIL knows the format."""
    from PIL import Image

    from .images import open_image

    if isinstance(cell, dict) and cell.get("bytes") is not None:
        data = bytes(cell["bytes"])
    elif isinstance(cell, dict) and cell.get("path"):
        try:
            data = Path(cell["path"]).read_bytes()
        except OSError as err:
            raise DataError(f"{where}: cannot read the image {cell['path']} ({err}).") from None
    else:
        raise DataError(f"{where}: the row has no image.")
    try:
        ext = FORMAT_EXTENSIONS.get(Image.open(io.BytesIO(data)).format or "")
    except Exception:  # noqa: BLE001 - PIL raises many kinds; open_image below names the problem
        ext = None
    if ext is None:
        out = io.BytesIO()
        open_image(data, where).save(out, format="PNG")
        data, ext = out.getvalue(), "png"
    return data, ext


def _samples(dataset: "Dataset") -> Iterator[tuple[str, bytes, str, list[str]]]:
    """(key, image bytes, extension, captions) of every row."""
    from .collate import undecoded

    if "image" not in dataset.column_names or "captions" not in dataset.column_names:
        raise DataError(f"Shards need images with captions; this data set has the columns {', '.join(dataset.column_names)}.")
    columns = [c for c in ("image", "captions", "image_id") if c in dataset.column_names]
    for i, row in enumerate(undecoded(dataset).select_columns(columns)):
        image_id = row.get("image_id", i)
        key = f"{image_id:09d}"
        captions = [row["captions"]] if isinstance(row["captions"], str) else list(row["captions"] or [])
        if not captions:
            raise DataError(f"row {i} (image_id {image_id}) has no caption; load the data with mmtransfer.data.load, which checks captions.")
        data, ext = _image_bytes(row["image"], f"row {i} (image_id {image_id})")
        yield key, data, ext, captions


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no owner, no time: the same data gives the same bytes
    archive.addfile(info, io.BytesIO(data))


class _ShardFile:
    """One shard being written to a temporary name, renamed when complete."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt, self.count = path, fmt, 0
        self.tmp = path.with_name(f".tmp-{path.name}")
        self.rows: list[dict[str, Any]] = []
        self.archive = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT) if fmt == "wds" else None

    def add(self, key: str, data: bytes, ext: str, captions: list[str]) -> None:
        self.count += 1
        if self.archive is not None:
            _tar_member(self.archive, f"{key}.{ext}", data)
            _tar_member(self.archive, f"{key}.txt", captions[0].encode("utf-8"))
            _tar_member(self.archive, f"{key}.json", json.dumps({"captions": captions}, ensure_ascii=False).encode("utf-8"))
        else:
            self.rows.append({"__key__": key, "image": {"bytes": data, "path": f"{key}.{ext}"}, "captions": captions})

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = _parquet_schema()
            pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), self.tmp)
        os.replace(self.tmp, self.path)


def _parquet_schema() -> Any:
    import datasets

    listed = datasets.List(datasets.Value("string")) if hasattr(datasets, "List") else datasets.Sequence(datasets.Value("string"))
    return datasets.Features({"__key__": datasets.Value("string"), "image": datasets.Image(), "captions": listed}).arrow_schema


def write_shards(dataset: "Dataset", output: str | os.PathLike[str], samples_per_shard: int = 1000,
                 format: Literal["wds", "parquet"] = "wds", overwrite: bool = False, progress: bool | None = None) -> list[Path]:
    """Write ``dataset`` (images with captions, e.g. from :func:`mmtransfer.data.load`) as shards in ``output``.

    Shards are ``shard-000000.tar`` (``format="wds"``) or ``shard-000000.parquet``, ``samples_per_shard``
    samples each (the last one fewer), plus ``sizes.json``. Train on them with
    ``data.train.name=wds:<output>`` (or ``parquet:<output>``).

    Args:
        overwrite: first delete the shards and ``sizes.json`` already in ``output`` (otherwise they are an error).
        progress: a progress bar; None shows one above 300 samples.

    Example:
        >>> write_shards(load("my_photos/train"), "shards/", samples_per_shard=500)   # doctest: +SKIP
        [PosixPath('shards/shard-000000.tar'), ...]
    """
    from tqdm.auto import tqdm

    if format not in STREAM_KINDS:
        raise DataError(f"format must be one of {', '.join(STREAM_KINDS)}, not '{format}'.")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be at least 1, got {samples_per_shard}.")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in out.iterdir() if p.is_file() and (p.name == SIZES_FILE or p.name.lower().endswith(
        tuple(s for suffixes in STREAM_KINDS.values() for s in suffixes))))
    if old and not overwrite:
        raise DataError(f"{out} already holds shards ({', '.join(p.name for p in old[:3])}{' ...' if len(old) > 3 else ''}); "
                        "a shard name of a folder reads all of them. Choose an empty folder, or overwrite=True (--overwrite).")
    for p in old:
        p.unlink()
    suffix = ".tar" if format == "wds" else ".parquet"
    written: list[Path] = []
    sizes: dict[str, int] = {}
    shard: _ShardFile | None = None
    bar = tqdm(total=len(dataset), desc=f"writing {format} shards", unit="sample",
               disable=not (progress if progress is not None else len(dataset) > 300))
    for key, data, ext, captions in _samples(dataset):
        if shard is None or shard.count == samples_per_shard:
            if shard is not None:
                shard.close()
            shard = _ShardFile(out / f"shard-{len(written):06d}{suffix}", format)
            written.append(shard.path)
        shard.add(key, data, ext, captions)
        sizes[shard.path.name] = shard.count
        bar.update(1)
    bar.close()
    if shard is None:
        raise DataError("The data set is empty: no shard written.")
    shard.close()
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    return written
