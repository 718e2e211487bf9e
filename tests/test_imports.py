"""The import rules of docs/architecture.md ("Import rules"), checked on the source itself.

Every module of the four packages is parsed with ``ast`` and every import statement in it
counts: at the top, inside a function, under ``if TYPE_CHECKING:`` (an annotation-only
import still ties the two modules together, and is one edit away from a runtime one).
Relative imports are resolved; ``from pkg import name`` is an import of the module
``pkg.name`` when that module exists, else of ``pkg`` itself.

The rules:

* ``protocol/`` is pure: it imports nothing of ``fednode``, ``fedctl`` or ``tui``, and none
  of the libraries that do a node's I/O or training (asyncio, sqlite3, torch, and the
  websocket and SQLite libraries fednode uses: websockets, sqlite_utils);
* ``fedctl/`` and ``tui/`` import nothing of ``fednode`` but ``fednode.api``;
* ``fednode/`` imports nothing of ``fedctl`` or ``tui``;
* the round engine's pure core (``PURE_CORE``: a round's decisions, resume, versions,
  bounds, outlier detection) imports no I/O and no clock: no asyncio, sqlite3, socket,
  time, websockets, nor the I/O modules of fednode;
* no import cycle among the project's modules.
"""

from __future__ import annotations

import ast
import graphlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "fednode", "fedctl", "tui")

# protocol/ says what the words and the messages are; the node does the I/O.
PROTOCOL_FORBIDDEN = (
    "fednode",
    "fedctl",
    "tui",
    "asyncio",
    "sqlite3",
    "torch",
    "websockets",
    "sqlite_utils",
)
# The round engine's decisions: plain functions, tested and replayed without a node.
PURE_CORE = (
    "fednode.rounds",
    "fednode.resume",
    "fednode.versions",
    "fednode.bounds",
    "fednode.robustness",
)
CORE_FORBIDDEN = (
    "asyncio",
    "sqlite3",
    "socket",
    "time",
    "websockets",
    "sqlite_utils",
    "fednode.ledger",
    "fednode.store",
    "fednode.transport",
    "fednode.coordinator",
    "fednode.session",
)
# What fedctl/ and tui/ may import of fednode: its documented API, nothing else.
FEDNODE_API = "fednode.api"


@dataclass(frozen=True)
class Import:
    importer: str  # the module holding the statement
    target: str  # the module imported, dotted and absolute
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()}: {self.importer} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out[module_name(path)] = path
    return out


MODULES = project_modules()


def _base(importer: str, path: Path, level: int, module: str | None) -> str:
    """The absolute module a (possibly relative) ``from … import`` names."""
    if level == 0:
        return module or ""
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    package = package[: len(package) - (level - 1)]
    return ".".join([*package, *([module] if module else [])])


def imports_of(importer: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):  # every statement, at any depth
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(importer, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _base(importer, path, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(importer, sub if sub in MODULES else base, path, node.lineno)


ALL_IMPORTS = [imp for name, path in MODULES.items() for imp in imports_of(name, path)]


def _top(module: str) -> str:
    return module.split(".")[0]


def _report(bad: list[Import], rule: str) -> str:
    return rule + ":\n  " + "\n  ".join(dict.fromkeys(str(b) for b in bad))


# --- the walker itself ----------------------------------------------------------------


def test_walker_finds_every_kind_of_import(tmp_path: Path) -> None:
    """The checks below are only as good as this walk: function-level, TYPE_CHECKING and
    relative imports must all be seen, and ``from pkg import submodule`` resolved."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from __future__ import annotations\n"
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from fednode.coordinator import Coordinator\n"
        "def f():\n"
        "    from . import helpers\n"
        "    from ..protocol import errors\n"
        "    from .. import quality\n"
    )
    # Pretend the file is fednode/sub/mod.py to resolve its relative imports.
    found = {
        (i.target, i.line) for i in imports_of("fednode.sub.mod", src) if i.target != "__future__"
    }
    assert ("os.path", 2) in found
    assert ("fednode.coordinator", 5) in found
    assert ("fednode.sub", 7) in found  # fednode.sub.helpers is no module: the package
    assert ("fednode.protocol", 8) in found
    assert ("fednode.quality", 9) in found  # from fednode import <module>: that module
    assert _base("fednode.quality", ROOT / "fednode" / "quality.py", 1, None) == "fednode"


# --- the rules ------------------------------------------------------------------------


def test_protocol_imports_no_node_and_no_io_library() -> None:
    bad = [
        i
        for i in ALL_IMPORTS
        if _top(i.importer) == "protocol" and _top(i.target) in PROTOCOL_FORBIDDEN
    ]
    assert not bad, _report(bad, f"protocol/ must not import {', '.join(PROTOCOL_FORBIDDEN)}")


@pytest.mark.parametrize("package", ["fedctl", "tui"])
def test_clients_import_only_the_documented_api_of_fednode(package: str) -> None:
    bad = [
        i
        for i in ALL_IMPORTS
        if _top(i.importer) == package and _top(i.target) == "fednode" and i.target != FEDNODE_API
    ]
    assert not bad, _report(bad, f"{package}/ may import only {FEDNODE_API} of fednode")


def test_the_round_core_is_pure() -> None:
    assert set(PURE_CORE) <= set(MODULES)
    # what the core imports, and what those import in turn, inside the project
    seen, todo = set(), list(PURE_CORE)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += [i.target for i in ALL_IMPORTS if i.importer == mod and i.target in MODULES]
    bad = [
        i
        for i in ALL_IMPORTS
        if i.importer in seen
        and any(i.target == f or i.target.startswith(f + ".") for f in CORE_FORBIDDEN)
    ]
    assert not bad, _report(bad, "the round core (and what it imports) must do no I/O")


def test_fednode_imports_no_client() -> None:
    bad = [
        i
        for i in ALL_IMPORTS
        if _top(i.importer) == "fednode" and _top(i.target) in ("fedctl", "tui")
    ]
    assert not bad, _report(bad, "fednode/ must not import fedctl or tui")


def find_cycle(imports: list[Import]) -> list[Import]:
    """One import cycle among the project's modules, as its edges in order; [] if none."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    edge: dict[tuple[str, str], Import] = {}
    for i in imports:
        if i.target in MODULES and i.target != i.importer:
            graph[i.importer].add(i.target)
            edge.setdefault((i.importer, i.target), i)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        # [n0, n1, ..., n0], each an immediate predecessor of the next: n1 imports n0.
        nodes: list[str] = err.args[1]
        return [edge[(b, a)] for a, b in itertools.pairwise(nodes)]
    return []


def test_find_cycle_names_each_edge() -> None:
    a = Import("fednode.session", "fednode.secure_round", ROOT / "fednode/session.py", 3)
    b = Import("fednode.secure_round", "fednode.session", ROOT / "fednode/secure_round.py", 9)
    cycle = find_cycle([a, b])
    assert set(cycle) == {a, b}
    assert find_cycle([a]) == []


def test_no_import_cycle() -> None:
    cycle = find_cycle(ALL_IMPORTS)
    assert not cycle, _report(cycle, "import cycle (break it with a fednode.services protocol)")


# SQL is the ledger's own business: the calls of the sqlite3 / sqlite-utils APIs that run it.
SQL_CALLS = {"execute", "executemany", "executescript", "query"}
LEDGER_MODULE = "fednode.ledger"


def test_sql_runs_only_in_the_ledger_module() -> None:
    """fednode/, fedctl/ and tui/ read and write the ledger through fednode/ledger.py only
    (the monitor, the admin channel and reporting once ran their own queries)."""
    bad = []
    for name, path in MODULES.items():
        if _top(name) == "protocol" or name == LEDGER_MODULE:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in SQL_CALLS
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.func.attr}(...)")
    assert not bad, "SQL outside fednode/ledger.py:\n  " + "\n  ".join(bad)
