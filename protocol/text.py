"""Text from other machines, made safe to store, log and show. Pure: no I/O.

Every string a peer or a coordinator sends is data, never markup or terminal control. A
hostile string could otherwise clear an operator's screen (``ESC [2J``), retitle the window
(``ESC ]0;…BEL``), plant a hyperlink (OSC 8), hide or reorder what is shown (bidi overrides,
zero-width characters), or, quoted whole in an error, make a log line or a ledger row
megabytes long. This module is the one definition of "cleaned":

- ``clean``: control characters (C0, DEL, C1), format characters (Unicode category Cf:
  bidi embeddings, overrides and isolates, zero-width spaces and joiners, BOM, …) and lone
  surrogates are removed; line and tab breaks become one space; the result is cut to a
  length, ending in "…" when it was cut. A string that is already clean and short comes back
  as the very same object, which keeps the common case cheap.
- ``clean_tree``: the same for every string of a decoded CBOR/JSON tree (keys too).
- ``shown``: a short, cleaned ``repr`` of any value, for error messages that quote what
  was refused, so an error about a 1 MB string is not itself 1 MB.

What is left is still untrusted text: it must be printed as text (rich ``Text``, escaped
markup, escaped HTML), never interpreted.
"""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_TEXT = 4096  # the longest string any one field may carry (protocol.messages.MAX_STR)
SHOWN = 60  # how much of a refused value an error message quotes
ELLIPSIS = "…"

# Breaks that separate words: each run of them becomes one space, so "a\r\nb" reads "a b".
# (\x1c-\x1f are the "information separators" that str.splitlines() also breaks on.)
_BREAKS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029")
# Categories removed outright: Cc (C0, DEL, C1 controls), Cf (format: bidi controls,
# zero-width characters, soft hyphen, BOM, tag characters), Cs (lone surrogates, which also
# cannot be encoded for a terminal or a file).
_DROP = frozenset({"Cc", "Cf", "Cs"})


def _scrub(s: str, limit: int | None, replacement: str | None) -> tuple[str, bool]:
    """(the cleaned text, whether more input was left when ``limit`` was reached)."""
    out: list[str] = []
    size = 0
    gap = False  # a run of breaks is pending: written as one space before the next char
    for ch in s:
        if ch.isprintable():  # most characters: a C-level check, no category lookup
            piece = ch
        elif replacement is not None:
            piece = ch if unicodedata.category(ch) not in _DROP else replacement
            if ch in _BREAKS:
                piece = replacement
        elif ch in _BREAKS:
            gap = bool(out)  # leading breaks are dropped
            continue
        elif unicodedata.category(ch) in _DROP:
            continue
        else:  # non-ASCII spaces (Zs), private use, unassigned: visible, harmless
            piece = ch
        if gap:
            out.append(" ")
            size += 1
            gap = False
        out.append(piece)
        size += len(piece)
        if limit is not None and size > limit:
            return "".join(out), True
    return "".join(out), False


def clean(s: str, limit: int | None = MAX_TEXT, *, replacement: str | None = None) -> str:
    """``s`` without control and format characters, breaks as single spaces, at most
    ``limit`` characters (the last one "…" when it was cut; ``None``: no limit).

    With ``replacement`` (fedctl's text report uses U+FFFD) each removed character,
    breaks included, is replaced one for one instead, so the reader sees where they were.
    """
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    head = s if limit is None else s[: limit + 1]
    if head.isprintable():  # nothing to remove in what can be kept: only maybe cut
        if limit is None or len(s) <= limit:
            return s
        return s[: limit - 1] + ELLIPSIS
    text, more = _scrub(s, limit, replacement)
    if limit is not None and (more or len(text) > limit):
        return text[: limit - 1] + ELLIPSIS
    return text


def clean_tree(obj: Any, limit: int | None = MAX_TEXT) -> Any:
    """``obj`` with ``clean`` applied to every string in it: dict keys and values, list and
    tuple items (tuples come back as lists, as CBOR would decode them). Bytes, numbers,
    booleans and None are left alone. Decoded CBOR nests at most 400 deep (cbor2's limit),
    well within Python's recursion limit."""
    if isinstance(obj, str):
        return clean(obj, limit)
    if isinstance(obj, dict):
        return {
            (clean(k, limit) if isinstance(k, str) else k): clean_tree(v, limit)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [clean_tree(v, limit) for v in obj]
    return obj


def shown(value: Any, limit: int = SHOWN) -> str:
    """A bounded, cleaned ``repr`` of ``value``, for an error message that quotes it.

    The repr is written piece by piece and stops once ``limit`` characters are out, so
    quoting a 1 MB string, or a list of a million of them, costs no more than a short one.
    """
    out: list[str] = []
    _repr_into(value, out, [limit + 1])
    return clean("".join(out), limit)


def _repr_into(value: Any, out: list[str], budget: list[int]) -> None:
    """Append ``repr(value)`` to ``out`` until ``budget[0]`` characters were written."""

    def emit(piece: str) -> None:
        out.append(piece[: budget[0]])
        budget[0] -= len(piece)

    if budget[0] <= 0:
        return
    if isinstance(value, str | bytes | bytearray):
        emit(repr(value[: budget[0]]))
    elif isinstance(value, dict):
        emit("{")
        for i, (k, v) in enumerate(value.items()):
            if budget[0] <= 0:
                return
            emit(", " if i else "")
            _repr_into(k, out, budget)
            emit(": ")
            _repr_into(v, out, budget)
        emit("}")
    elif isinstance(value, list | tuple | set | frozenset):
        opening, closing = ("[", "]") if isinstance(value, list) else ("(", ")")
        if isinstance(value, set | frozenset):
            opening, closing = "{", "}"
        emit(opening)
        for i, v in enumerate(value):
            if budget[0] <= 0:
                return
            emit(", " if i else "")
            _repr_into(v, out, budget)
        emit(closing)
    else:
        try:
            emit(repr(value))
        except Exception:  # a repr that fails is no reason to lose the error it belongs to
            emit(f"<{type(value).__name__}>")
