"""Output conventions shared by `fedctl` and `fednode` (see docs/cli.md); fedctl takes them
through fednode.api (fedctl.output), since fednode imports nothing of fedctl.

With ``--json`` a command prints exactly one JSON object on stdout; progress and logs go to
stderr. Failures are ``{"ok": false, "error": {code, message, hint}}`` with exit code 2 for
usage and validation errors and 1 for everything else.

Human output never passes data through rich's markup parser: what a coordinator or a peer
wrote (names, messages, error texts) could hold ``[/]``, which makes rich raise, or
``[link=…]``. Data goes into ``rich.text.Text`` (``plain``), styled by argument, after
protocol.text.clean has removed terminal control characters.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TextIO

import typer
from rich.console import Console
from rich.text import Text

from protocol import text
from protocol.errors import DataError, FednodeError, SpecError, ValidationError

USAGE_ERRORS = (SpecError, ValidationError, DataError)
stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def plain(value: Any, style: str = "", limit: int | None = text.MAX_TEXT) -> Text:
    """``value`` as literal, cleaned text (None as ""), never parsed as markup."""
    s = "" if value is None else value if isinstance(value, str) else str(value)
    return Text(text.clean(s, limit), style=style)


def line(*parts: str | Text | tuple[str, str]) -> Text:
    """One line from pieces: a str is literal and cleaned, (str, style) styled, Text as is."""
    out = Text()
    for part in parts:
        if isinstance(part, Text):
            out.append_text(part)
        elif isinstance(part, tuple):
            out.append_text(plain(part[0], part[1]))
        else:
            out.append_text(plain(part))
    return out


def emit_json(obj: dict[str, Any], file: TextIO | None = None) -> None:
    out = file or sys.stdout  # ``file``: a stdout kept aside while sys.stdout is redirected
    out.write(json.dumps(obj, default=str) + "\n")
    out.flush()


def fail(err: FednodeError, as_json: bool) -> NoReturn:
    code = 2 if isinstance(err, USAGE_ERRORS) or err.code == "USAGE" else 1
    if as_json:
        emit_json({"ok": False, "error": err.to_dict()})
    else:
        # code, message and hint may be a coordinator's words: text, never markup
        stderr.print(line(("error", "bold red"), " ", (err.code, "red"), ": ", err.message))
        if err.hint:
            stderr.print(line(("hint:", "dim"), " ", err.hint))
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
        try:
            human(result)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # The reply came from another machine: a field missing or of the wrong type is
            # its fault, reported as such, not a traceback on the operator's terminal.
            fail(
                FednodeError(
                    f"the coordinator's reply is malformed ({type(exc).__name__}: "
                    f"{text.shown(str(exc))})",
                    code="BAD_REPLY",
                    hint="run the same fednode version on both machines; --json shows the reply",
                ),
                as_json,
            )
