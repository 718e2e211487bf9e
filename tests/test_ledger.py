"""The ledger against real SQLite files: schema, lifecycle, atomicity, hash chain."""

from __future__ import annotations

import json
import sqlite3
from itertools import pairwise
from pathlib import Path

import pytest

from fednode import ledger as ledger_mod
from fednode.ledger import GENESIS_HASH, Ledger
from protocol.errors import NotFound, StateError

SPEC = {"name": "digits-mlp", "rounds": 2, "aggregation": {"strategy": "fedavg"}}


def _session(led: Ledger, sid: str = "s1", created_at: float = 100.0) -> None:
    led.create_session(
        sid,
        name="digits-mlp",
        spec=SPEC,
        strategy="fedavg",
        secure_aggregation=True,
        rounds=2,
        created_at=created_at,
    )


def _update(led: Ledger, rnd: int, peer: str, status: str = "accepted", **kw: object) -> None:
    fields: dict = {
        "samples": 100,
        "loss": 0.5,
        "bytes": 1000,
        "duration_s": 1.0,
        "arrival_s": 1.5,
        "update_cid": f"bafy-{peer}-{rnd}",
        "received_at": 1000.0 + rnd,
    }
    fields.update(kw)
    led.record_update("s1", rnd, participant=peer, status=status, **fields)


@pytest.fixture
def led(tmp_path: Path):
    with Ledger(tmp_path / "node" / "ledger.db") as ledger:
        yield ledger


# --- schema and file ----------------------------------------------------------------------


def test_pragmas_and_wal(led: Ledger) -> None:
    assert led.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert led.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert led.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert led.db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    # WAL is a property of the file: a plain connection sees it too.
    raw = sqlite3.connect(led.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_reopen_preserves_data(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        _session(led)
        led.append_event("session_created", session_id="s1", data={"a": 1}, ts=5.0)
    with Ledger(str(path)) as led:
        assert led.path == path
        assert led.get_session("s1")["spec"] == SPEC
        assert [e["kind"] for e in led.events()] == ["session_created"]
        assert led.verify_chain() == (True, None)


def test_migrations_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    with Ledger(path) as led:
        versions = [r["version"] for r in led.db.query("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, len(ledger_mod.MIGRATIONS) + 1))
        assert led.schema_version == len(ledger_mod.MIGRATIONS)


def test_only_missing_migrations_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        _session(led)
    calls: list[int] = []

    def m_next(db) -> None:
        calls.append(1)
        db.execute("ALTER TABLE sessions ADD COLUMN note TEXT")

    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*ledger_mod.MIGRATIONS, m_next])
    with Ledger(path) as led:
        assert led.schema_version == len(ledger_mod.MIGRATIONS)
        assert led.get_session("s1")["note"] is None
    with Ledger(path) as led:
        pass
    assert calls == [1]


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("INSERT INTO schema_migrations VALUES (?, ?)", (99, 0.0))
    raw.close()
    known = len(ledger_mod.MIGRATIONS)
    with pytest.raises(StateError, match=rf"newer fednode \(schema 99 > {known}\)"):
        Ledger(path)


# --- sessions, rounds, summary ------------------------------------------------------------


def test_update_session_unknown_column(led: Ledger) -> None:
    _session(led)
    with pytest.raises(ValueError, match="bogus"):
        led.update_session("s1", status="running", bogus=1)
    assert led.get_session("s1")["status"] == "created"  # nothing applied
    led.update_session("s1", status="running", started_at=1.0)
    assert led.get_session("s1")["status"] == "running"


def test_missing_and_duplicate(led: Ledger) -> None:
    with pytest.raises(NotFound):
        led.get_session("nope")
    with pytest.raises(NotFound):
        led.update_session("nope", status="running")
    with pytest.raises(NotFound):
        led.start_round("nope", 1, selected=[], model_cid_in="x", started_at=0.0)
    _session(led)
    with pytest.raises(StateError):
        _session(led)
    with pytest.raises(NotFound):
        led.get_participant("12D3KooWnobody")
    assert led.find_model("bafy-none") is None


def test_list_sessions_newest_first(led: Ledger) -> None:
    _session(led, "old", created_at=1.0)
    _session(led, "new", created_at=2.0)
    assert [s["session_id"] for s in led.list_sessions()] == ["new", "old"]


# a round's traffic totals (Ledger.summary's history) when no update recorded its sizes
_NO_TRAFFIC = {
    "up_bytes": 0,
    "up_raw": 0,
    "up_ratio": None,
    "down_bytes": 0,
    "down_raw": 0,
    "down_ratio": None,
}


def test_full_lifecycle_and_summary(led: Ledger) -> None:
    for peer in ("pA", "pB", "pC"):
        led.upsert_participant(peer, address="127.0.0.1", online=True)
    _session(led)
    led.record_model(
        "s1", 0, cid="cid0", parent_cid=None, accuracy=0.1, loss=2.3, size=10, created_at=100.0
    )
    led.update_session("s1", status="running", started_at=100.0)

    led.start_round("s1", 1, selected=["pA", "pB", "pC"], model_cid_in="cid0", started_at=100.0)
    _update(led, 1, "pA")
    _update(led, 1, "pB")
    _update(led, 1, "pC", status="rejected", reason="norm too large")
    led.complete_round(
        "s1",
        1,
        ended_at=102.5,
        model_cid="cid1",
        accuracy=0.8,
        loss=0.6,
        size=10,
        participants=2,
        dropped=1,
        bytes_up=2000,
        bytes_down=3000,
    )

    led.start_round("s1", 2, selected=["pA", "pC"], model_cid_in="cid1", started_at=103.0)
    _update(led, 2, "pA")
    _update(led, 2, "pC")
    led.complete_round(
        "s1",
        2,
        ended_at=104.0,
        model_cid="cid2",
        accuracy=0.9,
        loss=0.3,
        size=12,
        participants=2,
        bytes_up=500,
        bytes_down=700,
    )
    led.update_session("s1", status="completed", ended_at=110.0)

    rounds = led.rounds("s1")
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["selected"] == ["pA", "pB", "pC"]
    assert rounds[0]["duration_s"] == pytest.approx(2.5)
    assert rounds[1]["status"] == "completed"
    assert len(led.updates("s1")) == 5
    assert [u["participant"] for u in led.updates("s1", 2)] == ["pA", "pC"]

    models = led.models("s1")
    assert [(m["round"], m["cid"], m["parent_cid"]) for m in models] == [
        (0, "cid0", None),
        (1, "cid1", "cid0"),
        (2, "cid2", "cid1"),
    ]
    assert led.find_model("cid2")["round"] == 2

    # Peer counters move with record_update.
    assert led.get_participant("pA")["rounds_completed"] == 2
    assert led.get_participant("pC")["updates_rejected"] == 1
    assert led.get_participant("pC")["rounds_completed"] == 1

    s = led.summary("s1")
    assert s == {
        "session_id": "s1",
        "status": "completed",
        "rounds_completed": 2,
        "participants": 3,  # pA, pB (round 1), pC (round 2 only; rejected in round 1)
        "strategy": "fedavg",
        "secure_aggregation": True,
        "dropped": 1,
        "restarts": 0,
        "final_accuracy": 0.9,
        "final_loss": 0.3,
        "final_metrics": {},  # complete_round was given no metrics by name
        "evaluation": "coordinator",  # a spec without [evaluation]
        "model_cid": "cid2",
        "duration_s": pytest.approx(10.0),
        "bytes_up": 2500,
        "bytes_down": 3700,
        # a spec without [compression]; record_update was given no sizes: no traffic rows
        "compression": {"codec": "identity", "downlink": "full", **_NO_TRAFFIC},
        "traffic": [],
        "traffic_by_participant": [],
        "ledger": str(led.path),
        "history": [
            {
                "round": 1,
                "accuracy": 0.8,
                "loss": 0.6,
                "metrics": {},
                "participant_metrics": {},
                "duration_s": 2.5,
                "participants": 2,
                "rolled_back": False,
                **_NO_TRAFFIC,
            },
            {
                "round": 2,
                "accuracy": 0.9,
                "loss": 0.3,
                "metrics": {},
                "participant_metrics": {},
                "duration_s": 1.0,
                "participants": 2,
                "rolled_back": False,
                **_NO_TRAFFIC,
            },
        ],
    }
    json.dumps(s)  # plain values only


def test_summary_counts_only_accepted_and_completed(led: Ledger) -> None:
    _session(led)
    assert led.summary("s1")["duration_s"] == 0.0  # never started
    led.update_session("s1", status="running", started_at=100.0)
    led.start_round("s1", 1, selected=["pA"], model_cid_in="c0", started_at=100.0)
    _update(led, 1, "pA", status="rejected")
    led.finish_round("s1", 1, status="failed", ended_at=101.0, dropped=1, reason="no quorum")
    s = led.summary("s1", now=130.0)
    assert s["participants"] == 0
    assert s["history"] == []
    assert s["rounds_completed"] == 0
    assert s["dropped"] == 1
    assert s["duration_s"] == pytest.approx(30.0)


def test_finish_round_rules(led: Ledger) -> None:
    _session(led)
    led.start_round("s1", 1, selected=[], model_cid_in="c0", started_at=1.0)
    with pytest.raises(StateError):
        led.start_round("s1", 1, selected=[], model_cid_in="c0", started_at=1.0)
    with pytest.raises(ValueError):
        led.finish_round("s1", 1, status="running", ended_at=2.0)
    led.finish_round("s1", 1, status="aborted", ended_at=2.0)
    with pytest.raises(StateError):
        led.finish_round("s1", 1, status="failed", ended_at=3.0)
    with pytest.raises(NotFound):
        led.finish_round("s1", 7, status="failed", ended_at=3.0)


# --- atomicity ----------------------------------------------------------------------------


def test_complete_round_is_atomic(led: Ledger) -> None:
    _session(led)
    led.start_round("s1", 1, selected=["pA"], model_cid_in="c0", started_at=1.0)
    # A model for round 1 already exists: the model insert inside complete_round must fail.
    led.record_model(
        "s1", 1, cid="stale", parent_cid=None, accuracy=None, loss=None, size=1, created_at=1.0
    )
    with pytest.raises(StateError):
        led.complete_round(
            "s1",
            1,
            ended_at=2.0,
            model_cid="c1",
            accuracy=0.7,
            loss=0.4,
            size=5,
            participants=1,
            bytes_up=9,
        )
    rnd = led.rounds("s1")[0]
    assert rnd["status"] == "running"
    assert rnd["ended_at"] is None and rnd["model_cid"] is None and rnd["bytes_up"] == 0
    sess = led.get_session("s1")
    assert sess["rounds_completed"] == 0
    assert sess["model_cid"] is None and sess["final_accuracy"] is None
    assert [m["cid"] for m in led.models("s1")] == ["stale"]
    assert not led.db.conn.in_transaction

    # After clearing the obstacle the same call goes through whole.
    led.db.execute("DELETE FROM model_versions WHERE cid = 'stale'")
    led.complete_round(
        "s1", 1, ended_at=2.0, model_cid="c1", accuracy=0.7, loss=0.4, size=5, participants=1
    )
    assert led.get_session("s1")["model_cid"] == "c1"
    assert led.models("s1")[0]["parent_cid"] == "c0"


def test_complete_round_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        _session(led)
        led.start_round("s1", 1, selected=[], model_cid_in="c0", started_at=1.0)
        led.complete_round(
            "s1", 1, ended_at=2.0, model_cid="c1", accuracy=0.5, loss=1.0, size=3, participants=0
        )
    with Ledger(path) as led:
        assert led.get_session("s1")["rounds_completed"] == 1
        assert led.find_model("c1") is not None


# --- participants -------------------------------------------------------------------------


def test_participants(led: Ledger) -> None:
    p = led.upsert_participant("pA", address="10.0.0.1:9000", online=True)
    assert p["first_seen"] == p["last_seen"]
    assert p["online"] is True and p["status"] == "active"
    led.upsert_participant("pA", latency_ms=12.5, last_seen=p["last_seen"] + 5)
    p2 = led.get_participant("pA")
    assert p2["address"] == "10.0.0.1:9000" and p2["latency_ms"] == 12.5
    assert p2["first_seen"] == p["first_seen"] and p2["last_seen"] == p["last_seen"] + 5
    led.upsert_participant("pB", online=True)
    with pytest.raises(ValueError):
        led.upsert_participant("pA", nickname="x")
    assert led.mark_all_offline() == 2
    assert all(not x["online"] for x in led.participants())


# --- hash chain ---------------------------------------------------------------------------


def _chain(led: Ledger, n: int = 4) -> list[dict]:
    return [
        led.append_event("tick", session_id="s1", entity_id=f"e{i}", data={"i": i}, ts=float(i))
        for i in range(n)
    ]


def test_chain_ok_and_linked(led: Ledger) -> None:
    assert led.verify_chain() == (True, None)
    evs = _chain(led)
    assert evs[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in pairwise(evs))
    assert led.verify_chain() == (True, None)
    assert [e["id"] for e in led.events(since_id=evs[1]["id"], limit=1)] == [evs[2]["id"]]
    assert led.events(session_id="other") == []
    assert led.events()[0]["data"] == {"i": 0}


def test_chain_detects_edit(led: Ledger) -> None:
    evs = _chain(led)
    led.db.execute("UPDATE events SET data = ? WHERE id = ?", ('{"i":99}', evs[2]["id"]))
    assert led.verify_chain() == (False, evs[2]["id"])


def test_chain_detects_deleted_middle_row(led: Ledger) -> None:
    evs = _chain(led)
    led.db.execute("DELETE FROM events WHERE id = ?", (evs[1]["id"],))
    assert led.verify_chain() == (False, evs[2]["id"])


def test_chain_detects_reorder(led: Ledger) -> None:
    evs = _chain(led)
    a, b = evs[1]["id"], evs[2]["id"]
    with led.transaction():
        led.db.execute("UPDATE events SET id = -1 WHERE id = ?", (a,))
        led.db.execute("UPDATE events SET id = ? WHERE id = ?", (a, b))
        led.db.execute("UPDATE events SET id = ? WHERE id = -1", (b,))
    assert led.verify_chain() == (False, a)


def test_chain_continues_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        first = _chain(led, 2)
    with Ledger(path) as led:
        nxt = led.append_event("later")
        assert nxt["prev_hash"] == first[-1]["hash"]
        assert nxt["id"] == first[-1]["id"] + 1
        assert led.verify_chain() == (True, None)


def test_token_uses_are_counted_per_peer(tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.db") as led:
        led.create_session(
            "s1",
            name="n",
            spec={},
            strategy="fedavg",
            secure_aggregation=False,
            rounds=1,
            created_at=0.0,
        )
        led.record_token("t1", "s1", expires_at=10.0, max_uses=2, created_by="op")
        assert led.use_token("t1", "s1", "pA") == "admitted"
        assert led.use_token("t1", "s1", "pA") == "already"  # reconnecting costs nothing
        assert led.use_token("t1", "s1", "pB") == "admitted"
        with pytest.raises(StateError) as exc:
            led.use_token("t1", "s1", "pC")
        assert exc.value.code == "TOKEN_USED_UP"
        assert led.members("s1") == {"pA", "pB"}
        with pytest.raises(NotFound):
            led.use_token("t-other", "s1", "pD")
