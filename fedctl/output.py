"""Output conventions shared by `fedctl` and `fednode` (see docs/cli.md): defined once in
fednode.output and taken through fednode.api, the only part of fednode fedctl may import.

With ``--json`` a command prints exactly one JSON object on stdout; progress and logs go to
stderr. Failures are ``{"ok": false, "error": {code, message, hint}}`` with exit code 2 for
usage and validation errors and 1 for everything else.

Human output never passes data through rich's markup parser: what a coordinator or a peer
wrote (names, messages, error texts) could hold ``[/]``, which makes rich raise, or
``[link=…]``. Data goes into ``rich.text.Text`` (``plain``), styled by argument, after
protocol.text.clean has removed terminal control characters.
"""

from __future__ import annotations

from fednode.api import USAGE_ERRORS, emit_json, fail, line, plain, run, stderr, stdout

__all__ = ["USAGE_ERRORS", "emit_json", "fail", "line", "plain", "run", "stderr", "stdout"]
