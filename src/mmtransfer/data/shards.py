"""Shard files of caption data bigger than memory: naming them, counting them, reading their samples.

Two formats, named by a prefix on the data name (docs/data.md, "Caption data bigger than memory"):

- ``wds:<shards>``: WebDataset tar shards, open_clip's layout: the members ``<key>.jpg`` (or
  ``.png``, ``.webp``, ...) and ``<key>.txt`` (the caption) or ``<key>.json`` (a caption field)
  of one sample lie next to each other. Read with :mod:`tarfile` in stream mode, every member
  in memory: member names are only split into key and extension, never used as paths.
- ``parquet:<shards>``: Parquet (or Arrow) files with an image column (the ``{"bytes", "path"}``
  struct ``datasets`` writes, or raw bytes) and a caption column; read with pyarrow.

``<shards>`` is a folder (every shard in it), or a path with ``{000000..000009}`` ranges,
``{a,b}`` alternatives and ``*`` globs. Images are not decoded here: a :class:`Record` carries
the image bytes and its captions, or the reason it cannot be a sample.

Standard library only at import; pyarrow is imported when Parquet or Arrow shards are read.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .config import DataConfig, DataError

logger = logging.getLogger("mmtransfer.data")

STREAM_KINDS = {"wds": (".tar", ".tar.gz", ".tgz"), "parquet": (".parquet", ".arrow")}
# Image members of a WebDataset sample, in the order one is picked when a sample has several.
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
# Fields of a sample's .json (or columns of a table shard) that hold its captions, tried in order.
CAPTION_FIELDS = ("captions", "caption", "text", "txt")
TABLE_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
# A member larger than this is a bad sample rather than a read into memory.
MAX_MEMBER_BYTES = 256 * 2**20
SIZES_FILE = "sizes.json"
MAX_SHARDS = 1_000_000


def is_stream(name: Any) -> bool:
    """True for a data name that names shards (``wds:...`` or ``parquet:...``)."""
    return isinstance(name, str) and name.split(":", 1)[0] in STREAM_KINDS and ":" in name


@dataclass
class Record:
    """One sample as read from a shard: image bytes and captions, or why it cannot be used."""

    shard: str
    key: str
    image: bytes | None
    captions: list[str] = field(default_factory=list)
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.shard} key {self.key}"


# ----------------------------------------------------------------------------- naming shards


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> a00b, a01b, a02b; ``{x,y}`` -> x, y (several groups multiply; no nesting)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        a, b = numbers.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",")
    if len(options) > MAX_SHARDS:
        raise DataError(f"'{pattern}' expands to {len(options):,} names; more than {MAX_SHARDS:,} shards are not read.")
    return [out for option in options for out in expand_braces(head + option + tail)]


def list_shards(name: str) -> tuple[str, list[str]]:
    """(kind, sorted shard paths) of a ``wds:``/``parquet:`` name; a clear error when nothing fits."""
    kind, _, pattern = name.partition(":")
    suffixes = STREAM_KINDS[kind]
    pattern = os.path.expanduser(pattern.strip())
    if not pattern:
        raise DataError(f"'{name}' names no shards: write {kind}:<folder> or {kind}:<path>/shard-{{000000..000009}}{suffixes[0]}.")
    found: list[str] = []
    missing: list[str] = []
    if os.path.isdir(pattern):
        found = [str(p) for p in Path(pattern).iterdir() if p.is_file() and p.name.lower().endswith(suffixes)]
        if not found:
            raise DataError(f"The folder '{pattern}' holds no {'/'.join(suffixes)} shards for '{name}'. "
                            "python scripts/write_shards.py writes them from any captioned folder.")
    else:
        for each in expand_braces(pattern):
            if glob.has_magic(each):
                found += [p for p in glob.glob(each) if os.path.isfile(p) and os.path.basename(p) != SIZES_FILE]
            elif os.path.isfile(each):
                found.append(each)
            else:
                missing.append(each)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"'{name}': {len(missing)} shard(s) do not exist: {', '.join(missing[:3])}{more}.")
    wrong = [p for p in found if not p.lower().endswith(suffixes)]
    if wrong:
        raise DataError(f"'{name}' names files that are not {kind} shards ({'/'.join(suffixes)}): {', '.join(wrong[:3])}. "
                        f"Use {'parquet:' if kind == 'wds' else 'wds:'} for those, or narrow the pattern.")
    if not found:
        raise DataError(f"'{name}' matches no file.")
    return kind, sorted(set(found))


# ----------------------------------------------------------------------------- counting


def shard_sizes(kind: str, paths: Sequence[str], on_bad_sample: str = "error") -> list[int]:
    """Samples in each shard: from a ``sizes.json`` next to the shards (open_clip's convention,
    ``{"shard-000000.tar": 1000, ...}``, written by :func:`~mmtransfer.data.write_shards`), else counted."""
    known: dict[str, dict[str, int]] = {}
    sizes = []
    for path in paths:
        folder, base = os.path.split(path)
        if folder not in known:
            known[folder] = _read_sizes(Path(folder or ".") / SIZES_FILE)
        count = known[folder].get(base)
        sizes.append(count if count is not None else count_samples(kind, path, on_bad_sample))
    return sizes


def _read_sizes(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): int(v) for k, v in data.items() if int(v) >= 0}
    except (ValueError, TypeError, AttributeError, OSError) as err:
        logger.warning("%s is not a mapping of shard names to sample counts (%s); counting the shards instead.", path, err)
        return {}


def count_samples(kind: str, path: str, on_bad_sample: str = "error") -> int:
    """Samples of one shard: its keys (tar: reading the member headers only) or its rows."""
    if kind != "wds":
        return _table_rows(path)
    count, last = 0, None
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                key = _split_member(member)[0]
                if key is not None and key != last:
                    count, last = count + 1, key
    except (tarfile.TarError, OSError, EOFError) as err:
        message = f"The shard {path} cannot be read to its end ({err}) after {count} samples."
        if on_bad_sample == "error":
            raise DataError(f"{message} Rewrite it, or set on_bad_sample=skip to read what it holds.") from None
        logger.warning("%s Counting those only.", message)
    return count


def _table_rows(path: str) -> int:
    try:
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        return sum(batch.num_rows for batch in _arrow_batches(path))
    except OSError as err:
        raise DataError(f"The shard {path} cannot be read ({err}).") from None
    except Exception as err:  # pyarrow's ArrowInvalid and friends: not a Parquet/Arrow file
        raise DataError(f"The shard {path} is not a readable {Path(path).suffix} file ({type(err).__name__}: {err}).") from None


# ----------------------------------------------------------------------------- reading


def read_records(kind: str, path: str, config: DataConfig) -> Iterator[Record]:
    """Every sample of one shard, in file order."""
    if kind == "wds":
        yield from _tar_records(path, _caption_fields(config))
    else:
        yield from _table_records(path, config)


def _caption_fields(config: DataConfig) -> tuple[str, ...]:
    wanted = config.caption_column
    if wanted is None:
        return CAPTION_FIELDS
    return (wanted,) if isinstance(wanted, str) else tuple(wanted)


def _split_member(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """(key, extension) of a tar member, as WebDataset splits them: the key is the path up to the first
    dot of the file name. (None, "") for members that are not samples' files (folders, links, dot files)."""
    base = member.name.rsplit("/", 1)[-1]
    if not member.isfile() or base.startswith(".") or "." not in base:
        return None, ""
    stem, ext = base.split(".", 1)
    return member.name[: len(member.name) - len(base)] + stem, ext.lower()


def _tar_records(path: str, fields: tuple[str, ...]) -> Iterator[Record]:
    key: str | None = None
    members: dict[str, bytes | None] = {}
    try:
        with tarfile.open(path, mode="r|*") as archive:  # stream mode: one pass, nothing extracted to disk
            for member in archive:
                k, ext = _split_member(member)
                if k is None:
                    continue
                if k != key:
                    if key is not None:
                        yield _tar_record(path, key, members, fields)
                    key, members = k, {}
                handle = archive.extractfile(member) if member.size <= MAX_MEMBER_BYTES else None
                members[ext] = handle.read() if handle is not None else None
    except (tarfile.TarError, OSError, EOFError) as err:
        yield Record(path, key or "(before the first sample)", None,
                     problem=f"the archive breaks off here ({err}); the rest of the shard is not read")
        return
    if key is not None:
        yield _tar_record(path, key, members, fields)


def _tar_record(path: str, key: str, members: dict[str, bytes | None], fields: tuple[str, ...]) -> Record:
    names = ", ".join(f".{e}" for e in members)
    ext = next((e for e in IMAGE_MEMBERS if e in members), None)
    if ext is None:
        return Record(path, key, None, problem=f"no image member (.jpg, .png, .webp, ...); the sample has {names}")
    image = members[ext]
    if image is None:
        return Record(path, key, None, problem=f"the .{ext} member is larger than {MAX_MEMBER_BYTES // 2**20} MiB")
    captions, problem = _member_captions(members, fields)
    return Record(path, key, image, captions, problem)


def _member_captions(members: dict[str, bytes | None], fields: tuple[str, ...]) -> tuple[list[str], str | None]:
    if members.get("json") is not None:
        try:
            data = json.loads(members["json"])  # type: ignore[arg-type]
        except (ValueError, UnicodeDecodeError) as err:
            return [], f"the .json member is not valid JSON ({err})"
        found = [c for f in fields if isinstance(data, dict) and f in data for c in _texts(data[f])]
        if found:
            return found, None
    if members.get("txt") is not None:
        try:
            text = members["txt"].decode("utf-8").strip()  # type: ignore[union-attr]
        except UnicodeDecodeError:
            return [], "the .txt member is not UTF-8 text"
        if text:
            return [text], None
    return [], f"no caption: no .txt member and no .json with a {'/'.join(fields)} field"


def _texts(value: Any) -> list[str]:
    """Non-empty caption strings of a cell: a string or a list of them."""
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else []
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def _arrow_batches(path: str, columns: Sequence[str] | None = None) -> Iterator[Any]:
    """Record batches of an Arrow IPC file (file or stream format, as ``datasets`` writes), memory-mapped."""
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            reader: Any = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            batches = iter(pa.ipc.open_stream(source))
        for batch in batches:
            yield batch.select(list(columns)) if columns is not None else batch


def _table_batches(path: str, columns: Sequence[str] | None = None) -> tuple[list[str], Iterator[Any]]:
    """(column names, record batches) of a Parquet or Arrow shard."""
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        return list(pf.schema_arrow.names), (pf.iter_batches(batch_size=256, columns=list(columns)) if columns else iter(()))
    import pyarrow as pa

    with pa.memory_map(path) as source:
        try:
            names = list(pa.ipc.open_file(source).schema.names)
        except pa.ArrowInvalid:
            source.seek(0)
            names = list(pa.ipc.open_stream(source).schema.names)
    return names, (_arrow_batches(path, columns) if columns else iter(()))


def _table_columns(path: str, names: list[str], config: DataConfig) -> tuple[str, list[str]]:
    image = config.image_column or next((c for c in TABLE_IMAGE_COLUMNS if c in names), None)
    captions = list(_caption_fields(config)) if config.caption_column else [next((c for c in CAPTION_FIELDS if c in names), "")]
    absent = [c for c in [image, *captions] if not c or c not in names]
    if absent:
        what = "image_column" if image in absent or image is None else "caption_column"
        raise DataError(f"The shard {path} has no {'image' if what == 'image_column' else 'caption'} column "
                        f"({', '.join(repr(c) for c in absent if c) or 'none of the usual names'}); its columns are "
                        f"{', '.join(names)}. Set data.train.{what}=<name>.")
    return image, captions


def _table_records(path: str, config: DataConfig) -> Iterator[Record]:
    try:
        names, _ = _table_batches(path)
        image_col, caption_cols = _table_columns(path, names, config)
        key_col = "__key__" if "__key__" in names else None
        columns = [image_col, *caption_cols] + ([key_col] if key_col else [])
        row = 0
        for batch in _table_batches(path, columns)[1]:
            for values in batch.to_pylist():
                key = str(values[key_col]) if key_col and values.get(key_col) is not None else f"row {row}"
                row += 1
                yield _table_record(path, key, values[image_col], [c for col in caption_cols for c in _texts(values[col])])
    except DataError:
        raise
    except Exception as err:  # pyarrow errors: a truncated or foreign file
        yield Record(path, "(table)", None, problem=f"the shard cannot be read on ({type(err).__name__}: {err}); the rest is not read")


def _table_record(path: str, key: str, cell: Any, captions: list[str]) -> Record:
    image = cell.get("bytes") if isinstance(cell, dict) else cell
    if image is None:
        stored = isinstance(cell, dict) and cell.get("path")
        reason = ("the image is stored as a path, not as bytes; shards must hold the images themselves "
                  "(python scripts/write_shards.py writes them)") if stored else "no image (null)"
        return Record(path, key, None, problem=reason)
    if not isinstance(image, (bytes, bytearray)):
        return Record(path, key, None, problem=f"the image cell holds {type(image).__name__}, not image bytes")
    if not captions:
        return Record(path, key, bytes(image), problem="no caption (null or empty)")
    return Record(path, key, bytes(image), captions)
