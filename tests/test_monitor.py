"""The quality monitor on its own: a real Ledger on tmp_path, no coordinator, no network.

It decides and returns Actions (the coordinator applies them); what it observes between
rounds stays in memory, so heartbeats, pings and quiet evaluations run no SQL at all.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from fednode.ledger import Ledger
from fednode.monitor import Action, QualityMonitor
from fednode.quality import SLA

SID = "s1"


@pytest.fixture
def led(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "node" / "ledger.db") as ledger:
        yield ledger


def _monitor(led: Ledger) -> QualityMonitor:
    return QualityMonitor(led, SLA(), heartbeat_s=1.0)


def _session(led: Ledger) -> None:
    led.create_session(
        SID,
        name="digits-mlp",
        spec={},
        strategy="fedavg",
        secure_aggregation=False,
        rounds=9,
        created_at=1.0,
    )


def _round(led: Ledger, number: int, peer: str, *, update: bool, task_error: str = "") -> None:
    """A finished round that selected ``peer``: it delivered, or sent a task_error."""
    led.start_round(SID, number, selected=[peer], model_cid_in="bafy", started_at=float(number))
    if update:
        led.record_update(
            SID,
            number,
            participant=peer,
            samples=10,
            loss=0.5,
            bytes=100,
            duration_s=0.1,
            arrival_s=0.2,
            update_cid="bafyu",
            received_at=number + 0.5,
        )
    if task_error:
        data = {"round": number, "peer_id": peer, "code": task_error, "message": "no"}
        led.append_event("task_error", session_id=SID, entity_id=peer, data=data)
    led.finish_round(SID, number, status="failed", ended_at=number + 0.9)


def test_a_critical_alert_returns_an_exclude_action(led: Ledger) -> None:
    """A peer offline 80 % of its window: the evaluation raises the critical uptime alert and
    asks for the peer to be left out, naming the alert; the ledger is untouched otherwise."""
    mon = _monitor(led)
    now = time.time()
    mon.on_connect("pA", now - 100, {})
    mon.on_disconnect("pA", now - 90)
    mon.on_connect("pA", now - 10, {})
    mon.on_connect("pB", now - 100, {})
    for t in range(100, -1, -1):
        mon.on_heartbeat("pB", now - t, None, None)

    actions = mon.tick()

    (alert,) = led.alerts(status="open", severity={"critical"})
    assert alert["alert_type"] == "uptime" and alert["entity_id"] == "pA"
    assert actions == [Action("exclude_peer", alert["message"], None, "pA", alert["id"])]
    assert mon.excluded() == {"pA"}
    # The same conditions again: nothing new to do (an alert is raised once).
    before = led.alerts(status="all")
    assert mon.tick() == []
    assert led.alerts(status="all") == before


def test_a_security_violation_returns_alert_and_pause_actions(led: Ledger) -> None:
    mon = _monitor(led)
    statements: list[str] = []
    led.db.conn.set_trace_callback(statements.append)
    actions = mon.on_security_violation("pA", "BAD_SIGNATURE", "bad sig", ["s1", "s2"])
    msg = "security violation by pA: BAD_SIGNATURE: bad sig"
    why = "security violation by pA (BAD_SIGNATURE)"
    assert actions == [
        Action("raise_alert", msg, "s1", "pA", None, "security_violation"),
        Action("pause_session", why, "s1", "pA"),
        Action("raise_alert", msg, "s2", "pA", None, "security_violation"),
        Action("pause_session", why, "s2", "pA"),
    ]
    # In no running session: the alert alone, with no session.
    assert mon.on_security_violation("pA", "REPLAY", "old", []) == [
        Action("raise_alert", "security violation by pA: REPLAY: old", None, "pA", None,
               "security_violation"),
    ]  # fmt: skip
    assert statements == []  # deciding writes nothing: the coordinator applies it
    assert mon.peers["pA"].security_violations == 2


def test_no_sql_per_heartbeat_ping_or_quiet_evaluation(led: Ledger) -> None:
    mon = _monitor(led)
    now = time.time()
    for pid in ("pA", "pB"):
        mon.on_connect(pid, now, {})
    mon.tick()  # the first evaluation of a peer syncs its alerts (resolves stale ones)
    statements: list[str] = []
    led.db.conn.set_trace_callback(statements.append)
    n = 50
    for _ in range(n):
        for pid in ("pA", "pB"):
            t = time.time()
            mon.on_heartbeat(pid, t, 80.0, 70.0)
            mon.on_ping(pid, t, 3.0, SID)
        assert mon.tick() == []
    assert statements == []
    # The pings were kept, and are written together when the figures are flushed.
    mon.flush()
    led.db.conn.set_trace_callback(None)
    assert len(statements) > 0
    assert [r["rtt_ms"] for r in led.network_metrics("pA", direction="ping")] == [3.0] * n


def test_task_outcomes_start_from_the_ledger_and_continue_in_memory(led: Ledger) -> None:
    """A decline for the participant's own limits (LIMIT_*) is not counted at all; a training
    deadline or silence counts as a failed task, an accepted update as a completed one."""
    _session(led)
    _round(led, 1, "pA", update=True)
    _round(led, 2, "pA", update=False, task_error="LIMIT_PARAMS")
    _round(led, 3, "pA", update=False, task_error="TRAIN_DEADLINE")
    assert led.recent_task_outcomes("pA", 20) == [
        (SID, 1, "completed"),
        (SID, 2, "declined"),
        (SID, 3, "failed"),
    ]
    assert led.recent_task_outcomes("pA", 1) == [(SID, 3, "failed")]
    assert led.recent_task_outcomes("pZ", 20) == []

    mon = _monitor(led)
    mon.on_connect("pA", time.time(), {})
    assert mon.observation("pA", time.time()).tasks_selected == 2
    statements: list[str] = []
    led.db.conn.set_trace_callback(statements.append)
    mon.on_task_error("pA", SID, 4, "LIMIT_MEMORY")
    mon._tasks_ended(SID, 4, ["pA"])
    mon.on_task_error("pA", SID, 5, "TRAIN_DEADLINE")
    mon._tasks_ended(SID, 5, ["pA"])
    mon.peers["pA"].answered.add((SID, 6))  # as on_update records an accepted update
    mon._tasks_ended(SID, 6, ["pA"])
    assert statements == []
    obs = mon.observation("pA", time.time())
    assert (obs.tasks_selected, obs.tasks_completed, obs.tasks_failed) == (4, 2, 2)
    assert not mon.peers["pA"].answered and not mon.peers["pA"].declined


def test_session_observation_does_not_grow_with_the_sessions_history(led: Ledger) -> None:
    """After each round the monitor judges the session from SQL sums: with 200 rounds and
    20,000 update rows its peak allocation stays under 256 KiB (it read every update row of
    the session as a dict, about 2 KiB each: the soak's RSS growth, docs/scale.md), and a
    local-DP session's compliance is judged a round at a time, once."""
    from tests.test_ledger_quality import _history

    _history(led, rounds=200, per_round=100)
    mon = _monitor(led)
    privacy = {"mode": "local_dp", "target_epsilon": 10.0}
    run = SimpleNamespace(
        session_id="s1",
        shapes={"w": (10,)},
        spec={"aggregation": {"secure": False}, "privacy": privacy},
    )
    first = mon.session_observation(run, {}, None)  # type: ignore[arg-type]
    tracemalloc.start()
    try:
        again = mon.session_observation(run, {}, None)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, f"peak {peak / 1024:.0f} KiB"
    assert again == first
    # rounds 1-198 completed; each contributor reported ε = 0.5·round: within 10 up to 20
    assert (first.rounds_run, first.rounds_privacy_ok) == (199, 20)
    assert first.updates_accepted == 200 * 80 and first.updates_rejected_integrity == 200 * 20
    assert first.last_contributors == sorted(f"p{i}" for i in range(100) if i % 5 != 4)
    assert first.bytes_ideal == 2 * 40 * 198 * 80 and first.security_violations == 2
