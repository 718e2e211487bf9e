"""Schema 3 of the ledger (quality metrics, alerts, participant tasks) on real SQLite files."""

from __future__ import annotations

import json
import math
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

from fednode import ledger as ledger_mod
from fednode.ledger import (
    PARTICIPANT_QUALITY_COLUMNS,
    SESSION_QUALITY_COLUMNS,
    Ledger,
)
from protocol.errors import NotFound, StateError


@pytest.fixture
def led(tmp_path: Path):
    with Ledger(tmp_path / "node" / "ledger.db") as ledger:
        yield ledger


def _session(led: Ledger, sid: str = "s1") -> None:
    led.create_session(
        sid,
        name="digits-mlp",
        spec={},
        strategy="fedavg",
        secure_aggregation=False,
        rounds=3,
        created_at=1.0,
    )


def _cond(
    alert_type: str = "uptime",
    entity_id: str = "pA",
    value: float | None = 72.0,
    severity: str = "critical",
    **kw: Any,
) -> dict[str, Any]:
    return {
        "alert_type": alert_type,
        "severity": severity,
        "entity_id": entity_id,
        "message": f"{alert_type} {value} is under the limit",
        "value": value,
        "threshold": 90.0,
        "session_id": "s1",
        **kw,
    }


def _counts(led: Ledger) -> tuple[int, int]:
    alerts = led.db.execute("SELECT COUNT(*) FROM quality_alerts").fetchone()[0]
    events = led.db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    return alerts, events


def _kinds(led: Ledger) -> list[str]:
    return [e["kind"] for e in led.events()]


# --- migration ----------------------------------------------------------------------------


def test_schema_2_file_migrates_to_3(tmp_path: Path) -> None:
    """A ledger written by the previous release opens, gains the tables, keeps its rows."""
    path = tmp_path / "old.db"
    db = Database(path)
    db.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for version, migration in ((1, ledger_mod._m001_initial), (2, ledger_mod._m002_admission)):
        with db.atomic():
            migration(db)
            db["schema_migrations"].insert({"version": version, "applied_at": 0.0})
    db["participants"].insert(
        {"peer_id": "pOld", "first_seen": 1.0, "last_seen": 2.0, "rounds_completed": 4}
    )
    db.close()

    with Ledger(path) as led:
        assert led.schema_version == len(ledger_mod.MIGRATIONS) >= 3
        tables = set(led.db.table_names())
        assert {
            "participant_quality_metrics",
            "session_quality_metrics",
            "network_quality_metrics",
            "quality_alerts",
            "participant_tasks",
        } <= tables
        old = led.get_participant("pOld")
        assert old["rounds_completed"] == 4 and old["last_seen"] == 2.0
        assert old["quality_score"] is None and old["uptime"] is None
        assert old["excluded"] is False
        cols = {c.name for c in led.db["participant_quality_metrics"].columns}
        assert cols == {"id", "peer_id", "session_id", "ts", *PARTICIPANT_QUALITY_COLUMNS}
        cols = {c.name for c in led.db["session_quality_metrics"].columns}
        assert cols == {"id", "session_id", "round", "ts", *SESSION_QUALITY_COLUMNS}
        # The new participant columns are settable through the usual path.
        led.upsert_participant("pOld", excluded=True, quality_score=55.0)
        assert led.get_participant("pOld")["excluded"] is True
    with Ledger(path) as led:  # and reopening runs nothing again
        versions = [r["version"] for r in led.db.query("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(ledger_mod.MIGRATIONS) + 1))


def test_exact_column_names(led: Ledger) -> None:
    pqm = [c.name for c in led.db["participant_quality_metrics"].columns]
    assert pqm == [
        "id",
        "peer_id",
        "session_id",
        "ts",
        "training_time_ms",
        "tasks_selected",
        "tasks_completed",
        "tasks_failed",
        "model_quality",
        "data_quality",
        "uptime",
        "heartbeat_consistency",
        "latency_ms",
        "bandwidth_mbps",
        "disconnects",
        "cpu_efficiency",
        "memory_efficiency",
        "security_violations",
        "task_completion_rate",
        "error_rate",
        "connection_stability",
        "performance_score",
        "reliability_score",
        "network_score",
        "resource_score",
        "overall_score",
        "trend",
    ]
    sqm = [c.name for c in led.db["session_quality_metrics"].columns]
    assert sqm == [
        "id",
        "session_id",
        "round",
        "ts",
        "convergence_rate",
        "convergence_score",
        "model_stability",
        "accuracy_improvement",
        "participant_retention",
        "data_integrity",
        "network_efficiency",
        "privacy_compliance",
        "security_score",
        "participant_quality",
        "convergence",
        "health_score",
    ]
    alerts = [c.name for c in led.db["quality_alerts"].columns]
    assert alerts == [
        "id",
        "alert_type",
        "severity",
        "entity_id",
        "session_id",
        "message",
        "value",
        "threshold",
        "source",
        "status",
        "created_at",
        "updated_at",
        "resolved_at",
        "acknowledged_at",
        "acknowledged_by",
    ]


# --- participant quality ------------------------------------------------------------------


def _pq(overall: float, **kw: Any) -> dict[str, Any]:
    return {
        "training_time_ms": 1200.0,
        "tasks_selected": 4,
        "tasks_completed": 3,
        "tasks_failed": 1,
        "uptime": 97.5,
        "task_completion_rate": 75.0,
        "error_rate": 25.0,
        "overall_score": overall,
        "trend": "stable",
        **kw,
    }


def test_record_participant_quality_row_and_peer_columns(led: Ledger) -> None:
    led.upsert_participant("pA", online=True)
    row = led.record_participant_quality("pA", "s1", 10.0, _pq(81.5))
    assert row["id"] >= 1 and row["peer_id"] == "pA" and row["session_id"] == "s1"
    assert row["ts"] == 10.0 and row["overall_score"] == 81.5 and row["trend"] == "stable"
    assert type(row["tasks_selected"]) is int and row["tasks_selected"] == 4
    assert row["disconnects"] == 0 and row["security_violations"] == 0  # counts default to 0
    assert row["latency_ms"] is None and row["model_quality"] is None  # not measured
    json.dumps(row)
    peer = led.get_participant("pA")
    assert peer["quality_score"] == 81.5 and peer["uptime"] == 97.5

    # Not measured this time: the peer keeps its last measured uptime.
    led.record_participant_quality("pA", "s1", 11.0, {"overall_score": 60.0})
    peer = led.get_participant("pA")
    assert peer["quality_score"] == 60.0 and peer["uptime"] == 97.5

    # An unknown peer is fine (no participants row to update, none created).
    led.record_participant_quality("pGhost", None, 12.0, {"overall_score": 1.0})
    with pytest.raises(NotFound):
        led.get_participant("pGhost")


def test_numpy_scalars_are_plain_values(led: Ledger) -> None:
    np = pytest.importorskip("numpy")
    row = led.record_participant_quality(
        "pA", "s1", 1.0, {"overall_score": np.float32(70.5), "tasks_selected": np.int64(3)}
    )
    assert type(row["overall_score"]) is float and row["overall_score"] == 70.5
    assert type(row["tasks_selected"]) is int


@pytest.mark.parametrize(
    ("metrics", "match"),
    [
        ({"overall": 1.0, "uptime_pct": 2.0}, r"\['overall', 'uptime_pct'\].*known columns"),
        ({"overall_score": math.nan}, "overall_score.*JSON"),
        ({"uptime": math.inf}, "uptime.*JSON"),
        ({"latency_ms": "12"}, "latency_ms must be a number"),
        ({"tasks_selected": 1.5}, "tasks_selected must be an integer"),
        ({"tasks_failed": None}, "tasks_failed is required"),
        ({"disconnects": -1}, "disconnects is -1"),
        ({"trend": "up"}, "trend 'up' not in"),
    ],
)
def test_record_participant_quality_refuses(led: Ledger, metrics: dict, match: str) -> None:
    led.upsert_participant("pA")
    with pytest.raises(ValueError, match=match):
        led.record_participant_quality("pA", "s1", 1.0, metrics)
    assert led.participant_quality() == []
    assert led.get_participant("pA")["quality_score"] is None


def test_unknown_metric_message_lists_known_columns(led: Ledger) -> None:
    with pytest.raises(ValueError) as exc:
        led.record_participant_quality("pA", "s1", 1.0, {"bogus": 1})
    assert "bogus" in str(exc.value)
    assert all(col in str(exc.value) for col in PARTICIPANT_QUALITY_COLUMNS)


def test_participant_quality_filters_and_latest(led: Ledger) -> None:
    led.record_participant_quality("pA", "s1", 1.0, {"overall_score": 10.0})
    led.record_participant_quality("pB", "s1", 2.0, {"overall_score": 20.0})
    led.record_participant_quality("pA", "s1", 3.0, {"overall_score": 30.0})
    led.record_participant_quality("pA", "s2", 4.0, {"overall_score": 40.0})
    led.record_participant_quality("pB", "s1", 2.0, {"overall_score": 21.0})  # same ts, later id

    assert [r["overall_score"] for r in led.participant_quality()] == [40.0, 30.0, 21.0, 20.0, 10.0]
    assert [r["overall_score"] for r in led.participant_quality(peer_id="pA")] == [40, 30, 10]
    assert [r["overall_score"] for r in led.participant_quality(session_id="s1")] == [
        30.0,
        21.0,
        20.0,
        10.0,
    ]
    assert [r["overall_score"] for r in led.participant_quality(peer_id="pA", session_id="s1")] == [
        30.0,
        10.0,
    ]
    assert len(led.participant_quality(limit=2)) == 2

    latest = led.latest_participant_quality()
    assert set(latest) == {"pA", "pB"}
    assert latest["pA"]["overall_score"] == 40.0 and latest["pB"]["overall_score"] == 21.0
    assert "_rank" not in latest["pA"]
    in_s1 = led.latest_participant_quality("s1")
    assert in_s1["pA"]["overall_score"] == 30.0 and in_s1["pA"]["session_id"] == "s1"
    assert led.latest_participant_quality("nope") == {}


# --- session quality ----------------------------------------------------------------------


def test_session_quality(led: Ledger) -> None:
    _session(led)
    led.record_session_quality("s1", 2, 20.0, {"health_score": 80.0, "convergence_rate": 2})
    r1 = led.record_session_quality("s1", 1, 10.0, {"health_score": 70.0})
    assert r1["round"] == 1 and r1["health_score"] == 70.0 and r1["convergence_rate"] is None
    assert [r["round"] for r in led.session_quality("s1")] == [1, 2]
    # The same round again replaces its figures: one row per round.
    again = led.record_session_quality("s1", 2, 25.0, {"health_score": 85.0})
    rows = led.session_quality("s1")
    assert len(rows) == 2 and rows[1] == again
    assert again["health_score"] == 85.0 and again["ts"] == 25.0
    assert again["convergence_rate"] is None  # replaced, not merged
    assert (
        type(led.record_session_quality("s1", 3, 1.0, {"convergence_rate": 3})["convergence_rate"])
        is int
    )
    assert led.session_quality("other") == []


def test_session_quality_refuses(led: Ledger) -> None:
    with pytest.raises(NotFound):
        led.record_session_quality("nope", 1, 1.0, {"health_score": 1.0})
    _session(led)
    with pytest.raises(ValueError, match=r"health\b.*known columns"):
        led.record_session_quality("s1", 1, 1.0, {"health": 1.0})
    with pytest.raises(ValueError, match="JSON"):
        led.record_session_quality("s1", 1, 1.0, {"health_score": math.nan})
    assert led.session_quality("s1") == []


# --- network ------------------------------------------------------------------------------


def test_record_network_bandwidth(led: Ledger) -> None:
    ping = led.record_network("pA", "s1", 1.0, "ping", rtt_ms=12.5)
    assert ping["rtt_ms"] == 12.5 and ping["bandwidth_mbps"] is None and ping["bytes"] is None
    down = led.record_network("pA", "s1", 2.0, "down", bytes=5_000_000, transfer_s=2.0)
    assert down["bandwidth_mbps"] == pytest.approx(20.0)  # 40 Mbit in 2 s
    assert type(down["bytes"]) is int
    up = led.record_network("pA", None, 3.0, "up", bytes=1000, transfer_s=0.0)
    assert up["bandwidth_mbps"] is None  # no time measured: no bandwidth
    only_bytes = led.record_network("pA", "s1", 4.0, "up", bytes=1000)
    assert only_bytes["bandwidth_mbps"] is None
    with pytest.raises(ValueError, match="direction"):
        led.record_network("pA", "s1", 5.0, "sideways")
    with pytest.raises(ValueError, match="rtt_ms"):
        led.record_network("pA", "s1", 5.0, "ping", rtt_ms=math.nan)
    with pytest.raises(ValueError, match="bytes"):
        led.record_network("pA", "s1", 5.0, "up", bytes=-1, transfer_s=1.0)


def test_network_metrics_filters(led: Ledger) -> None:
    led.record_network("pA", "s1", 1.0, "ping", rtt_ms=10.0)
    led.record_network("pA", "s1", 2.0, "down", bytes=100, transfer_s=1.0)
    led.record_network("pA", "s1", 3.0, "ping", rtt_ms=30.0)
    led.record_network("pB", "s1", 3.0, "ping", rtt_ms=99.0)
    assert [r["ts"] for r in led.network_metrics("pA")] == [1.0, 2.0, 3.0]
    assert [r["rtt_ms"] for r in led.network_metrics("pA", direction="ping")] == [10.0, 30.0]
    assert [r["ts"] for r in led.network_metrics("pA", since=2.0)] == [2.0, 3.0]
    assert led.network_metrics("pC") == []
    with pytest.raises(ValueError):
        led.network_metrics("pA", direction="both")


# --- rule alerts --------------------------------------------------------------------------


def test_sync_raises_dedups_and_resolves(led: Ledger) -> None:
    out = led.sync_alerts(["pA", "pB"], [_cond("uptime", "pA", 72.0)], now=10.0)
    assert out["resolved"] == []
    (a,) = out["raised"]
    assert a["status"] == "open" and a["source"] == "rule" and a["value"] == 72.0
    assert a["created_at"] == a["updated_at"] == 10.0 and a["resolved_at"] is None
    assert a["session_id"] == "s1" and a["severity"] == "critical"

    # Same condition again: one row, updated figures, no new event.
    out = led.sync_alerts(["pA", "pB"], [_cond("uptime", "pA", 60.0)], now=20.0)
    assert out == {"raised": [], "resolved": []}
    rows = led.alerts()
    assert len(rows) == 1 and rows[0]["id"] == a["id"]
    assert rows[0]["value"] == 60.0 and rows[0]["updated_at"] == 20.0
    assert rows[0]["created_at"] == 10.0 and rows[0]["message"] == "uptime 60.0 is under the limit"
    assert _kinds(led) == ["alert_raised"]

    # The condition disappears for an evaluated entity: resolved.
    out = led.sync_alerts(["pA", "pB"], [], now=30.0)
    (r,) = out["resolved"]
    assert r["id"] == a["id"] and r["status"] == "resolved" and r["resolved_at"] == 30.0
    assert led.alerts() == []
    assert led.alerts("resolved")[0]["id"] == a["id"]
    assert _kinds(led) == ["alert_raised", "alert_resolved"]

    # It comes back: a new alert, the resolved one stays resolved.
    out = led.sync_alerts(["pA"], [_cond("uptime", "pA", 50.0)], now=40.0)
    assert out["raised"][0]["id"] != a["id"]
    assert len(led.alerts("all")) == 2


def test_sync_same_condition_twice_in_one_call(led: Ledger) -> None:
    out = led.sync_alerts(["pA"], [_cond(value=80.0), _cond(value=70.0)], now=1.0)
    assert len(out["raised"]) == 1 and out["raised"][0]["value"] == 70.0
    assert len(led.alerts("all")) == 1
    assert _kinds(led) == ["alert_raised"]


def test_sync_resolves_only_evaluated_entities_and_rule_alerts(led: Ledger) -> None:
    led.sync_alerts(
        ["pA", "pB", "s1"],
        [
            _cond("uptime", "pA"),
            _cond("latency", "pA", 900.0, severity="medium"),
            _cond("uptime", "pB"),
            _cond("anomaly", "s1", 30.0, severity="medium"),
        ],
        now=1.0,
    )
    ev = led.raise_event_alert("security_violation", "critical", "pA", "s1", "bad sig", 2.0)
    # Only pA was evaluated this time, and only its latency still holds.
    out = led.sync_alerts(["pA"], [_cond("latency", "pA", 800.0, severity="medium")], now=3.0)
    assert [(r["alert_type"], r["entity_id"]) for r in out["resolved"]] == [("uptime", "pA")]
    active = {(r["alert_type"], r["entity_id"]) for r in led.alerts()}
    assert active == {
        ("latency", "pA"),
        ("uptime", "pB"),  # not evaluated: kept
        ("anomaly", "s1"),
        ("security_violation", "pA"),  # event alerts are never auto-resolved
    }
    # Even evaluated with no condition at all, the event alert stays.
    led.sync_alerts(["pA", "pB", "s1"], [], now=4.0)
    assert [r["id"] for r in led.alerts()] == [ev["id"]]


def test_sync_condition_for_unevaluated_entity_is_still_raised(led: Ledger) -> None:
    out = led.sync_alerts([], [_cond("uptime", "pZ")], now=1.0)
    assert out["raised"][0]["entity_id"] == "pZ"


def test_sync_accepts_objects_with_to_dict(led: Ledger) -> None:
    class Cond:
        def to_dict(self) -> dict[str, Any]:
            return _cond("heartbeat", "pA", 70.0, severity="medium")

    out = led.sync_alerts(["pA"], [Cond()], now=1.0)
    assert out["raised"][0]["alert_type"] == "heartbeat"


def test_ack_semantics(led: Ledger) -> None:
    (a,) = led.sync_alerts(["pA"], [_cond()], now=1.0)["raised"]
    acked = led.ack_alert(a["id"], "op-peer", now=2.0)
    assert acked["status"] == "acknowledged"
    assert acked["acknowledged_by"] == "op-peer" and acked["acknowledged_at"] == 2.0

    # Acknowledging twice is fine and changes nothing (no second event).
    assert led.ack_alert(a["id"], "someone-else", now=3.0) == acked

    # The condition persists: the alert stays acknowledged, nothing is raised again.
    out = led.sync_alerts(["pA"], [_cond(value=50.0)], now=4.0)
    assert out == {"raised": [], "resolved": []}
    (row,) = led.alerts()
    assert row["status"] == "acknowledged" and row["value"] == 50.0
    assert led.alerts("open") == [] and led.alerts("acknowledged")[0]["id"] == a["id"]

    # The condition clears: resolved.
    out = led.sync_alerts(["pA"], [], now=5.0)
    assert out["resolved"][0]["id"] == a["id"]
    assert out["resolved"][0]["acknowledged_by"] == "op-peer"

    # A resolved alert cannot be acknowledged; an unknown id is NotFound.
    with pytest.raises(StateError) as exc:
        led.ack_alert(a["id"], "op-peer", now=6.0)
    assert exc.value.code == "ALERT_RESOLVED"
    with pytest.raises(NotFound):
        led.ack_alert(9999, "op-peer", now=6.0)
    assert _kinds(led) == ["alert_raised", "alert_acked", "alert_resolved"]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"colour": "red"}, r"\['colour'\].*known"),
        ({"value": math.nan}, "value.*JSON"),
        ({"threshold": math.inf}, "threshold.*JSON"),
        ({"value": {1, 2}}, "value must be a number"),
        ({"severity": "urgent"}, "severity 'urgent'"),
        ({"alert_type": "mood"}, "alert_type 'mood'"),
        ({"entity_id": ""}, "entity_id"),
    ],
)
def test_sync_bad_condition_writes_nothing(led: Ledger, bad: dict, match: str) -> None:
    (a,) = led.sync_alerts(["pA"], [_cond("uptime", "pA")], now=1.0)["raised"]
    before = _counts(led)
    conditions = [_cond("latency", "pB", severity="medium"), {**_cond("uptime", "pC"), **bad}]
    with pytest.raises(ValueError, match=match):
        # pA would also be resolved, pB raised: none of it may happen.
        led.sync_alerts(["pA", "pB", "pC"], conditions, now=2.0)
    assert _counts(led) == before
    assert led.alerts()[0] == a
    assert not led.db.conn.in_transaction
    assert led.verify_chain() == (True, None)


def test_sync_missing_required_key(led: Ledger) -> None:
    cond = _cond()
    del cond["message"]
    with pytest.raises(ValueError, match="message"):
        led.sync_alerts(["pA"], [cond], now=1.0)
    with pytest.raises(ValueError, match="one string"):
        led.sync_alerts("pA", [], now=1.0)


def test_sync_failure_midway_rolls_back_alert_and_event(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the first alert and its event were written undoes both."""
    (a,) = led.sync_alerts(["pA"], [_cond("uptime", "pA")], now=1.0)["raised"]
    before = _counts(led)
    real_append = Ledger.append_event
    calls: list[str] = []

    def flaky(self: Ledger, kind: str, **kw: Any) -> dict[str, Any]:
        calls.append(kind)
        if len(calls) == 2:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return real_append(self, kind, **kw)

    monkeypatch.setattr(Ledger, "append_event", flaky)
    with pytest.raises(sqlite3.OperationalError):
        led.sync_alerts(["pA", "pB"], [_cond("uptime", "pB"), _cond("latency", "pB")], now=2.0)
    assert calls == ["alert_raised", "alert_raised"]  # the first one did get written...
    assert _counts(led) == before  # ...and was rolled back with the rest
    assert [r["id"] for r in led.alerts("all")] == [a["id"]]
    assert led.alerts()[0]["status"] == "open"  # pA's resolution was not committed either
    assert not led.db.conn.in_transaction
    monkeypatch.undo()
    led.sync_alerts(["pA", "pB"], [_cond("uptime", "pB")], now=3.0)
    assert led.verify_chain() == (True, None)


def test_ack_failure_rolls_back_state(led: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    (a,) = led.sync_alerts(["pA"], [_cond()], now=1.0)["raised"]

    def broken(self: Ledger, kind: str, **kw: Any) -> dict[str, Any]:
        raise sqlite3.OperationalError("simulated")

    monkeypatch.setattr(Ledger, "append_event", broken)
    with pytest.raises(sqlite3.OperationalError):
        led.ack_alert(a["id"], "op", now=2.0)
    assert led.alerts()[0]["status"] == "open"


# --- event alerts -------------------------------------------------------------------------


def test_raise_event_alert(led: Ledger) -> None:
    a = led.raise_event_alert("security_violation", "critical", "pEvil", "s1", "bad sig", 1.0)
    assert a["source"] == "event" and a["status"] == "open" and a["value"] == 1.0
    assert a["session_id"] == "s1" and a["threshold"] is None
    # A repeat while open updates it and counts occurrences.
    b = led.raise_event_alert("security_violation", "critical", "pEvil", "s1", "replay", 2.0)
    assert b["id"] == a["id"] and b["message"] == "replay" and b["value"] == 2.0
    assert b["updated_at"] == 2.0 and b["created_at"] == 1.0
    # Another session (or none) is another alert.
    c = led.raise_event_alert("security_violation", "critical", "pEvil", None, "x", 3.0)
    d = led.raise_event_alert("security_violation", "critical", "pEvil", None, "y", 4.0)
    assert c["id"] != a["id"] and d["id"] == c["id"]
    # After an ack, a new occurrence is visible as a new open alert.
    led.ack_alert(a["id"], "op", 5.0)
    e = led.raise_event_alert("security_violation", "critical", "pEvil", "s1", "again", 6.0)
    assert e["id"] not in (a["id"], c["id"]) and e["status"] == "open"
    assert _kinds(led) == ["alert_raised", "alert_raised", "alert_acked", "alert_raised"]
    with pytest.raises(ValueError, match="alert_type"):
        led.raise_event_alert("uptime", "critical", "pEvil", None, "x", 7.0)
    with pytest.raises(ValueError, match="severity"):
        led.raise_event_alert("security_violation", "severe", "pEvil", None, "x", 7.0)


# --- listing ------------------------------------------------------------------------------


def test_alerts_filters(led: Ledger) -> None:
    led.sync_alerts(
        ["pA", "pB"],
        [_cond("uptime", "pA"), _cond("latency", "pB", severity="medium", session_id="s2")],
        now=1.0,
    )
    low = led.sync_alerts(["pC"], [_cond("resource_efficiency", "pC", severity="low")], now=2.0)[
        "raised"
    ][0]
    ev = led.raise_event_alert("security_violation", "critical", "pB", None, "bad", 3.0)
    led.ack_alert(low["id"], "op", 4.0)
    led.sync_alerts(["pA"], [], now=5.0)  # resolves pA's uptime

    def key(rows: list[dict]) -> list[tuple[str, str]]:
        return [(r["alert_type"], r["entity_id"]) for r in rows]

    # Newest first.
    assert key(led.alerts()) == [
        ("security_violation", "pB"),
        ("resource_efficiency", "pC"),
        ("latency", "pB"),
    ]
    assert key(led.alerts("all")) == [*key(led.alerts()), ("uptime", "pA")]
    assert key(led.alerts(None)) == key(led.alerts("all"))
    assert key(led.alerts("open")) == [("security_violation", "pB"), ("latency", "pB")]
    assert key(led.alerts("acknowledged")) == [("resource_efficiency", "pC")]
    assert key(led.alerts("resolved")) == [("uptime", "pA")]
    assert key(led.alerts(severity={"critical"})) == [("security_violation", "pB")]
    assert key(led.alerts("all", severity={"critical", "low"})) == [
        ("security_violation", "pB"),
        ("resource_efficiency", "pC"),
        ("uptime", "pA"),
    ]
    assert key(led.alerts(severity="medium")) == [("latency", "pB")]
    assert led.alerts(severity=set()) == []
    assert key(led.alerts(entity_id="pB")) == [("security_violation", "pB"), ("latency", "pB")]
    assert key(led.alerts("all", session_id="s1")) == [
        ("resource_efficiency", "pC"),
        ("uptime", "pA"),
    ]
    assert key(led.alerts(session_id="s2")) == [("latency", "pB")]
    assert [r["id"] for r in led.alerts("all", limit=1)] == [ev["id"]]
    with pytest.raises(ValueError, match="status"):
        led.alerts("closed")
    with pytest.raises(ValueError, match="severity"):
        led.alerts(severity={"urgent"})
    rows = led.alerts("all")
    json.dumps(rows)
    assert all(isinstance(r["id"], int) and isinstance(r["created_at"], float) for r in rows)


def test_open_alert_entities(led: Ledger) -> None:
    assert led.open_alert_entities() == set()
    led.sync_alerts(
        ["pA", "pB", "pC"],
        [
            _cond("uptime", "pA"),
            _cond("task_completion", "pA"),
            _cond("uptime", "pB"),
            _cond("latency", "pC", severity="medium"),
        ],
        now=1.0,
    )
    led.raise_event_alert("security_violation", "critical", "pD", None, "bad", 2.0)
    assert led.open_alert_entities() == {"pA", "pB", "pD"}
    assert led.open_alert_entities("medium") == {"pC"}
    pb = led.alerts(entity_id="pB")[0]
    led.ack_alert(pb["id"], "op", 3.0)
    assert "pB" in led.open_alert_entities()  # acknowledged is still active
    led.sync_alerts(["pB"], [], now=4.0)
    assert led.open_alert_entities() == {"pA", "pD"}
    with pytest.raises(ValueError):
        led.open_alert_entities("fatal")


# --- hash chain ---------------------------------------------------------------------------


def test_alert_events_keep_chain_and_edit_is_detected(led: Ledger) -> None:
    led.append_event("session_created", session_id="s1", data={}, ts=0.5)
    (a,) = led.sync_alerts(["pA"], [_cond()], now=1.0)["raised"]
    led.ack_alert(a["id"], "op", now=2.0)
    led.sync_alerts(["pA"], [], now=3.0)
    led.raise_event_alert("security_violation", "critical", "pA", "s1", "bad", 4.0)
    assert led.verify_chain() == (True, None)

    events = led.events()
    assert [e["kind"] for e in events] == [
        "session_created",
        "alert_raised",
        "alert_acked",
        "alert_resolved",
        "alert_raised",
    ]
    raised = events[1]
    assert raised["entity_id"] == "pA" and raised["session_id"] == "s1" and raised["ts"] == 1.0
    assert raised["data"] == a  # data = the alert row as raised
    assert events[3]["data"]["status"] == "resolved"

    data = dict(events[2]["data"], acknowledged_by="someone-else")
    led.db.execute(
        "UPDATE events SET data = ? WHERE id = ?",
        (ledger_mod.canonical_json(data), events[2]["id"]),
    )
    assert led.verify_chain() == (False, events[2]["id"])


def test_alerts_and_chain_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        led.sync_alerts(["pA"], [_cond()], now=1.0)
    with Ledger(path) as led:
        assert led.alerts()[0]["entity_id"] == "pA"
        led.sync_alerts(["pA"], [], now=2.0)
        assert led.verify_chain() == (True, None)
        assert _kinds(led) == ["alert_raised", "alert_resolved"]


# --- participant tasks --------------------------------------------------------------------


def _start(led: Ledger, sid: str = "s1", rnd: int = 1) -> int:
    return led.record_task_start(
        sid,
        rnd,
        coordinator="12D3KooWcoord",
        model_cid="bafy-model",
        deadline_s=60.0,
        secure=True,
        asked_at=100.0,
    )


def test_task_start_and_finish(led: Ledger) -> None:
    t1 = _start(led)
    assert isinstance(t1, int)
    (row,) = led.tasks()
    assert row["status"] == "running" and row["secure"] is True
    assert (
        row["finished_at"] is None and row["loss"] is None and row["coordinator"] == "12D3KooWcoord"
    )

    done = led.finish_task(
        t1,
        status="done",
        finished_at=103.0,
        train_s=2.5,
        total_s=3.0,
        samples=600,
        loss=0.42,
        bytes_up=4096,
        bytes_down=8192,
    )
    assert done["status"] == "done" and done["samples"] == 600 and done["loss"] == 0.42
    assert done["total_s"] == 3.0 and done["bytes_down"] == 8192 and done["error"] is None
    assert done["model_cid"] == "bafy-model" and done["deadline_s"] == 60.0

    t2 = _start(led, rnd=2)
    failed = led.finish_task(t2, status="failed", finished_at=110.0, error="deadline passed")
    assert failed["status"] == "failed" and failed["error"] == "deadline passed"
    assert failed["samples"] is None

    t3 = _start(led, sid="s2")
    assert [t["id"] for t in led.tasks()] == [t1, t2, t3]
    assert [t["round"] for t in led.tasks("s1")] == [1, 2]
    assert [t["id"] for t in led.tasks("s2")] == [t3]
    assert led.tasks("none") == []


def test_task_finish_rules(led: Ledger) -> None:
    t = _start(led)
    with pytest.raises(NotFound):
        led.finish_task(t + 100, status="done", finished_at=1.0)
    with pytest.raises(ValueError, match="status"):
        led.finish_task(t, status="running", finished_at=1.0)
    with pytest.raises(ValueError, match="loss"):
        led.finish_task(t, status="done", finished_at=1.0, loss=math.nan)
    assert led.tasks()[0]["status"] == "running"  # nothing half-written
    led.finish_task(t, status="done", finished_at=1.0)
    with pytest.raises(StateError, match="already done"):
        led.finish_task(t, status="failed", finished_at=2.0)
    with pytest.raises(ValueError, match="round"):
        led.record_task_start(
            "s1",
            -1,
            coordinator="c",
            model_cid=None,
            deadline_s=None,
            secure=False,
            asked_at=1.0,
        )


# --- what the monitor judges a session by, summed in SQL ------------------------------------


def _history(led: Ledger, rounds: int, per_round: int) -> None:
    """Session s1 with ``rounds`` rounds: all completed but the last two (one failed, one
    running), ``per_round`` updates each (one in five rejected), a rollback to round 2, two
    security-violation alerts and a central-DP release in round 2."""
    _session(led)
    led.record_model(
        "s1", 0, cid="c0", parent_cid=None, accuracy=0.1, loss=2.0, size=10, created_at=1.0
    )
    for r in range(1, rounds + 1):
        peers = [f"p{i}" for i in range(per_round)]
        led.start_round("s1", r, selected=peers, model_cid_in=f"c{r - 1}", started_at=r)
        led.record_updates(
            [
                Ledger.update_values(
                    "s1",
                    r,
                    participant=p,
                    samples=10,
                    loss=0.5,
                    bytes=100,
                    duration_s=0.1,
                    arrival_s=0.1,
                    update_cid=None,
                    status="rejected" if i % 5 == 4 else "accepted",
                    received_at=r,
                    dp={"dp_epsilon": 0.5 * r},
                )
                for i, p in enumerate(peers)
            ]
        )
        if r == rounds - 1:
            led.finish_round("s1", r, status="failed", ended_at=r + 0.5, bytes_up=7)
        elif r < rounds - 1:
            led.complete_round(
                "s1",
                r,
                ended_at=r + 0.5,
                model_cid=f"c{r}",
                accuracy=0.1 + r / 100,
                loss=1.0,
                size=10,
                participants=per_round - per_round // 5,
                bytes_up=1000 * r,
                bytes_down=10 * r,
            )
    led.rollback_models("s1", 2, now=99.0, data={"by": "op"})
    for i in range(2):
        led.raise_event_alert("security_violation", "critical", f"p{i}", "s1", "bad frame", 50.0)
    release = {
        "round": 2,
        "noise_multiplier": 1.0,
        "planned_noise_multiplier": 1.0,
        "clip_norm": 1.0,
        "sample_rate": 0.5,
        "selected": 3,
        "eligible": 6,
        "updates": 3,
        "noise_std": 0.1,
        "secure": False,
        "share_count": None,
        "epsilon": 1.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "recorded_at": 3.0,
    }
    led.record_central_dp("s1", release)


def test_observation_figures_sum_what_every_row_says(led: Ledger) -> None:
    """The monitor's per-round figures, summed in SQL, equal what reading every row of the
    session (as it did) gives."""
    _history(led, rounds=6, per_round=5)
    rounds = led.rounds("s1")
    finished = [r for r in rounds if r["status"] != "running"]
    completed = [r for r in finished if r["status"] == "completed"]
    updates = led.updates("s1")
    alerts = led.alerts(status="all", session_id="s1")
    want = {
        "accuracies": [
            m["accuracy"]
            for m in led.models("s1")
            if m["accuracy"] is not None and m.get("rolled_back_at") is None
        ],
        "rounds_run": len(finished),
        "completed": len(completed),
        "last_completed": completed[-1]["round"],
        "first_selected": rounds[0]["selected"],
        "bytes_moved": sum(r["bytes_up"] + r["bytes_down"] for r in finished),
        "participants_completed": sum(r["participants"] for r in completed),
        "updates_accepted": sum(u["status"] == "accepted" for u in updates),
        "updates_rejected": sum(u["status"] == "rejected" for u in updates),
        "noisy_rounds": 1,
        "security_violations": sum(a["alert_type"] == "security_violation" for a in alerts),
    }
    got = led.observation_figures("s1")
    assert got == want
    assert got["accuracies"] == pytest.approx([0.1, 0.11, 0.12])  # rounds 3, 4 rolled back
    assert (got["rounds_run"], got["completed"], got["security_violations"]) == (5, 4, 2)
    assert led.completed_rounds_after("s1", 2) == [3, 4]
    assert led.accepted_in_round("s1", 3) == [(f"p{i}", 1.5) for i in range(4)]


def test_observation_figures_do_not_grow_with_the_sessions_history(led: Ledger) -> None:
    """20,000 update rows: the figures allocate under 256 KiB at their peak (reading the
    session's rows as dicts, as the monitor did each round, took about 2 KiB a row)."""
    _history(led, rounds=200, per_round=100)
    tracemalloc.start()
    try:
        led.observation_figures("s1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"peak {peak / 1024:.0f} KiB"
