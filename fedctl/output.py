"""Output conventions shared by `fedctl` and `fednode` (see ../shared/CLI.md).

With ``--json`` a command prints exactly one JSON object on stdout; progress and logs go to
stderr. Failures are ``{"ok": false, "error": {code, message, hint}}`` with exit code 2 for
usage and validation errors and 1 for everything else.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from rich.console import Console

from protocol.errors import DataError, FednodeError, SpecError, ValidationError

USAGE_ERRORS = (SpecError, ValidationError, DataError)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def emit_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def fail(err: FednodeError, as_json: bool) -> NoReturn:
    code = 2 if isinstance(err, USAGE_ERRORS) or err.code == "USAGE" else 1
    if as_json:
        emit_json({"ok": False, "error": err.to_dict()})
    else:
        stderr.print(f"[bold red]error[/] [red]{err.code}[/]: {err.message}")
        if err.hint:
            stderr.print(f"[dim]hint:[/] {err.hint}")
    raise typer.Exit(code)


def run(
    as_json: bool,
    fn: Callable[[], dict[str, Any]],
    human: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Call ``fn``; print its result as JSON or through ``human``; map errors to exits."""
    try:
        result = fn()
    except FednodeError as err:
        fail(err, as_json)
    except KeyboardInterrupt:
        fail(FednodeError("interrupted", code="INTERRUPTED", hint=""), as_json)
    if as_json:
        emit_json({"ok": True, **result})
    elif human is not None:
        human(result)
