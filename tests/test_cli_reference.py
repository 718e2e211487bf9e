"""docs/cli.md stays the whole truth: every command, option and error code is in it.

The commands and options come from the typer apps themselves (what `--help` shows), the
error codes from the source: the ``code`` of every error class and every ``code="..."``
literal in protocol/, fednode/ and fedctl/. Adding any of them without documenting it fails
here; so does documenting an error code that no longer exists.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command

import fedctl.cli
import fednode.cli
from protocol import errors

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
SOURCES = ("protocol", "fednode", "fedctl")

# A command's section starts with a heading that is exactly its path: ### `fedctl model get`
HEADING = re.compile(r"^### `([^`]+)`\s*$")
CODE_LITERAL = re.compile(r"\bcode\s*=\s*\"([A-Z][A-Z0-9_]*)\"")
CODE_CONSTANT = re.compile(r"\bcode\s*=\s*([A-Z_][A-Z0-9_]*)\b")
TABLE_CODE = re.compile(r"^\| `([A-Z][A-Z0-9_]*)` \|", re.MULTILINE)


def _walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if getattr(cmd, "hidden", False):
        return
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _walk(sub, (*path, name))


def _commands() -> list[tuple[str, Any]]:
    apps: tuple[tuple[str, typer.Typer], ...] = (
        ("fedctl", fedctl.cli.app),
        ("fednode", fednode.cli.app),
    )
    return [(" ".join(p), c) for prog, app in apps for p, c in _walk(get_command(app), (prog,))]


def _sections(doc: str) -> dict[str, str]:
    """Command path -> the text of its section (to the next heading)."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in doc.splitlines():
        m = HEADING.match(line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif line.startswith("#"):
            current = None
        elif current is not None:
            out[current] += line + "\n"
    return out


def _documented_names(cmd: Any) -> list[str]:
    """What a reader must find in the command's section: every non-hidden option name
    (both spellings of a flag pair) and every argument, in capitals (SESSION_ID)."""
    names: list[str] = []
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        if type(param).__name__.endswith("Argument"):
            names.append(param.name.upper())
        else:
            names += [*param.opts, *param.secondary_opts]
    return names


def _source_codes() -> set[str]:
    codes: set[str] = set()
    constants: dict[str, set[str]] = {}  # NAME = "CODE" anywhere in the sources
    used: set[str] = set()  # code=NAME (a constant, maybe defined in another module)
    for package in SOURCES:
        for path in (ROOT / package).rglob("*.py"):
            src = path.read_text(encoding="utf-8")
            codes.update(CODE_LITERAL.findall(src))
            used.update(CODE_CONSTANT.findall(src))
            for name, code in re.findall(r"^(\w+)\s*=\s*\"([A-Z][A-Z0-9_]*)\"", src, re.M):
                constants.setdefault(name, set()).add(code)
    for name in used:
        codes.update(constants.get(name, set()))
    return codes


def _error_classes() -> set[str]:
    return {
        cls.code
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.FednodeError)
    }


def _error_table(doc: str) -> set[str]:
    part = doc.split("\n## Error codes\n", 1)
    assert len(part) == 2, "docs/cli.md lost its '## Error codes' section"
    return set(TABLE_CODE.findall(part[1]))


DOC_TEXT = DOC.read_text(encoding="utf-8")
SECTIONS = _sections(DOC_TEXT)
COMMANDS = _commands()


def test_the_walk_sees_every_command() -> None:
    """The walk itself must reach nested groups, or every other check here is empty."""
    paths = {p for p, _ in COMMANDS}
    assert {"fedctl", "fedctl session start", "fedctl model export", "fednode run"} <= paths
    assert len(paths) > 30


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS])
def test_every_command_is_documented(path: str) -> None:
    cmd = dict(COMMANDS)[path]
    if getattr(cmd, "commands", None) and not cmd.params:
        # a group without options of its own: named in the reference, its commands below
        assert f"`{path}`" in DOC_TEXT, f"{path} is not named in docs/cli.md"
        return
    assert path in SECTIONS, f"docs/cli.md has no section '### `{path}`'"
    missing = [n for n in _documented_names(cmd) if n not in SECTIONS[path]]
    assert not missing, f"{path}: options/arguments missing from its docs/cli.md section: {missing}"


def test_every_documented_command_exists() -> None:
    stale = set(SECTIONS) - {p for p, _ in COMMANDS}
    assert not stale, f"docs/cli.md documents commands that do not exist: {sorted(stale)}"


def test_every_error_code_is_in_the_table() -> None:
    table = _error_table(DOC_TEXT)
    classes = _error_classes()
    assert {"BAD_STATE", "SPEC_INVALID", "NOT_AUTHORIZED"} <= classes  # the scan works
    assert not classes - table, f"error classes missing: {sorted(classes - table)}"
    literals = _source_codes()
    assert {"USAGE", "TOKEN_EXPIRED", "CAR_INVALID"} <= literals  # literals and constants
    assert not literals - table, f"error codes missing: {sorted(literals - table)}"
    # and no code that nothing can print any more
    assert not table - literals - classes, f"stale codes: {sorted(table - literals - classes)}"


def test_the_docs_stay_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/cli.md" in readme
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "DESIGN.md" not in text, path
