"""protocol.text: peer text made safe to store, log and show (control characters, format
characters, length), and bounded quotes of refused values."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.text import ELLIPSIS, MAX_TEXT, clean, clean_tree, shown

HOSTILE = [
    "\x1b[2J",  # CSI: clear the screen
    "\x1b[31mred\x1b[0m",  # SGR colours
    "\x1b]0;pwned\x07",  # OSC: window title, BEL-terminated
    "\x1b]8;;http://evil\x1b\\click\x1b]8;;\x1b\\",  # OSC 8 hyperlink, ST-terminated
    "\x9b2J",  # C1 CSI
    "\x9d0;t\x9c",  # C1 OSC and ST
    "\x00nul\x7fdel\x08bs\x07bel",
]


@pytest.mark.parametrize("s", HOSTILE)
def test_no_control_character_survives(s: str) -> None:
    out = clean(s)
    assert not any(unicodedata.category(c) == "Cc" for c in out), repr(out)


def test_escape_sequences_lose_their_introducer_and_keep_their_text() -> None:
    assert clean("\x1b[2J") == "[2J"
    assert clean("\x1b]0;pwned\x07") == "]0;pwned"
    assert clean("\x1b]8;;http://evil\x1b\\click") == "]8;;http://evil\\click"
    assert clean("a\x9bb") == "ab"
    assert clean("nul\x00byte") == "nulbyte"


def test_bidi_and_zero_width_characters_are_removed() -> None:
    # "invoice_\u202efdp.exe" shows as "invoice_exe.pdf" in a terminal that does bidi
    assert clean("invoice_\u202efdp.exe") == "invoice_fdp.exe"
    for ch in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200b\u200d\ufeff\u061c":
        assert clean(f"a{ch}b") == "ab", hex(ord(ch))
    assert clean("\ud800x") == "x"  # a lone surrogate cannot even be printed


def test_breaks_become_one_space() -> None:
    assert clean("line one\nline two") == "line one line two"
    assert clean("a\r\n\r\nb\tc") == "a b c"
    assert clean("a\u2028b\u2029c\x85d") == "a b c d"
    assert clean("\n\nlead") == "lead"
    assert clean("trail\n") == "trail"
    assert clean("two  spaces") == "two  spaces"  # ordinary spaces are kept as they are


def test_plain_text_is_unchanged_and_not_copied() -> None:
    s = "digits:0/3 — naïve 数据 [bold red]x[/]"
    assert clean(s) is s
    assert clean("\u00a0nbsp") == "\u00a0nbsp"  # visible, harmless: kept


def test_truncation() -> None:
    assert clean("x" * 10, 10) == "x" * 10
    assert clean("x" * 11, 10) == "x" * 9 + ELLIPSIS
    assert len(clean("y" * 1_000_000)) == MAX_TEXT
    assert clean("\x1b" * 100 + "abcdef", 4) == "abc" + ELLIPSIS
    assert clean("ab\x1b\x1b", 2) == "ab"  # what is dropped does not count
    assert clean("x" * 50, None) == "x" * 50
    with pytest.raises(ValueError):
        clean("x", 0)


def test_replacement_keeps_one_mark_per_character() -> None:
    assert clean("line one\nline two\x07", None, replacement="\ufffd") == (
        "line one\ufffdline two\ufffd"
    )
    assert clean("a\u202eb", replacement="?") == "a?b"


def test_clean_tree_cleans_every_string_and_leaves_the_rest() -> None:
    model = b"\x1b[2J\x00binary"
    tree = {
        "k\x1b[1m": ["v\x07", {"deep": ("t\n",)}, 1, 2.5, True, None, model],
        "data": model,
        3: "int key",
    }
    out = clean_tree(tree)
    assert out == {
        "k[1m": ["v", {"deep": ["t"]}, 1, 2.5, True, None, model],
        "data": model,
        3: "int key",
    }
    assert out["data"] is model
    assert clean_tree("x" * 10, 5) == "xxxx" + ELLIPSIS
    assert clean_tree(7) == 7


def test_shown_is_bounded_and_clean() -> None:
    assert shown("abc") == "'abc'"
    assert shown(1.5) == "1.5" and shown(None) == "None"
    big = shown("x" * 1_000_000)
    assert len(big) <= 60 and big.endswith(ELLIPSIS)
    assert len(shown(["y" * 1000] * 100_000)) <= 60
    assert len(shown({"k" * 1000: ["v"] * 1000})) <= 60
    assert len(shown(list(range(10**6)))) <= 60
    esc = shown("\x1b]0;pwned\x07")
    assert "\x1b" not in esc and "\\x1b" in esc  # repr shows it escaped
    assert len(shown("z" * 500, 200)) == 200

    class Broken:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert shown(Broken()) == "<Broken>"


_UNSAFE = {"Cc", "Cf", "Cs"}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.integers(min_value=1, max_value=200))
def test_clean_output_is_safe_and_bounded(s: str, limit: int) -> None:
    out = clean(s, limit)
    assert len(out) <= limit
    assert not any(unicodedata.category(c) in _UNSAFE for c in out)
    assert clean(out, limit) == out  # cleaning is idempotent


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(categories=["L", "N", "P", "S"]), max_size=100))
def test_clean_keeps_ordinary_text(s: str) -> None:
    assert clean(s) == s


_tree = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _strings(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


@settings(max_examples=200, deadline=None)
@given(_tree, st.integers(min_value=1, max_value=50))
def test_clean_tree_leaves_no_unsafe_string(tree: object, limit: int) -> None:
    for s in _strings(clean_tree(tree, limit)):
        assert len(s) <= limit
        assert not any(unicodedata.category(c) in _UNSAFE for c in s)


@settings(max_examples=200, deadline=None)
@given(_tree)
def test_shown_is_always_short_and_safe(value: object) -> None:
    out = shown(value)
    assert len(out) <= 60
    assert not any(unicodedata.category(c) in _UNSAFE for c in out)
