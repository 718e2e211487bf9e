"""`fedctl session watch` lines: every event kind the coordinator pushes renders or is skipped,
and none raises (a KeyError here would end a watch mid-session)."""

from __future__ import annotations

from typing import Any

from fedctl.render import session_line as rich_line

PEER = "12D3KooWQVsrDgbA12sQVgA7zfm4F6rjAU4boHnH9owEfvoEPbmE"


def session_line(kind: str, data: dict[str, Any], rounds: int) -> str | None:
    """The line's plain text (session_line returns rich Text, so no markup is parsed)."""
    line = rich_line(kind, data, rounds)
    return None if line is None else line.plain


def test_participant_events_of_both_shapes() -> None:
    assert session_line("participant", {"peer_id": PEER, "online": False}, 3).endswith("offline")
    excluded = {"peer_id": PEER, "excluded": True, "reason": "maintenance"}
    assert "excluded by an operator" in session_line("participant", excluded, 3)
    readmitted = {"peer_id": PEER, "excluded": False, "reason": ""}
    assert session_line("participant", readmitted, 3).endswith("readmitted")


def test_alert_action_and_quality_lines() -> None:
    raised = {"change": "raised", "severity": "critical", "message": "uptime 72.0 % is under 90 %"}
    line = session_line("alert", raised, 3)
    assert "critical" in line and "uptime 72.0 %" in line
    resolved = {"change": "resolved", "id": 7, "alert_type": "uptime", "severity": "critical"}
    assert session_line("alert", resolved, 3).endswith("alert 7 uptime resolved")
    action = {"action": "pause", "reason": "security violation by x (BAD_SIGNATURE)"}
    assert "pause" in session_line("action", action, 3)
    assert session_line("quality", {"round": 2, "health_score": 91.23}, 3).endswith("91.2")
    assert session_line("quality", {"round": 2, "health_score": None}, 3) is None
    assert "4 events" in session_line("lagged", {"dropped": 4}, 3)


def test_kinds_without_a_line() -> None:
    for kind in ("secagg", "invite", "anomaly", "sla"):
        assert session_line(kind, {}, 3) is None


def test_a_pause_that_has_taken_effect_says_so() -> None:
    """A ``session`` event with ``idle``: the pause waited for the round in flight (fedctl
    session watch and the dashboard's event log say so)."""
    from tui.state import _describe

    asked = {"status": "paused", "error": ""}
    assert session_line("session", asked, 3) == "session paused"
    took = session_line("session", {**asked, "idle": True}, 3)
    assert took == "session paused (the round in flight has ended)"
    assert _describe("session", {**asked, "idle": True}, 3)[0] == took
    assert _describe("session", asked, 3)[0] == "session paused"
