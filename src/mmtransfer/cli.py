"""Command-line conventions shared by every script.

    python scripts/<script>.py --config configs/<recipe>.yaml [dotted.key=value ...] [--fast-dev-run]

Overrides and flags may come in any order.

``--help`` lists every key of the script's config with its default and comment.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import os
import re
import sys
import types
import typing
from typing import Any, TypeVar

from .config import ConfigError, load_config

T = TypeVar("T")


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` lines written above each field in the dataclass source (and its base classes')."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        comments.update(_own_field_comments(klass))
    return comments


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").rstrip())
            continue
        m = re.match(r"(\w+)\s*:", stripped)
        if m and pending:
            comments[m.group(1)] = " ".join(pending)
        pending = []
    return comments


def describe_config(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per leaf key: ``dotted.key = default  # comment`` (``defaults``: the instance whose values to show)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)  # X | None; not list[X]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if optional else []
        sub = tp if dataclasses.is_dataclass(tp) else (inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None)
        value = getattr(defaults, f.name)
        if sub is not None and isinstance(sub, type):
            lines.append(f"  [{key}]" + (f"  # {comments[f.name]}" if f.name in comments else "") + ("  (default: none)" if value is None else ""))
            lines += describe_config(sub, key + ".", value)
            continue
        comment = f"  # {comments[f.name]}" if f.name in comments else ""
        lines.append(f"  {key} = {value!r}{comment}")
    return lines


def parse_args(cls: type[T], description: str, argv: list[str] | None = None,
               extended: tuple[str, type] | None = None) -> tuple[T, argparse.Namespace]:
    """Parse ``--config``, dotted overrides and ``--fast-dev-run`` into the dataclass ``cls``.

    ``extended=(section, subclass)``: a recipe with that top-level section (or an override
    of a key in it) is parsed into ``subclass`` instead (e.g. a caption run with ``tasks``
    is a multi-task run), and ``--help`` lists the subclass's keys.
    Config errors print one clear line and exit with status 2, like argparse.
    """
    shown = extended[1] if extended else cls
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Config keys (override any with key=value):\n" + "\n".join(describe_config(shown)),
    )
    parser.add_argument("--config", help="YAML recipe whose keys map onto the config below (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.max_steps=100 optim.lr=1e-4")
    parser.add_argument("--fast-dev-run", action="store_true",
                        help="two training steps and one evaluation on a small slice, to check an installation and a recipe")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    # Overrides may sit before, between or after the flags (`k=v --fast-dev-run k2=v2`): plain
    # parse_args gives the positional list one contiguous run and rejects the rest.
    args = parser.parse_intermixed_args(argv)
    if extended is not None and _sets_section(extended[0], args.config, args.overrides):
        cls = extended[1]
    try:
        config = load_config(cls, args.config, args.overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    if args.print_config:
        import yaml

        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        sys.exit(0)
    return config, args


def _sets_section(section: str, path: str | None, overrides: list[str]) -> bool:
    """Whether the recipe at ``path`` has a top-level ``section``, or an override sets a key in it."""
    from .config import ConfigError, load_yaml

    if any(o.split("=", 1)[0].strip().split(".")[0] == section for o in overrides):
        return True
    try:
        return path is not None and section in load_yaml(path)
    except ConfigError:  # parse_args reports a bad recipe file itself
        return False


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` words of a data script's command line -> data options (values parsed as YAML)."""
    from .config import parse_value

    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"Options look like key=value (e.g. caption_column=text), got '{pair}'.")
        key, value = pair.split("=", 1)
        options[key.strip()] = parse_value(value)
    return options


def run_main(fn: Any, *args: Any) -> Any:
    """Call ``fn``; errors meant for people (bad data, names, configs) end with one line, not a stack trace."""
    from .checkpoint import CheckpointError
    from .config import ConfigError as _ConfigError
    from .distributed import LaunchError
    from .registry import ModelFileError, UnknownModelError
    from .run_folder import RunFolderError
    from .towers import TowerNotInstalledError

    known: tuple[type[BaseException], ...] = (_ConfigError, UnknownModelError, ModelFileError, FileNotFoundError,
                                              CheckpointError, LaunchError, RunFolderError, TowerNotInstalledError)
    try:
        from .data.config import DataError

        known = known + (DataError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        result = fn(*args)
    except known as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    from .distributed import is_main_process

    # Under several processes every one returns the results; only the main process reports them.
    return result if is_main_process() else None


def setup_logging(level: int = logging.INFO) -> None:
    """Console logging for scripts: one line per event, main process only under Accelerate."""
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "transformers", "timm", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
