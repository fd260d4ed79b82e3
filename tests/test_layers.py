"""Layers point down: what each part of the package may import, read from the source (no import runs).

    base      config, registry, towers, distributed, sharding, schedules, checkpoint
    parts     models/, losses/, data/
    tasks     objectives/, features, transfer, evaluate, run_folder, selection
    running   train (the loop), assemble (building from a config)
    recipes   recipes/<name>: config -> assemble -> train -> report; never one another
    front     cli, the package's __init__ (public API), scripts/
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmtransfer

PACKAGE = Path(mmtransfer.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[1]

LAYERS = {
    "config": 0, "registry": 0, "distributed": 0, "schedules": 0, "checkpoint": 0, "sharding": 0,
    "towers": 0, "models": 1, "losses": 1, "data": 1,
    "objectives": 2, "features": 2, "transfer": 2, "evaluate": 2, "ensemble": 2,
    "train": 3, "assemble": 3, "run_folder": 2, "selection": 2,
    "recipes": 4,
    "cli": 5, "__init__": 5,
}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    """mmtransfer.<dotted path> of a module file."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every mmtransfer module ``path`` imports (relative imports resolved), at any depth of the file."""
    module = _name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "mmtransfer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mmtransfer":
                continue
            # `from . import data` / `from .recipes import captions` import those modules, not the package above them.
            modules = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
            found.update(modules)
            if len(modules) < len(node.names):
                found.add(target)
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_layer():
    tops = {_top(_name(p)) for p in _modules()}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


def test_imports_point_down():
    upward = []
    for path in _modules():
        here = _name(path)
        for target in _imports(path):
            if _top(target) == "__init__" and target == "mmtransfer" and _top(here) != "__init__":
                upward.append(f"{here} -> mmtransfer (the public API sits on top)")
            elif LAYERS[_top(target)] > LAYERS[_top(here)]:
                upward.append(f"{here} -> {target}")
    assert not upward, "\n".join(sorted(upward))


def test_recipes_never_import_one_another():
    crossing = []
    for path in (PACKAGE / "recipes").glob("*.py"):
        here = _name(path)
        for target in _imports(path):
            if target.startswith("mmtransfer.recipes.") and target != here:
                crossing.append(f"{here} -> {target}")
    assert not crossing, "\n".join(sorted(crossing))


def test_scripts_use_recipes_and_the_public_api_only():
    allowed = ("mmtransfer", "mmtransfer.cli", "mmtransfer.config", "mmtransfer.data", "mmtransfer.recipes")
    wrong = []
    for path in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                if name.startswith("mmtransfer") and not any(name == a or name.startswith(a + ".") for a in allowed):
                    wrong.append(f"{path.name} -> {name}")
    assert not wrong, "\n".join(wrong)


# Modules or functions allowed over the limits, each at most this long (none today; keep it that way).
OVER_THE_LIMIT: dict[str, int] = {}


def test_modules_and_functions_stay_readable():
    sizes: dict[str, int] = {}
    for path in _modules():
        sizes[_name(path)] = len(path.read_text().splitlines())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes[f"{_name(path)}.{node.name}"] = node.end_lineno - node.lineno + 1
    too_long = [f"{name}: {n} lines" for name, n in sorted(sizes.items())
                if n > OVER_THE_LIMIT.get(name, MAX_MODULE_LINES if name in {_name(p) for p in _modules()} else MAX_FUNCTION_LINES)]
    assert not too_long, "\n".join(too_long)
