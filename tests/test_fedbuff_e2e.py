"""FedBuff end to end: real processes on 127.0.0.1, ``[aggregation] mode = "async"``.

The fast test: an async session of two participants makes exactly ``rounds`` model versions,
each of ``buffer_size`` updates, with the staleness figures in its round_completed events.

The slow one (the issue's figure): four participants, one of them about 10x slower
(``--train-delay``); a synchronous session (12 rounds of 4 updates) waits for it every
round, an async one (K = 3) does not, and reaches the synchronous session's final accuracy
(within a point) in less wall time; the figures at equal work (48 updates) are printed too.
docs/strategies.md has the measured figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file

pytestmark = pytest.mark.timeout(300)


def run_session(c: Cluster, spec: Path) -> tuple[str, float, dict[str, Any]]:
    """Create, start and watch a session: its ID, wall time start to end, and its status."""
    sid = create(c, spec)
    started = time.monotonic()
    assert cli_json("session", "start", sid, target=c)["status"] == "running"
    cli("session", "watch", sid, "--json", check=True, target=c, timeout=280)
    wall = time.monotonic() - started
    return sid, wall, cli_json("session", "status", sid, target=c)


def completed_events(c: Cluster, sid: str) -> list[dict[str, Any]]:
    got = rows(
        c.coordinator_home.ledger_path,
        "SELECT data FROM events WHERE session_id = ? AND kind = 'round_completed' ORDER BY id",
        sid,
    )
    return [json.loads(r["data"]) for r in got]


# Versions of the fast test: each aggregation but the last is a chance for the race that
# stopped a contributor's next task (below), which it checks for
VERSIONS = 6


def test_an_async_session_makes_rounds_versions_of_k_updates(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 2)
        spec = spec_file(
            tmp_path,
            "fedbuff",
            rounds=VERSIONS,
            participants=ids,
            min_participants=2,
            training={"local_epochs": 1},
            aggregation={"mode": "async", "buffer_size": 2},
        )
        for k in range(2):
            c.start_participant(k, 2)
        sid, _wall, status = run_session(c, spec)
        assert status["status"] == "completed" and status["rounds_completed"] == VERSIONS, status

        led = c.coordinator_home.ledger_path
        versions = rows(
            led, "SELECT round, parent_cid, cid FROM model_versions WHERE session_id = ?", sid
        )
        assert sorted(v["round"] for v in versions) == list(range(VERSIONS + 1))
        chain = {v["round"]: v for v in versions}
        for r in range(1, VERSIONS + 1):  # one unbroken lineage of versions
            assert chain[r]["parent_cid"] == chain[r - 1]["cid"]
        per_round = rows(
            led,
            "SELECT round, COUNT(*) AS n FROM client_updates WHERE session_id = ? "
            "AND status = 'accepted' GROUP BY round",
            sid,
        )
        assert {r["round"]: r["n"] for r in per_round} == {r: 2 for r in range(1, VERSIONS + 1)}
        events = completed_events(c, sid)
        assert [e["round"] for e in events] == list(range(1, VERSIONS + 1))
        for e in events:
            assert e["mode"] == "async" and e["updates"] == 2
            st = e["staleness"]
            assert len(st["updates"]) == 2 and st["max"] >= 0
            assert all(u["staleness_weight"] == (1 + u["staleness"]) ** -0.5 for u in st["updates"])
        assert events[0]["staleness"]["max"] == 0  # the first version: every update fresh
        # A peer whose update entered the buffer gets its next task while the aggregation is
        # still open (a task of the same number): the aggregation's round_end must not stop
        # it as not needed, or the peer sits out until the task's deadline. Only the tasks
        # still out when the session ended (of its last aggregation) are not needed.
        for home in c.participant_homes:
            tasks = rows(
                home.ledger_path,
                "SELECT round, status FROM participant_tasks WHERE session_id = ? ORDER BY id",
                sid,
            )
            early = [(t["round"], t["status"]) for t in tasks if t["round"] < VERSIONS]
            assert all(st == "done" for _r, st in early), early
    finally:
        c.procs.stop_all()


def accuracy_timeline(c: Cluster, sid: str) -> tuple[float, list[tuple[float, float]]]:
    """(wall time start to end, [(seconds since start, accuracy) of each version])."""
    led = c.coordinator_home.ledger_path
    (s,) = rows(led, "SELECT started_at, ended_at FROM sessions WHERE session_id = ?", sid)
    got = rows(
        led,
        "SELECT ended_at, accuracy FROM training_rounds WHERE session_id = ? "
        "AND status = 'completed' ORDER BY round",
        sid,
    )
    return s["ended_at"] - s["started_at"], [
        (r["ended_at"] - s["started_at"], r["accuracy"]) for r in got
    ]


#: The slow participant's --train-delay: about 10x a fast participant's whole task (fetch,
#: train, upload: ~0.1 s on the 2-core test machine for a quarter of digits, 2 epochs).
SLOW_DELAY_S = 1.0
SYNC_ROUNDS = 12  # x 4 updates = 48 updates
ASYNC_K = 3
EQUAL_WORK = 16  # x 3 updates = 48 updates: the synchronous session's work
# Measured (2 cores): at equal work async is 1 to 2 points short of sync (0.961-0.967
# against 0.975-0.978: the slow participant's quarter of the data is in 1 or 2 of 48
# updates); with 5x the updates, still ~3x sooner, it is within a point (0.972-0.975; with
# 2.5x, 40 versions, 0.964-0.967: too close to the line to test). The test runs that.
ASYNC_VERSIONS = 80


@pytest.mark.slow
def test_async_reaches_the_sync_accuracy_sooner_with_a_10x_slower_participant(
    tmp_path: Path,
) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 4)
        common: dict[str, Any] = {"participants": ids, "min_participants": 4}
        sync_spec = spec_file(tmp_path, "sync", rounds=SYNC_ROUNDS, **common)
        async_spec = spec_file(
            tmp_path,
            "async",
            rounds=ASYNC_VERSIONS,
            aggregation={"mode": "async", "buffer_size": ASYNC_K, "max_staleness": 30},
            **common,
        )
        for k in range(4):
            c.start_participant(k, 4, *(["--train-delay", str(SLOW_DELAY_S)] if k == 3 else []))
        sync_id, _, sync_status = run_session(c, sync_spec)
        async_id, _, async_status = run_session(c, async_spec)
        assert sync_status["status"] == async_status["status"] == "completed"

        sync_wall, sync_curve = accuracy_timeline(c, sync_id)
        async_wall, async_curve = accuracy_timeline(c, async_id)
        assert len(sync_curve) == SYNC_ROUNDS and len(async_curve) == ASYNC_VERSIONS
        target = sync_curve[-1][1] - 0.01  # the synchronous session's final accuracy, -1 point
        reached = next((t for t, acc in async_curve if acc >= target), None)
        events = completed_events(c, async_id)
        stale = [u["staleness"] for e in events for u in e["staleness"]["updates"]]
        slow = ids[3]
        slow_updates = sum(
            1 for e in events for u in e["staleness"]["updates"] if u["participant"] == slow
        )
        equal = async_curve[EQUAL_WORK - 1]
        print(
            f"\nsync: {SYNC_ROUNDS} rounds x 4 updates, {sync_wall:.2f} s, final accuracy "
            f"{sync_curve[-1][1]:.4f}\nasync (K = {ASYNC_K}): {ASYNC_VERSIONS} versions x "
            f"{ASYNC_K} updates, {async_wall:.2f} s, final accuracy {async_curve[-1][1]:.4f}, "
            f"reached {target:.4f} after {reached} s; staleness max {max(stale)}, mean "
            f"{sum(stale) / len(stale):.2f}; the slow participant's updates: {slow_updates}; "
            f"at equal work ({EQUAL_WORK} versions, {EQUAL_WORK * ASYNC_K} updates) accuracy "
            f"{equal[1]:.4f} after {equal[0]:.2f} s"
        )
        assert async_curve[-1][1] >= target, (sync_curve, async_curve)
        assert reached is not None and reached < sync_wall, (sync_curve, async_curve)
        assert async_wall < sync_wall, (sync_wall, async_wall)
    finally:
        c.procs.stop_all()
