"""The dashboard's model on its own: a snapshot, then events, give the right picture.

No Textual here: these are the rules the screens rely on (who is late, what a completed
round adds, what each alert change does), checked on plain dataclasses.
"""

from __future__ import annotations

from typing import Any

import pytest

from tui.app import backoff_delays
from tui.fake import NOW, PEERS, SESSION, sample_snapshot, sample_statuses
from tui.state import EVENTS_KEPT, DashboardState, short


def loaded() -> DashboardState:
    s = DashboardState()
    s.apply_snapshot(sample_snapshot())
    s.apply_status(sample_statuses()[SESSION])
    return s


def ev(s: DashboardState, kind: str, data: dict[str, Any], sid: str = SESSION, dt: float = 0):
    return s.apply_event(kind, sid, NOW + dt, data)


def test_snapshot_fills_every_part() -> None:
    s = loaded()
    assert list(s.sessions) == [SESSION, "s-91c04e7a2b10", "s-0b7d55e2c8a3"]
    run = s.sessions[SESSION]
    assert (run.status, run.round, run.rounds, run.participants) == ("running", 5, 10, 4)
    assert set(s.participants) == set(PEERS)
    assert s.participants[PEERS[0]].last_round is not None
    assert s.participants[PEERS[0]].last_round.round == 6
    assert not s.participants[PEERS[4]].online
    assert [a.id for a in s.alerts_sorted()] == [7, 6, 5, 4]  # critical first
    assert len(s.events) == len(sample_snapshot()["events"])
    det = s.details[SESSION]
    assert [p.round for p in det.points()] == [1, 2, 3, 4, 5]
    assert det.current is not None and det.current.round == 6
    assert det.current.deadline_s == 60.0 and det.current.started_at == NOW - 14.2


def test_who_is_late_and_how_long_the_round_has_run() -> None:
    s = loaded()
    assert s.late(SESSION) == PEERS[2:4]  # selected, nothing received yet
    assert s.round_state(SESSION, PEERS[0]) == "trained"
    assert s.round_state(SESSION, PEERS[2]) == "late"
    assert s.round_state(SESSION, PEERS[4]) == ""  # not selected this round
    cur = s.details[SESSION].current
    assert cur is not None and cur.elapsed(NOW) == pytest.approx(14.2)

    c = ev(s, "update_received", {"round": 6, "participant": PEERS[2], "received": 3})
    assert c.rounds == {SESSION} and c.participants == {PEERS[2]}
    assert c.events == []  # per-update events stay out of the log
    assert s.late(SESSION) == [PEERS[3]]
    p = s.participants[PEERS[2]].last_round
    assert p is not None and (p.round, p.at) == (6, NOW)
    # a stale update of another round changes nobody's lateness in this one
    ev(s, "update_received", {"round": 5, "participant": PEERS[3]})
    assert s.late(SESSION) == []  # round 5 replaced what we knew: a new, partial round


def test_round_started_then_completed_adds_one_point() -> None:
    s = loaded()
    c = ev(s, "round_started", {"round": 7, "selected": PEERS[:3], "model_cid": "bafk1"})
    assert c.rounds == {SESSION} and not c.history
    cur = s.details[SESSION].current
    assert cur is not None and (cur.round, cur.phase, cur.started_at) == (7, "training", NOW)
    assert cur.deadline_s == 60.0  # the deadline carries over from the status
    assert not c.fetch
    fresh = DashboardState()
    fresh.apply_snapshot(sample_snapshot())  # no status loaded: the deadline is unknown
    c = ev(fresh, "round_started", {"round": 7, "selected": PEERS[:3]})
    assert c.fetch == {SESSION}  # so the worker asks session.status for it
    c = ev(fresh, "round_started", {"round": 8, "selected": PEERS[:3], "deadline_s": 30.0})
    assert not c.fetch and fresh.details[SESSION].current.deadline_s == 30.0  # type: ignore[union-attr]
    assert s.late(SESSION) == PEERS[:3]

    for k, peer in enumerate(PEERS[:3]):
        ev(s, "update_received", {"round": 7, "participant": peer}, dt=k)
    assert s.late(SESSION) == []

    c = ev(
        s,
        "round_completed",
        {"round": 7, "accuracy": 0.951, "loss": 0.12, "participants": PEERS[:3], "dropped": []},
        dt=5,
    )
    assert c.history == {SESSION} and SESSION in c.sessions
    det = s.details[SESSION]
    assert [p.round for p in det.points()] == [1, 2, 3, 4, 5, 7]
    assert det.points()[-1].accuracy == 0.951
    assert det.current is not None and det.current.phase == "done"
    assert s.sessions[SESSION].round == 7 and s.sessions[SESSION].accuracy == 0.951
    assert "accuracy 0.9510" in c.events[0].text and c.events[0].level == "good"
    # the same event twice (a race between a status answer and the stream) adds nothing
    ev(s, "round_completed", {"round": 7, "accuracy": 0.951, "loss": 0.12, "participants": []})
    assert len(s.details[SESSION].history) == 6


def test_history_gains_a_point_per_round_completed() -> None:
    s = DashboardState()
    s.apply_snapshot({"sessions": [], "participants": []})
    for r in range(1, 31):
        ev(s, "round_started", {"round": r, "selected": PEERS[:2]})
        done = {"round": r, "accuracy": r / 40, "loss": 1 / r, "participants": PEERS[:2]}
        ev(s, "round_completed", done)
        assert len(s.details[SESSION].history) == r
    assert s.sessions[SESSION].round == 30
    assert s.sessions[SESSION].participants == 2


def test_round_failed_and_stop_end_the_round() -> None:
    s = loaded()
    ev(s, "round_failed", {"round": 6, "status": "failed", "reason": "2 of 3 updates"})
    assert s.details[SESSION].current is not None
    assert s.details[SESSION].current.phase == "failed"
    assert s.late(SESSION) == []  # nobody is late for a round that is over
    assert s.events[-1].level == "bad"


def test_alert_raised_acknowledged_resolved() -> None:
    s = loaded()
    row = {
        "id": 9,
        "severity": "critical",
        "alert_type": "uptime",
        "entity_id": PEERS[3],
        "session_id": None,
        "message": "uptime 80 % is under 90 %",
        "status": "open",
        "created_at": NOW,
        "updated_at": NOW,
    }
    c = ev(s, "alert", {"change": "raised", **row}, sid="")
    assert c.alerts and PEERS[3] in c.participants
    assert [a.id for a in s.alerts_sorted()][:2] == [9, 7]  # newest critical first
    assert s.events[-1].text.startswith("alert raised: critical uptime")

    ev(s, "alert", {"change": "acknowledged", **row}, sid="")
    assert s.alerts[9].status == "acknowledged"
    ev(s, "alert", {"change": "resolved", **row, "status": "resolved"}, sid="")
    assert 9 not in s.alerts
    # node-wide alerts show on every session; another session's do not
    other = {**row, "id": 10, "session_id": "s-other", "entity_id": "12D3KooWzzz"}
    ev(s, "alert", {"change": "raised", **other}, sid="s-other")
    assert 10 in {a.id for a in s.alerts_sorted()}
    assert 10 not in {a.id for a in s.alerts_sorted(SESSION)}


def test_participant_online_offline_excluded() -> None:
    s = loaded()
    c = ev(s, "participant", {"peer_id": PEERS[0], "online": False}, sid="", dt=3)
    assert c.participants == {PEERS[0]}
    assert not s.participants[PEERS[0]].online
    assert s.participants[PEERS[0]].last_seen == NOW + 3
    ev(s, "participant", {"peer_id": PEERS[0], "online": True}, sid="")
    assert s.participants[PEERS[0]].online
    new = "12D3KooWnewpeer000000000000000000000000000000000"
    ev(s, "participant", {"peer_id": new, "online": True, "dataset": "digits:0/3"}, sid="")
    assert s.participants[new].online and s.participants[new].dataset == "digits:0/3"
    ev(s, "participant", {"peer_id": new, "excluded": True, "reason": "x"}, sid="")
    assert s.participants[new].excluded and s.participants[new].status == "excluded"
    ev(s, "participant", {"peer_id": new, "excluded": False}, sid="")
    assert not s.participants[new].excluded and s.participants[new].status == "active"
    assert s.events[-1].text == f"{short(new)} readmitted"


def test_session_status_changes_and_new_sessions() -> None:
    s = loaded()
    c = ev(s, "session", {"status": "paused", "error": ""})
    assert c.sessions == {SESSION} and not c.fetch
    assert s.sessions[SESSION].status == "paused"
    ev(s, "session", {"status": "running", "error": ""})
    assert s.sessions[SESSION].status == "running"
    c = ev(s, "session", {"status": "created", "name": "fresh"}, sid="s-new")
    assert c.fetch == {"s-new"}  # the worker loads its row (rounds are not in the event)
    assert s.sessions["s-new"].name == "fresh"
    ev(s, "session", {"status": "failed", "error": "INTERNAL: boom"})
    assert s.sessions[SESSION].error == "INTERNAL: boom"


def test_lagged_asks_for_a_new_snapshot_and_snapshot_replaces_all() -> None:
    s = loaded()
    assert ev(s, "lagged", {"dropped": 12}, sid="").resnapshot
    c = s.apply_snapshot({"sessions": [], "participants": [], "alerts": [], "events": []})
    assert c.full
    assert not s.sessions and not s.participants and not s.alerts and not s.details
    assert not s.events


def test_events_ring_keeps_the_last_200() -> None:
    s = DashboardState()
    s.apply_snapshot({})
    for k in range(EVENTS_KEPT + 50):
        ev(s, "participant", {"peer_id": PEERS[k % 5], "online": bool(k % 2)}, sid="", dt=k)
    assert len(s.events) == EVENTS_KEPT
    assert s.events[0].ts == NOW + 50


def test_unknown_events_only_reach_the_log() -> None:
    s = loaded()
    c = ev(s, "something_new", {"x": 1})
    assert c.events[0].text == "something_new" and not c.sessions


def test_backoff_doubles_to_five_seconds() -> None:
    delays = backoff_delays(0.5, 5.0)
    assert [next(delays) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_participants_privacy_spending_shows_beside_its_last_update() -> None:
    from tui.widgets.participants import participant_cells

    s = loaded()
    ev(s, "update_received", {"round": 6, "participant": PEERS[1], "epsilon": 1.234})
    p = s.participants[PEERS[1]]
    assert p.epsilon == 1.234
    assert participant_cells(p, "trained", NOW)[-1][0].endswith("ε 1.23")
    ev(s, "update_received", {"round": 7, "participant": PEERS[1]})  # no DP figure: kept
    assert s.participants[PEERS[1]].epsilon == 1.234
    assert participant_cells(s.participants[PEERS[2]], "", NOW)[-1][0].find("ε") == -1


def test_the_log_names_outliers_left_out_and_central_dp_spending() -> None:
    from tui.state import describe

    text, level = describe("robustness", {"round": 3, "excluded": [PEERS[0]]})
    assert text == f"round 3: left out {short(PEERS[0])} (outliers)" and level == "warn"
    assert describe("robustness", {"round": 4, "excluded": []})[1] == ""
    text, _ = describe("central_dp", {"round": 2, "epsilon": 0.71})
    assert text == "round 2 noisy aggregate (central DP): ε 0.71"
