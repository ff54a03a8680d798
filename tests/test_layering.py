"""Imports go down the layers only (s3ql's import check, with layers).

Every module under ``src/mirrorfs`` is parsed with ``ast``; every import, also one inside a
function, is resolved to the top-level part of the package it names and checked against the
layer table. A module may import its own layer's modules and the layers below it, never a layer
above, and never a sibling listed in ``FORBIDDEN``. The package root (``mirrorfs.__version__``)
may be imported from anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mirrorfs"

#: Top-level part of the package -> its layer; higher layers may import lower ones.
LAYERS = {
    # the base: sizes, the error hierarchy, blocking I/O off the trio thread (Linux AIO for it)
    "units": 0, "errors": 0, "fileio": 0, "aio": 0,
    # self-contained building blocks; metrics knows neither jobs nor FUSE (counters, exporter)
    "bitmap": 1, "nbd": 1, "targets": 1, "metrics": 1, "journal": 1, "state": 1,
    # the job engine
    "mirror": 2,
    # the pyfuse3 adapter and the control surfaces, side by side
    "fs": 3, "control": 3,
    # the process that assembles a mount, and the command line
    "daemon": 4, "cli": 4,
}
#: (importer, imported) pairs of the same layer that must not meet; the daemon wires fs and
#: control together, and the command line dispatches to the daemon, never the other way round.
FORBIDDEN = {("fs", "control"), ("control", "fs"), ("daemon", "cli")}
#: Only these may import pyfuse3 (``control/`` must run without FUSE, e.g. in the CLI client).
FUSE_USERS = {"fs", "daemon"}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in ``source``, also function-local ones."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # ``from . import x`` may name a module: check the names too.
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def top_part(name: str) -> str | None:
    """``mirrorfs.fs.operations`` -> ``fs``; None for the package root or another package."""
    parts = name.split(".")
    if parts[0] != "mirrorfs" or len(parts) == 1:
        return None
    return parts[1]


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    importer = top_part(module) or "__init__"
    if importer == "__init__":
        return []
    problems = []
    seen = set()
    for line, name in imported_modules(source, module, is_package):
        if (line, top_part(name)) in seen:
            continue  # ``from ..fs import x`` names both mirrorfs.fs and mirrorfs.fs.x
        seen.add((line, top_part(name)))
        if name.split(".")[0] == "pyfuse3" and importer not in FUSE_USERS:
            problems.append(f"{module}:{line} imports pyfuse3 (only {sorted(FUSE_USERS)} may)")
            continue
        imported = top_part(name)
        if imported is None or imported == importer or imported not in LAYERS:
            # The root (``__version__``), the module's own part, or another package.
            continue
        if LAYERS[imported] > LAYERS[importer]:
            problems.append(f"{module}:{line} imports {name} (layer {imported} is above {importer})")
        elif (importer, imported) in FORBIDDEN:
            problems.append(f"{module}:{line} imports {name} ({importer} must not import {imported})")
    return problems


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"}
    assert parts - set(LAYERS) == set(), "give every new package or module a layer in LAYERS"


def test_no_module_imports_a_higher_layer_or_a_forbidden_sibling() -> None:
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += violations(path.read_text(encoding="utf-8"), module_name(path),
                               is_package=path.name == "__init__.py")
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("mirrorfs.mirror.job", "from ..fs.node import ImageNode", "layer fs is above mirror"),
    ("mirrorfs.fs.mount_options", "def f():\n    from ..cli import main", "layer cli is above fs"),
    ("mirrorfs.control.wiring", "from ..fs.control_dir import VirtualFile", "control must not import fs"),
    ("mirrorfs.fs.mount", "from ..control import wiring", "fs must not import control"),
    ("mirrorfs.units", "import mirrorfs.bitmap.memory", "layer bitmap is above units"),
    ("mirrorfs.daemon.mount", "from mirrorfs import cli", "daemon must not import cli"),
    ("mirrorfs.control.qmp_server", "import pyfuse3", "imports pyfuse3"),
])
def test_the_check_sees_upward_and_sibling_imports(module: str, source: str, expected: str) -> None:
    (problem,) = violations(source, module)
    assert expected in problem


@pytest.mark.parametrize(("module", "source"), [
    ("mirrorfs.fs.node", "from .. import fileio"),
    ("mirrorfs.control.qmp_server", "from .. import __version__"),
    ("mirrorfs.targets.nbd", "from mirrorfs.nbd.client import NBDClient"),
    ("mirrorfs.daemon.mount", "import pyfuse3\nfrom ..fs.operations import Operations"),
    ("mirrorfs.cli", "from .daemon.mount_options import helper_argv"),
])
def test_the_check_lets_downward_imports_pass(module: str, source: str) -> None:
    assert violations(source, module) == []
