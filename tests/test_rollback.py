"""Model versions and rollback: the pure rule, the ledger, and real nodes that diverge.

The end-to-end tests make a round diverge on purpose with hidden test options: a
participant started with ``--poison-round K`` sends sign-flipped, scaled weights in round K
(finite, so the update checks pass, but the FedAvg aggregate's accuracy collapses); a
coordinator started with ``--nan-round K`` turns round K's aggregate into NaN.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlite_utils import Database

from fedctl.client import AdminClient, Target, call
from fednode import ledger as ledger_mod
from fednode import versions, weights
from fednode.ledger import Ledger
from fednode.store import BlockStore
from protocol.errors import FednodeError, NotFound, StateError
from protocol.identity import Identity
from tests.conftest import Cluster, cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, online, rows, spec_file, until

pytestmark = pytest.mark.timeout(180)

# --- the rule (pure) -------------------------------------------------------------------------


def hist(*accs: float | None) -> list[tuple[int, float | None]]:
    return list(enumerate(accs))


@pytest.mark.parametrize(
    ("accs", "margin", "k", "target"),
    [
        ((0.1, 0.9, 0.95), 0.05, 1, None),  # improving
        ((0.1, 0.9, 0.95, 0.91), 0.05, 1, None),  # a fall within the margin
        ((0.1, 0.9, 0.95, 0.90), 0.05, 1, None),  # exactly at the margin: not below it
        ((0.1, 0.9, 0.95, 0.2), 0.05, 1, 2),  # one fall, K = 1: back to the best
        ((0.1, 0.9, 0.95, 0.2), 0.05, 2, None),  # K = 2 waits for a second round
        ((0.1, 0.9, 0.95, 0.2, 0.5), 0.05, 2, 2),  # two in a row
        ((0.1, 0.9, 0.95, 0.2, 0.96, 0.3), 0.05, 2, None),  # the streak was broken
        ((0.1, 0.9, 0.95, 0.94, 0.2, 0.3), 0.05, 2, 2),  # best, not last, before the fall
        ((0.1, 0.95, 0.95, 0.2), 0.05, 1, 2),  # a tie: the later version
        ((0.1, 0.9, 0.95, 0.2, 0.3, 0.4), 0.05, 3, 2),
        ((0.1, 0.9, 0.95, 0.2), 0.8, 1, None),  # a wide margin tolerates the fall
        ((0.5, None, 0.2), 0.05, 1, 0),  # an unmeasured version neither falls nor counts
        ((0.5, 0.2, None), 0.05, 1, None),  # ... but it ends a streak
        ((0.3,), 0.05, 1, None),  # only the initial model
        ((), 0.05, 1, None),
    ],
)
def test_rollback_target(accs: tuple, margin: float, k: int, target: int | None) -> None:
    assert versions.rollback_target(hist(*accs), margin, k) == target


def test_rollback_rule_parts() -> None:
    h = hist(0.1, 0.9, 0.95, 0.2, 0.5)
    assert versions.fallen(h, 0.05) == [False, False, False, True, True]
    assert versions.fall_streak(h, 0.05) == 2
    assert versions.best_round(h) == 2
    assert versions.best_round(hist(None, float("nan"))) is None
    assert versions.rollback_target([(0, 0.5), (3, 0.9), (7, 0.1)], 0.05, 1) == 3  # round numbers
    with pytest.raises(ValueError, match="k must be"):
        versions.rollback_target(h, 0.05, 0)


def test_is_finite_and_statuses() -> None:
    ok = {"a": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    assert versions.is_finite(ok)
    assert not versions.is_finite({**ok, "b": np.array([0, np.nan], np.float32)})
    assert not versions.is_finite({**ok, "b": np.array([np.inf], np.float32)})
    assert versions.statuses([0, 1, 2, 3], [False, False, True, False]) == [
        "superseded",
        "superseded",
        "rolled_back",
        "current",
    ]
    assert versions.statuses([0, 1, 2], [False, True, True]) == [
        "current",
        "rolled_back",
        "rolled_back",
    ]


# --- the ledger ------------------------------------------------------------------------------


def _session_with_versions(led: Ledger, accs: list[float]) -> None:
    led.create_session(
        "s1",
        name="n",
        spec={},
        strategy="fedavg",
        secure_aggregation=False,
        rounds=len(accs),
        created_at=0.0,
    )
    led.record_model(
        "s1", 0, cid="c0", parent_cid=None, accuracy=0.1, loss=2.0, size=1, created_at=0
    )
    for r, acc in enumerate(accs, start=1):
        led.start_round("s1", r, selected=["p"], model_cid_in=f"c{r - 1}", started_at=float(r))
        led.complete_round(
            "s1",
            r,
            ended_at=r + 0.5,
            model_cid=f"c{r}",
            accuracy=acc,
            loss=1 - acc,
            size=1,
            participants=1,
        )


def test_rollback_marks_versions_moves_the_session_and_logs(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        _session_with_versions(led, [0.9, 0.95, 0.2, 0.3])
        assert led.get_session("s1")["model_cid"] == "c4"
        ev = led.rollback_models("s1", 2, now=10.0, data={"reason": "why", "trigger": "t"})
        assert ev == {
            "reason": "why",
            "trigger": "t",
            "from_cid": "c4",
            "from_round": 4,
            "to_cid": "c2",
            "to_round": 2,
            "rolled_back": [3, 4],
        }
        marks = {m["round"]: (m["rolled_back_at"], m["rolled_back_to"]) for m in led.models("s1")}
        assert marks == {
            0: (None, None),
            1: (None, None),
            2: (None, None),
            3: (10.0, 2),
            4: (10.0, 2),
        }
        assert [m["round"] for m in led.live_models("s1")] == [0, 1, 2]
        s = led.get_session("s1")
        assert (s["model_cid"], s["final_accuracy"]) == ("c2", 0.95)
        (event,) = [e for e in led.events("s1") if e["kind"] == "rollback"]
        assert event["data"] == ev and led.verify_chain() == (True, None)
        # A version already rolled back is not a target; a missing one is NotFound.
        with pytest.raises(StateError, match="itself rolled back"):
            led.rollback_models("s1", 3, now=11.0, data={})
        with pytest.raises(NotFound, match="no model version of round 9"):
            led.rollback_models("s1", 9, now=11.0, data={})
        # Rounds go on from the good version; a second rollback leaves earlier marks alone.
        led.start_round("s1", 5, selected=["p"], model_cid_in="c2", started_at=12.0)
        led.complete_round(
            "s1", 5, ended_at=13.0, model_cid="c5", accuracy=0.97, loss=0.03, size=1, participants=1
        )
        assert led.models("s1")[-1]["parent_cid"] == "c2"
        ev = led.rollback_models("s1", 0, now=14.0, data={})
        assert ev["rolled_back"] == [1, 2, 5] and ev["from_cid"] == "c5"
        assert {m["round"]: m["rolled_back_to"] for m in led.models("s1")}[3] == 2


def test_schema_3_file_migrates_to_4(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = Database(path)
    db.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    for version, migration in enumerate(ledger_mod.MIGRATIONS[:3], start=1):
        with db.atomic():
            migration(db)
            db["schema_migrations"].insert({"version": version, "applied_at": 0.0})
    db["sessions"].insert(
        {
            "session_id": "s",
            "name": "n",
            "spec": "{}",
            "strategy": "fedavg",
            "rounds": 1,
            "created_at": 0.0,
        }
    )
    db["model_versions"].insert({"session_id": "s", "round": 0, "cid": "c0", "created_at": 0.0})
    db.close()
    with Ledger(path) as led:
        assert led.schema_version == len(ledger_mod.MIGRATIONS) >= 4
        (m,) = led.models("s")
        assert m["cid"] == "c0" and m["rolled_back_at"] is None and m["rolled_back_to"] is None


def test_model_divergence_is_an_event_alert(tmp_path: Path) -> None:
    from protocol import alerts

    assert alerts.ALERT_SEVERITY["model_divergence"] == "high"
    assert "model_divergence" in alerts.EVENT_ALERT_TYPES
    assert "model_divergence" not in alerts.RULE_ALERT_TYPES
    with Ledger(tmp_path / "l.db") as led:
        a = led.raise_event_alert("model_divergence", "high", "s1", "s1", "diverged", 1.0)
        assert (a["source"], a["entity_id"], a["status"]) == ("event", "s1", "open")


# --- real nodes ------------------------------------------------------------------------------
# The CLI is run where its contract is under test (model list, session rollback and its exit
# codes); everything else goes through the admin channel in-process: each fedctl process
# costs most of a second on two cores.

POISONED = 2  # participant-2 sends a poisoned update in round 3


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator; its three participants start once the first session lists them."""
    c = start_cluster(tmp_path_factory.mktemp("rollback"), 0, "--heartbeat", "0.5")
    try:
        yield c
    finally:
        c.procs.stop_all()


def admin(c: Cluster, op: str, **args: Any) -> dict[str, Any]:
    return call(Target(c.url, c.peer_id, c.operator_key), op, **args)


def join(c: Cluster) -> None:
    """Start the participants (once): a session listing future_ids must exist first."""
    if not c.participant_homes:
        for k in range(3):
            c.start_participant(k, 3, *(["--poison-round", "3"] if k == POISONED else []))
    asyncio.run(until(c, online(3)))


def run_to_end(c: Cluster, sid: str) -> dict[str, Any]:
    admin(c, "session.start", session_id=sid)

    async def ended(client: AdminClient) -> bool:
        st = await client.call("session.status", session_id=sid)
        return st["status"] in ("completed", "failed", "stopped")

    asyncio.run(until(c, ended, timeout=120))
    return admin(c, "session.status", session_id=sid)


def events(c: Cluster, sid: str, kind: str) -> list[dict[str, Any]]:
    led = c.coordinator_home.ledger_path
    got = rows(
        led, "SELECT data FROM events WHERE session_id = ? AND kind = ? ORDER BY id", sid, kind
    )
    return [json.loads(r["data"]) for r in got]


def rounds_of(c: Cluster, sid: str) -> dict[int, Any]:
    led = c.coordinator_home.ledger_path
    return {
        r["round"]: r for r in rows(led, "SELECT * FROM training_rounds WHERE session_id = ?", sid)
    }


def model_list(c: Cluster, sid: str) -> dict[int, dict[str, Any]]:
    return {m["round"]: m for m in cli_json("model", "list", sid, target=c)["models"]}


def divergence_alerts(c: Cluster, sid: str) -> list[dict[str, Any]]:
    alerts = admin(c, "alerts.list", status="all", session_id=sid)["alerts"]
    return [a for a in alerts if a["alert_type"] == "model_divergence"]


def refused(c: Cluster, *args: str) -> tuple[int, dict[str, str]]:
    proc = cli("session", "rollback", *args, "--json", target=c)
    return proc.returncode, json.loads(proc.stdout)["error"]


def test_diverging_round_is_rolled_back(fed: Cluster, tmp_path: Path) -> None:
    ids = future_ids(fed, 3)
    spec = spec_file(
        tmp_path,
        "poison",
        rounds=6,
        participants=ids,
        min_participants=3,
        rollback={"margin": 0.05, "rounds": 1},
        # the poisoned update must reach the model for the rollback to have work to do: the
        # bounds that keep it out (tests/test_hostile_weight.py) are off here
        aggregation={"max_update_norm": 0, "max_weight_share": 1.0, "max_loss_factor": 0},
    )
    sid = create(fed, spec)
    join(fed)
    status = run_to_end(fed, sid)
    assert status["status"] == "completed" and status["rounds_completed"] == 6
    assert status["final_accuracy"] > 0.8

    models = model_list(fed, sid)
    assert sorted(models) == [0, 1, 2, 3, 4, 5, 6]
    assert models[3]["status"] == "rolled_back" and models[3]["rolled_back_to"] == 2
    assert models[3]["accuracy"] < models[2]["accuracy"] - 0.05  # the poison worked
    assert models[6]["status"] == "current" and models[6]["cid"] == status["model_cid"]
    assert {models[r]["status"] for r in (0, 1, 2, 4, 5)} == {"superseded"}
    good = models[2]["cid"]
    assert models[3]["parent_cid"] == good and models[4]["parent_cid"] == good
    assert {"round", "cid", "accuracy", "size", "parent_cid", "status"} <= set(models[0])

    (rb,) = events(fed, sid, "rollback")
    assert (rb["from_cid"], rb["to_cid"], rb["to_round"]) == (models[3]["cid"], good, 2)
    assert rb["trigger"] == "accuracy" and rb["rolled_back"] == [3] and "accuracy" in rb["reason"]
    assert rounds_of(fed, sid)[4]["model_cid_in"] == good
    (alert,) = divergence_alerts(fed, sid)
    assert (alert["severity"], alert["entity_id"], alert["status"]) == ("high", sid, "open")
    assert good in alert["message"]
    with Ledger(fed.coordinator_home.ledger_path) as led:
        assert led.verify_chain() == (True, None)

    # A completed session cannot be rolled back; the hint says what to do instead.
    code, err = refused(fed, sid, "--to-round", "2")
    assert code == 1 and err["code"] == "BAD_STATE" and "completed" in err["message"]
    assert "model get" in err["hint"]


def test_operator_rolls_back_a_paused_session(fed: Cluster, tmp_path: Path) -> None:
    ids = future_ids(fed, 3)
    spec = spec_file(
        tmp_path,
        "manual",
        rounds=40,
        participants=ids,
        min_participants=3,
        rollback={"enabled": False},  # participant-2's round 3 must not roll back by itself
    )
    sid = create(fed, spec)
    code, err = refused(fed, sid, "--to-round", "0")
    assert code == 1 and err["code"] == "BAD_STATE" and "created" in err["message"]
    assert "start the session" in err["hint"]
    join(fed)
    admin(fed, "session.start", session_id=sid)

    async def paused_after_two(client: AdminClient) -> bool:
        st = await client.call("session.status", session_id=sid)
        if st["status"] == "running" and st["rounds_completed"] >= 2:
            await client.call("session.pause", session_id=sid)  # at once, on this connection
        return st["status"] == "paused" and st["current_round"]["phase"] == "done"

    asyncio.run(until(fed, paused_after_two))
    n = admin(fed, "session.status", session_id=sid)["rounds_completed"]
    code, err = refused(fed, sid, "--to-round", "99")
    assert code == 1 and err["code"] == "NOT_FOUND" and "model list" in err["hint"]
    with pytest.raises(FednodeError, match="numbered from 0"):
        admin(fed, "session.rollback", session_id=sid, round=-1)

    models = model_list(fed, sid)
    got = cli_json("session", "rollback", sid, "--to-round", "1", target=fed)
    assert got["to_round"] == 1 and got["to_cid"] == models[1]["cid"]
    assert got["status"] == "paused"
    admin(fed, "session.resume", session_id=sid)

    async def next_round(client: AdminClient) -> bool:
        st = await client.call("session.status", session_id=sid)
        return st["rounds_completed"] >= n + 1

    asyncio.run(until(fed, next_round))
    admin(fed, "session.stop", session_id=sid)
    assert rounds_of(fed, sid)[n + 1]["model_cid_in"] == models[1]["cid"]
    after = model_list(fed, sid)
    assert {after[r]["status"] for r in range(2, n + 1)} == {"rolled_back"}
    assert {after[r]["rolled_back_to"] for r in range(2, n + 1)} == {1}
    assert after[n + 1]["parent_cid"] == models[1]["cid"] and after[1]["status"] == "superseded"
    (rb,) = events(fed, sid, "rollback")
    assert rb["trigger"] == "operator" and rb["to_round"] == 1
    assert rb["rolled_back"] == list(range(2, n + 1))
    assert rb["by"] == Identity.load(fed.operator_key).peer_id
    assert divergence_alerts(fed, sid) == []  # an operator's act is not an alert

    code, err = refused(fed, sid, "--to-round", "1")
    assert code == 1 and err["code"] == "BAD_STATE" and "stopped" in err["message"]


def test_non_finite_aggregate_is_never_published(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0, "--nan-round", "2")
    try:
        ids = future_ids(c, 1)
        sid = create(c, spec_file(tmp_path, "nan", rounds=3, participants=ids, min_participants=1))
        c.start_participant(0, 1)
        asyncio.run(until(c, online(1)))
        status = run_to_end(c, sid)
        assert status["status"] == "completed" and status["rounds_completed"] == 2
        rounds = rounds_of(c, sid)
        # rejected, not published; the next round starts from the current model (round 1's)
        assert rounds[2]["status"] == "rejected" and rounds[2]["model_cid"] is None
        assert "non-finite" in rounds[2]["reason"] and "not published" in rounds[2]["reason"]
        models = model_list(c, sid)
        assert sorted(models) == [0, 1, 3]  # no version for round 2
        assert rounds[3]["model_cid_in"] == models[1]["cid"] == models[3]["parent_cid"]
        store = BlockStore(c.coordinator_home.store_root)
        for m in models.values():
            assert math.isfinite(m["accuracy"])
            assert versions.is_finite(weights.from_bytes(store.get(m["cid"])))
        assert events(c, sid, "rollback") == []  # nothing published, nothing to undo
        alerts = admin(c, "alerts.list", status="all", session_id=sid)["alerts"]
        (alert,) = [a for a in alerts if a["alert_type"] == "aggregate_rejected"]
        assert (alert["severity"], alert["entity_id"]) == ("high", sid)
        assert "round 2" in alert["message"] and models[1]["cid"] in alert["message"]
    finally:
        c.procs.stop_all()
