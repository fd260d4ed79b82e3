"""Write docs/config_reference.md: every config key of every script, with its default and comment.

The text comes from the config dataclasses themselves, through the helper the scripts' ``--help``
uses (``mmtransfer.cli.describe_config``), so the reference says what the code says. Run it from
anywhere after a config class changes or moves (update SCRIPTS below when a class moves):

    python docs/gen_config_reference.py            # rewrite docs/config_reference.md
    python docs/gen_config_reference.py --check    # exit 1 when the committed file is out of date
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "config_reference.md"

# (script, "module:ConfigClass") in the order the reference lists them.
SCRIPTS = [
    # The caption keys plus the tasks section of multi-task runs, as the script's --help lists them.
    ("scripts/finetune_captions.py", "mmtransfer.recipes.multitask:MultitaskConfig"),
    ("scripts/transfer_classify.py", "mmtransfer.recipes.classify:ClassifyConfig"),
    ("scripts/domain_adapt.py", "mmtransfer.recipes.adapt:AdaptConfig"),
    ("scripts/distill.py", "mmtransfer.recipes.distill:DistillConfig"),
]


def _import_checkout() -> None:
    """Import mmtransfer from this checkout (src/ layout or not), never from another installed copy."""
    for path in (ROOT, ROOT / "src"):
        if (path / "mmtransfer" / "__init__.py").is_file():
            sys.path.insert(0, str(path))
    import mmtransfer

    where = Path(mmtransfer.__file__).resolve()
    if ROOT not in where.parents:
        raise SystemExit(f"mmtransfer was imported from {where}, not from this checkout ({ROOT}).")


def _summary(script: Path) -> str:
    """The first paragraph of a script's docstring, read without running the script."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _markdown_line(line: str) -> str:
    """One ``describe_config`` line as a Markdown list item, nested under its section."""
    text = line.strip()
    if text.startswith("["):  # a section: "[key]  # comment  (default: none)"
        key, rest = text[1:].split("]", 1)
        indent = "  " * key.count(".")
        rest = rest.strip()
        none = rest.endswith("(default: none)")
        rest = rest.removesuffix("(default: none)").strip().removeprefix("#").strip()
        parts = [f"{indent}- **{_code(key)}**"]
        if none:
            parts.append("(a section; default: none)")
        if rest:
            parts.append("— " + rest)
        return " ".join(parts)
    key, rest = text.split(" = ", 1)
    value, _, comment = rest.partition("  # ")
    item = f"{'  ' * key.count('.')}- {_code(key)} = {_code(value)}"
    return item + (f" — {comment.strip()}" if comment.strip() else "")


def render() -> str:
    _import_checkout()
    from mmtransfer.cli import describe_config

    out = [
        "# Config reference",
        "",
        "<!-- Written by docs/gen_config_reference.py from the config dataclasses; do not edit by hand. -->",
        "",
        "Every key each script takes, with the dataclass default and its comment (what `--help` prints).",
        "A recipe in `configs/` sets some of them; `dotted.key=value` on the command line sets any of them,",
        "e.g. `train.max_steps=100`. Sections are in bold, their keys nested; a section whose default is none is off until",
        "a recipe or an override gives it a key. Back to the [README](../README.md); which recipe runs with",
        "which script: [scripts.md](scripts.md).",
        "",
    ]
    for script, target in SCRIPTS:
        out.append(f"- [{script}](#{script.replace('/', '').replace('.', '')})")
    out.append("")
    for script, target in SCRIPTS:
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        out += [f"## {script}", "", f"`{name}` (`{module}`). {_summary(ROOT / script)}", ""]
        out += [_markdown_line(line) for line in describe_config(cls)]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config_reference.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            raise SystemExit(f"{OUT.relative_to(ROOT)} is out of date: run python docs/gen_config_reference.py")
        print(f"{OUT.relative_to(ROOT)} is up to date.")
        return
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
