"""Peer text is data, never markup: what participants and coordinators write reaches
fedctl's lines and tables, the dashboard's model and the protocol's errors as literal,
cleaned, bounded text. No sockets here (tests/test_hostile_e2e.py has the real processes).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from rich.color import ColorSystem
from rich.console import Console
from typer.testing import CliRunner

import fedctl.cli as cli_mod
from fedctl import output
from fedctl.client import ClientEvent
from fedctl.render import session_line, summary_lines
from protocol import messages
from protocol.envelope import open_frame, seal
from protocol.errors import DecodeError, FednodeError, ValidationError
from protocol.identity import Identity
from tui.state import DashboardState, describe

MARKUP = "[/] [bold red]x[/] [link=http://evil]click[/link]"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\here\x1b]8;;\x1b\\\x1b[31m\x9b1m"
HOSTILE = f"{MARKUP} {ESCAPES}\u202eevil\n"
PEER = "12D3KooWQVsrDgbA12sQVgA7zfm4F6rjAU4boHnH9owEfvoEPbmE"
SGR = re.compile(r"\x1b\[[0-9;]*m")  # the colours fedctl's own styles produce


def no_foreign_escapes(out: str) -> None:
    """Only fedctl's own colour codes may be in the output; the peer's are gone."""
    rest = SGR.sub("", out)
    assert "\x1b" not in rest, repr(rest[:300])
    assert "\x07" not in out and "\x9b" not in out and "\u202e" not in out


def colour_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=400)


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """fedctl's stdout and stderr consoles as a wide colour terminal writing to one buffer."""
    buf = io.StringIO()
    for console in (output.stdout, output.stderr):
        monkeypatch.setattr(console, "_file", buf)
        monkeypatch.setattr(console, "_force_terminal", True)
        monkeypatch.setattr(console, "_color_system", ColorSystem.STANDARD)
        monkeypatch.setattr(console, "_width", 400)
    yield buf


# --- fedctl: live lines --------------------------------------------------------------


def test_task_error_line_shows_the_participants_words_literally() -> None:
    data = {"round": 3, "peer_id": PEER, "code": "E[/]\x1b[2J", "message": HOSTILE}
    line = session_line("task_error", data, 5)
    assert line is not None
    assert line.plain.startswith(f"  …{PEER[-6:]} could not do round 3: E[/][2J: ")
    assert MARKUP in line.plain
    console = colour_console()
    console.print(line)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    no_foreign_escapes(out)
    assert MARKUP in SGR.sub("", out)


def test_every_line_with_peer_text_prints_it_literally() -> None:
    events = [
        ("alert", {"change": "raised", "severity": "critical", "message": HOSTILE}),
        ("alert", {"change": "resolved", "id": 1, "alert_type": HOSTILE, "severity": "x"}),
        ("round_failed", {"round": 2, "status": "failed", "reason": HOSTILE}),
        ("session", {"status": "failed", "error": HOSTILE}),
        ("session", {"status": HOSTILE}),
        ("action", {"action": "pause", "reason": HOSTILE, "peer_id": PEER}),
        ("participant", {"peer_id": HOSTILE, "online": True}),
        ("task_error", {"round": 1, "peer_id": PEER, "code": HOSTILE, "message": HOSTILE}),
    ]
    console = colour_console()
    for kind, data in events:
        line = session_line(kind, data, 3)
        assert line is not None, kind
        console.print(line)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    no_foreign_escapes(out)
    assert SGR.sub("", out).count("[bold red]x[/]") >= 6


def test_peer_text_in_a_line_is_bounded() -> None:
    line = session_line("alert", {"change": "raised", "severity": "low", "message": "x" * 10**6}, 1)
    assert line is not None and len(line.plain) < 400


def test_malformed_and_unknown_events_never_raise() -> None:
    odd: list[tuple[str, Any]] = [
        ("round_started", {"round": 1, "selected": 5}),
        ("round_completed", {"round": "x"}),
        ("update_received", {}),
        ("task_error", {"round": 1}),
        ("quality", {"round": 1, "health_score": "high"}),
        ("alert", {"severity": ["x"]}),
        ("participant", {}),
        (HOSTILE, {"anything": HOSTILE}),
        ("brand_new_kind", {}),
    ]
    for kind, data in odd:
        line = session_line(kind, data, 3)
        if line is not None:
            assert "\x1b" not in line.plain


def test_summary_prints_names_literally() -> None:
    s = {
        "session_id": "s-0123456789ab",
        "status": "failed",
        "rounds_completed": 1,
        "participants": 1,
        "strategy": MARKUP,
        "secure_aggregation": False,
        "history": [
            {"round": 1, "accuracy": 0.5, "loss": 1.0, "participants": 1, "duration_s": 1.0}
        ],
        "final_accuracy": None,
        "final_loss": None,
        "dropped": 0,
        "duration_s": 1.0,
        "bytes_up": 1,
        "bytes_down": 1,
        "model_cid": HOSTILE,
        "ledger": ESCAPES,
    }
    console = colour_console()
    for renderable in summary_lines(s):
        console.print(renderable)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    no_foreign_escapes(out)
    assert SGR.sub("", out).count(MARKUP) == 2


# --- fedctl: the commands, against a scripted coordinator ------------------------------

REPLIES: dict[str, dict[str, Any]] = {
    "participants.list": {
        "participants": [
            {
                "peer_id": PEER,
                "dataset": HOSTILE,
                "online": True,
                "status": MARKUP,
                "quality_score": 91.0,
                "uptime": 99.0,
                "latency_ms": 2.0,
                "rounds_completed": 3,
                "last_seen": 1e30,  # not a time: shown as nothing, never a traceback
            }
        ]
    },
    "alerts.list": {
        "alerts": [
            {
                "id": 1,
                "severity": MARKUP,
                "alert_type": MARKUP,
                "entity_id": PEER,
                "status": "open",
                "created_at": 1_700_000_000.0,
                "message": HOSTILE,
            }
        ]
    },
    "session.list": {
        "sessions": [
            {
                "session_id": "s-0123456789ab",
                "name": HOSTILE,
                "status": MARKUP,
                "round": 1,
                "rounds": 2,
                "participants": 1,
                "accuracy": None,
            }
        ]
    },
    "model.list": {
        "models": [
            {
                "round": 1,
                "cid": HOSTILE,
                "parent_cid": "bafkparent",
                "accuracy": 0.5,
                "size": 10,
                "status": MARKUP,
            }
        ]
    },
    "quality.session": {"rounds": [], "health_score": None},
}


@pytest.mark.parametrize(
    "args",
    [
        ["participants", "list"],
        ["alerts", "list"],
        ["session", "list"],
        ["model", "list", "s-0123456789ab"],
        ["quality", "session", "s-0123456789ab"],
    ],
)
def test_tables_show_peer_text_literally(
    args: list[str], terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_mod, "call", lambda target, op, **kw: REPLIES[op])
    result = CliRunner().invoke(cli_mod.app, args)
    assert result.exit_code == 0, (result.output, result.exception, terminal.getvalue())
    out = terminal.getvalue()
    no_foreign_escapes(out)
    if args[0] != "quality":
        assert "[bold red]x[/]" in SGR.sub("", out)


def test_participants_table_has_the_dataset_column(
    terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_mod, "call", lambda target, op, **kw: REPLIES[op])
    assert CliRunner().invoke(cli_mod.app, ["participants", "list"]).exit_code == 0
    out = SGR.sub("", terminal.getvalue())
    assert "dataset" in out.splitlines()[1]
    assert f"{MARKUP} [2J]0;pwned" in out


def test_coordinator_errors_print_literally(
    terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(target: Any, op: str, **kw: Any) -> dict[str, Any]:
        raise FednodeError(HOSTILE, code="X[/]", hint=MARKUP)

    monkeypatch.setattr(cli_mod, "call", refuse)
    result = CliRunner().invoke(cli_mod.app, ["session", "list"])
    assert result.exit_code == 1
    out = terminal.getvalue()
    no_foreign_escapes(out)
    plain = SGR.sub("", out)
    assert "error X[/]: [/] [bold red]x[/]" in plain and f"hint: {MARKUP}" in plain


class FakeClient:
    """Just enough of AdminClient for `session watch`: a snapshot, then scripted events."""

    def __init__(self, events: list[ClientEvent]) -> None:
        self._events = events

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        summary = {
            "session_id": "s-0123456789ab",
            "status": "failed" if op == "session.status" else "running",
            "rounds_completed": 0,
            "rounds": 2,
            "participants": 1,
            "strategy": "fedavg",
            "secure_aggregation": False,
            "history": [],
            "final_accuracy": None,
            "final_loss": None,
            "dropped": 0,
            "duration_s": 1.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "model_cid": None,
            "ledger": "/x",
        }
        return {"snapshot": {"session": summary}} if op == "subscribe" else summary

    async def stream(self) -> Any:
        for ev in self._events:
            yield ev


def test_watch_prints_hostile_events_and_ends(
    terminal: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = "s-0123456789ab"
    events = [
        ClientEvent("round_started", sid, 1.0, {"round": 1, "selected": [PEER]}),
        ClientEvent(
            "task_error", sid, 2.0, {"round": 1, "peer_id": PEER, "code": "E", "message": HOSTILE}
        ),
        ClientEvent("never_heard_of", sid, 3.0, {"x": HOSTILE}),
        ClientEvent("round_completed", sid, 4.0, {"round": "?"}),  # malformed
        ClientEvent("session", sid, 5.0, {"status": "failed", "error": HOSTILE}),
    ]

    @asynccontextmanager
    async def fake(target: Any) -> Any:
        yield FakeClient(events)

    monkeypatch.setattr(cli_mod, "AdminClient", fake)
    result = CliRunner().invoke(cli_mod.app, ["session", "watch", sid])
    assert result.exit_code == 0, (result.exception, terminal.getvalue())
    out = terminal.getvalue()
    no_foreign_escapes(out)
    plain = SGR.sub("", out)
    assert f"…{PEER[-6:]} could not do round 1: E: {MARKUP}" in plain
    assert f"session failed: {MARKUP}" in plain


# --- the dashboard's model -------------------------------------------------------------


def test_describe_task_error_and_hostile_kinds() -> None:
    line, level = describe(
        "task_error", {"round": 3, "peer_id": PEER, "code": "E\x1b[2J", "message": HOSTILE}
    )
    assert level == "bad"
    assert line.startswith(f"…{PEER[-8:]} could not do round 3: E[2J: {MARKUP}")
    assert "\x1b" not in line and len(line) < 700
    assert describe("round_started", {"selected": 5})[1] == "warn"  # malformed, no raise
    text, _ = describe(HOSTILE, {})
    assert "\x1b" not in text


def test_state_cleans_everything_it_is_given() -> None:
    s = DashboardState()
    s.apply_snapshot(
        {
            "sessions": [{"session_id": "s-1", "name": HOSTILE, "status": "running"}],
            "participants": [{"peer_id": PEER, "dataset": HOSTILE, "online": True}],
            "alerts": [
                {"id": 1, "severity": "critical", "message": HOSTILE, "alert_type": ESCAPES}
            ],
            "events": [{"ts": 1.0, "kind": "security", "data": {"message": HOSTILE}}],
        }
    )
    s.apply_status({"session_id": "s-1", "strategy": HOSTILE, "history": []})
    s.apply_event("task_error", "s-1", 2.0, {"round": 1, "peer_id": PEER, "message": HOSTILE})
    s.apply_event("session", "s-1", 3.0, {"status": "failed", "error": HOSTILE})
    s.apply_event("round_started", "s-1", 4.0, {"round": 1, "selected": 7})  # malformed
    s.apply_event(ESCAPES, "s-1", 5.0, {"data": ESCAPES})
    texts = [
        s.sessions["s-1"].name,
        s.sessions["s-1"].error,
        s.participants[PEER].dataset,
        s.alerts[1].message,
        s.alerts[1].alert_type,
        s.details["s-1"].strategy,
        *(e.text for e in s.events),
        *(e.kind for e in s.events),
    ]
    for t in texts:
        assert not any(c in t for c in "\x1b\x07\x9b\u202e\n"), repr(t)
    assert MARKUP in s.alerts[1].message and MARKUP in s.participants[PEER].dataset
    assert len(s.events) == 5  # the malformed and the unknown event are logged too


# --- protocol --------------------------------------------------------------------------


def _frame(type_: str, session: str = "") -> tuple[bytes, Identity]:
    alice = Identity.generate()
    frame = seal(
        alice, channel=b"\x00" * 32, type=type_, seq=1, payload={}, ts=1.0, session=session
    )
    return frame, alice


@pytest.mark.parametrize(
    ("type_", "session"),
    [
        ("x" * 200_000, ""),
        ("a" * 33, ""),
        ("[bold red]x[/]", ""),
        ("register\x1b[2J", ""),
        ("Register", ""),
        ("heartbeat", "s-" + "y" * 200_000),
        ("heartbeat", "s-1\x1b]0;pwned\x07"),
        ("heartbeat", "[/]"),
    ],
    ids=[
        "long-type",
        "type-33",
        "markup-type",
        "esc-type",
        "upper-type",
        "long-session",
        "esc-session",
        "markup-session",
    ],
)
def test_envelope_refuses_types_and_sessions_that_are_not_identifiers(
    type_: str, session: str
) -> None:
    frame, alice = _frame(type_, session)
    with pytest.raises(DecodeError) as exc:
        open_frame(
            frame,
            channel=b"\x00" * 32,
            sender_peer_id=alice.peer_id,
            sender_public_key=alice.public_key,
        )
    assert exc.value.code == "BAD_FRAME"
    assert len(exc.value.message) < 300
    assert "\x1b" not in exc.value.message and "\x07" not in exc.value.message


def test_envelope_keeps_well_formed_unknown_types_for_the_parser() -> None:
    frame, alice = _frame("launch_missiles", "s-0123456789ab")
    env = open_frame(
        frame,
        channel=b"\x00" * 32,
        sender_peer_id=alice.peer_id,
        sender_public_key=alice.public_key,
    )
    with pytest.raises(ValidationError) as exc:
        messages.parse(env.type, env.payload)
    assert exc.value.code == "UNKNOWN_TYPE" and "launch_missiles" in exc.value.message


def test_impostor_sender_is_quoted_briefly() -> None:
    alice = Identity.generate()

    class Claimant:  # signs with alice's key, claims to be a 100,000-character sender
        peer_id = "[/]\x1b[2J" + "x" * 100_000
        sign = staticmethod(alice.sign)

    liar: Any = Claimant()
    frame = seal(liar, channel=b"\x00" * 32, type="fetch", seq=1, payload={}, ts=1.0)
    with pytest.raises(FednodeError) as exc:
        open_frame(
            frame, channel=b"\x00" * 32, sender_peer_id="someone-else", sender_public_key=b""
        )
    assert exc.value.code == "BAD_SIGNATURE" and len(exc.value.message) < 300
    assert "\x1b" not in exc.value.message


def test_parse_cleans_every_string() -> None:
    msg = messages.parse(
        "task_error", {"round": 1, "code": "E\x1b[2J", "message": HOSTILE + "x" * 3000}
    )
    assert isinstance(msg, messages.TaskError)
    assert msg.code == "E[2J"
    assert msg.message.startswith(f"{MARKUP} [2J]0;pwned]8;;http://evil\\here")
    assert "\x1b" not in msg.message and "\u202e" not in msg.message
    adm = messages.parse("admitted", {"sessions": ["s-1\x1b[2J"]})
    assert isinstance(adm, messages.Admitted) and adm.sessions == ["s-1[2J"]
    reg = messages.parse("register", {"dataset": HOSTILE, "num_examples": 1, "version": "1\x07"})
    assert isinstance(reg, messages.Register)
    assert "\x1b" not in reg.dataset and MARKUP in reg.dataset and reg.version == "1"


def test_parse_errors_quote_values_briefly() -> None:
    for payload in (
        {"round": "x" * 1_000_000, "code": "c", "message": "m"},
        {"round": ["\x1b[2J"] * 100_000, "code": "c", "message": "m"},
    ):
        with pytest.raises(ValidationError) as exc:
            messages.parse("task_error", payload)
        assert len(exc.value.message) < 300 and "\x1b" not in exc.value.message
    extra = {f"k{i}" + "z" * 10_000: 1 for i in range(1000)}
    with pytest.raises(ValidationError) as exc:
        messages.parse("fetch", {"cid": "x", **extra})
    assert len(exc.value.message) < 300 and "1000 unknown field(s)" in exc.value.message
    with pytest.raises(ValidationError, match="unknown field"):  # keys of any type
        messages.parse("fetch", {"cid": "x", 1: 2, b"b": 3, "s": 4})  # type: ignore[dict-item]
    with pytest.raises(ValidationError) as exc:
        messages.parse("launch_" + "m" * 10_000, {})
    assert exc.value.code == "UNKNOWN_TYPE" and len(exc.value.message) < 300


REPORT = {"rows": 10, "missing": 0, "duplicates": 1, "label_counts": {"0": 5, "1": 5}}


def _register(report: Any) -> messages.Message:
    return messages.parse(
        "register", {"dataset": "d", "num_examples": 10, "version": "v", "data_report": report}
    )


def test_data_report_of_the_right_shape_is_accepted() -> None:
    reg = _register(REPORT)
    assert isinstance(reg, messages.Register) and reg.data_report == REPORT
    assert _register({}).data_report == {}  # type: ignore[attr-defined]
    odd = _register({**REPORT, "label_counts": {"a\x1b[2J": 1}})
    assert odd.data_report["label_counts"] == {"a[2J": 1}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "report",
    [
        {**REPORT, "extra": 1},
        {"rows": 1},
        {**REPORT, "rows": -1},
        {**REPORT, "rows": True},
        {**REPORT, "missing": 1.5},
        {**REPORT, "duplicates": "x" * 100_000},
        {**REPORT, "label_counts": [1, 2]},
        {**REPORT, "label_counts": {str(i): 1 for i in range(1001)}},
        {**REPORT, "label_counts": {"x" * 65: 1}},
        {**REPORT, "label_counts": {"a": -1}},
        {**REPORT, "label_counts": {"a": {"nested": 1}}},
        {**REPORT, "label_counts": {"a\x07": 1, "a": 2}},  # the same label once cleaned
        {"x" * 100_000: 1},
    ],
)
def test_data_report_bombs_are_refused(report: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as exc:
        _register(report)
    assert "register.data_report" in exc.value.message
    assert len(exc.value.message) < 300


def test_a_handshake_refusal_is_cleaned_and_bounded() -> None:
    """A peer that refuses the handshake chooses the code, message and hint that end up in
    the refused node's log and in fedctl's error line: cleaned and cut like any peer text."""
    from protocol.envelope import encode
    from protocol.handshake import raise_if_refusal

    frame = encode(
        {"hs": "error", "code": ESCAPES * 20, "message": HOSTILE * 5000, "hint": MARKUP * 900}
    )
    with pytest.raises(FednodeError) as got:
        raise_if_refusal(frame)
    err = got.value
    for s in (err.message, err.hint or "", err.code):
        assert "\x1b" not in s and "\x07" not in s and "\x9b" not in s and "\u202e" not in s
    assert len(err.message) < 700 and len(err.hint or "") <= 500 and len(err.code) <= 64


def test_a_malformed_reply_is_a_bad_reply_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A coordinator's reply that lacks a field the human output reads, or has it of the
    wrong type, ends fedctl with BAD_REPLY (exit 1) and a short, cleaned message."""
    import typer

    from fednode import output as conventions  # fedctl.output re-exports it (fednode.api)

    buf = io.StringIO()
    monkeypatch.setattr(conventions, "stderr", Console(file=buf, width=200, color_system=None))

    def table(reply: dict[str, Any]) -> None:
        for row in reply["sessions"]:  # the reply below has no such list
            print(row)

    with pytest.raises(typer.Exit) as done:
        output.run(False, lambda: {"sessions": 5, "x": HOSTILE}, table)
    assert done.value.exit_code == 1
    err = buf.getvalue()
    assert "BAD_REPLY" in err and "malformed" in err and "\x1b" not in err
