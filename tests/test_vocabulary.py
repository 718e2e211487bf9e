"""The shared words of protocol/: every event kind the node writes is known, the parser never
raises, the lifecycle and alert tables agree with themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from protocol import alerts, events, lifecycle, operations
from protocol.errors import StateError

ROOT = Path(__file__).resolve().parent.parent
EMITTERS = {"record", "publish", "append_event", "_alert_event"}


def emitted_kinds() -> dict[str, str]:
    """Every literal event kind fednode/ passes to record/publish/append_event, with where."""
    out: dict[str, str] = {}
    for path in sorted((ROOT / "fednode").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            args = node.args[1:] if name == "write" else node.args
            if name == "write" and node.args:  # guard.write(ledger.append_event, "kind", …)
                f = node.args[0]
                name = f.attr if isinstance(f, ast.Attribute) else ""
            literal = args[0].value if args and isinstance(args[0], ast.Constant) else None
            if name in EMITTERS and isinstance(literal, str):
                out[literal] = f"{path.relative_to(ROOT)}:{node.lineno}"
    return out


def test_every_kind_the_node_writes_is_in_the_vocabulary() -> None:
    kinds = emitted_kinds()
    assert {"session", "round_completed", "alert", "security"} <= set(kinds)  # the walk works
    unknown = {k: where for k, where in kinds.items() if k not in events.KINDS}
    assert not unknown, f"event kinds written but not in protocol/events.py: {unknown}"


def test_parse_event_types_cuts_and_never_raises() -> None:
    e = events.parse_event("round_started", {"round": 2, "selected": ["a"], "new_field": 1})
    assert e == events.RoundStarted(round=2, selected=["a"])
    bad = events.parse_event("round_started", {"round": 2, "selected": 5})
    assert isinstance(bad, events.MalformedEvent) and "selected" in bad.reason
    missing = events.parse_event("task_error", {"round": 1})
    assert isinstance(missing, events.MalformedEvent) and "peer_id" in missing.reason
    long = events.parse_event("alert", {"message": "x\x1b[2J" * 10**5})
    assert isinstance(long, events.Alert) and "\x1b" not in long.message
    assert len(long.message) <= 4096
    for kind, data in [
        ("brand_new", {}),
        (5, {}),
        (None, None),
        ("session", [1]),
        ("x" * 10**6, 1),
    ]:
        assert isinstance(
            events.parse_event(kind, data), events.UnknownEvent | events.MalformedEvent
        )
    assert {"alert", "alert_raised", "alert_resolved", "alert_acked"} == events.ALERT_KINDS


def test_lifecycle_rules() -> None:
    S = lifecycle.SessionState
    assert lifecycle.next_state(S.CREATED, "start") is S.RUNNING
    assert lifecycle.next_state(S.PAUSED, "stop") is S.STOPPED
    with pytest.raises(StateError, match="cannot resume a session that is running"):
        lifecycle.next_state(S.RUNNING, "resume")
    assert lifecycle.allowed_actions("running") == {"pause", "stop"}
    assert lifecycle.allowed_actions("completed") == frozenset()
    assert lifecycle.allowed_actions("nonsense") == frozenset()
    assert lifecycle.is_terminal("stopped") and not lifecycle.is_terminal(["stopped"])
    assert {"completed", "failed", "aborted", "rejected"} == lifecycle.FINISHED_ROUND_STATUSES


def test_alert_and_operation_tables() -> None:
    assert set(alerts.ALERT_SEVERITY.values()) <= set(alerts.SEVERITIES)
    assert alerts.SEVERITIES[0] == "critical" and alerts.severity_rank("low") == 3
    assert alerts.severity_rank("made-up") == alerts.severity_rank(None) == 4
    assert alerts.RULE_ALERT_TYPES | alerts.EVENT_ALERT_TYPES == alerts.ALERT_TYPES
    assert set(operations.OPERATIONS) == set(operations.Op)
    assert set(operations.Op) > operations.READ_OPS
    assert operations.lifecycle_op("pause") == "session.pause"
