"""A round's client_updates rows are written in batches (docs/scale.md, "Ledger writes").

The ledger: ``update_values`` checks a row where it enters; ``record_updates`` writes many in
one transaction (one commit, counted through SQLite's own trace of the statements it runs),
all or nothing, and moves each peer's counters. The coordinator: a row waits at most
``UPDATE_BATCH_S`` before it is written, even while the round still waits for a straggler
(real processes on 127.0.0.1, the ledger read from outside the node as an operator would).
"""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fednode import session as session_mod
from fednode.ledger import Ledger
from protocol.errors import NotFound
from tests.conftest import cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file


def values(led: Ledger, peer: str, status: str = "accepted", **kw: Any) -> dict[str, Any]:
    return led.update_values(
        "s1",
        1,
        participant=peer,
        samples=10,
        loss=0.5,
        bytes=100,
        duration_s=0.1,
        arrival_s=0.2,
        update_cid="",
        status=status,
        received_at=time.time(),
        **kw,
    )


@pytest.fixture
def led(tmp_path: Path) -> Any:
    with Ledger(tmp_path / "ledger.db") as led:
        led.create_session(
            "s1",
            name="s",
            spec={},
            strategy="fedavg",
            secure_aggregation=False,
            rounds=1,
            created_at=time.time(),
        )
        for peer in ("a", "b"):
            led.upsert_participant(peer)
        yield led


def commits(led: Ledger) -> list[str]:
    """Every COMMIT SQLite runs from now on (autocommit statements would count as theirs)."""
    seen: list[str] = []
    led.db.conn.set_trace_callback(seen.append)
    return seen


def test_a_hundred_updates_are_one_commit_and_move_each_peers_counters(led: Ledger) -> None:
    batch = [values(led, "a") for _ in range(60)] + [values(led, "b") for _ in range(39)]
    batch.append(values(led, "b", status="rejected", reason="BAD_UPDATE: NaN"))
    trace = commits(led)
    assert led.record_updates(batch) == 100
    led.db.conn.set_trace_callback(None)
    assert sum(1 for s in trace if s.strip().upper().startswith("COMMIT")) == 1, trace[-5:]
    assert len(led.updates("s1", 1)) == 100
    a, b = led.get_participant("a"), led.get_participant("b")
    assert (a["rounds_completed"], a["updates_rejected"]) == (60, 0)
    assert (b["rounds_completed"], b["updates_rejected"]) == (39, 1)


def test_one_bad_row_in_a_batch_writes_none_of_it(led: Ledger) -> None:
    good = values(led, "a")
    stranger = {**values(led, "b"), "session_id": "no-such-session"}
    with pytest.raises(NotFound):
        led.record_updates([good, stranger])
    assert led.updates("s1") == []
    assert led.get_participant("a")["rounds_completed"] == 0


def test_a_bad_figure_is_refused_where_it_enters_not_inside_a_batch(led: Ledger) -> None:
    with pytest.raises(ValueError, match="accuracy"):
        values(led, "a", eval_metrics={"accuracy": math.nan})
    with pytest.raises(ValueError, match="update status"):
        values(led, "a", status="maybe")


def test_rows_not_made_by_update_values_are_refused(led: Ledger) -> None:
    row = values(led, "a")
    with pytest.raises(ValueError, match="update_values"):
        led.record_updates([{**row, "excluded; DROP TABLE events": 1}])
    with pytest.raises(ValueError, match="update_values"):
        led.record_updates([row, {k: v for k, v in row.items() if k != "loss"}])
    assert led.updates("s1") == []


def test_record_update_still_returns_its_row(led: Ledger) -> None:
    row = led.record_update(
        "s1",
        1,
        participant="a",
        samples=3,
        loss=None,
        bytes=9,
        duration_s=None,
        arrival_s=None,
        update_cid="",
        received_at=1.0,
        eval_metrics={"accuracy": 0.5},
    )
    assert row["samples"] == 3 and row["eval_metrics"] == {"accuracy": 0.5}


def test_an_update_is_in_the_ledger_soon_while_the_round_waits_for_a_straggler(
    tmp_path: Path,
) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 2)
        spec = spec_file(
            tmp_path,
            "straggler",
            rounds=1,
            participants=ids,
            min_participants=2,
            round_timeout_s=120,
            training={"local_epochs": 1},
        )
        c.start_participant(0, 2)
        c.start_participant(1, 2, "--train-delay", "60")  # trains long after the test ends
        sid = create(c, spec)
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        led = c.coordinator_home.ledger_path
        deadline = time.monotonic() + 60
        got: list[sqlite3.Row] = []
        while not got and time.monotonic() < deadline:
            got = rows(led, "SELECT participant FROM client_updates WHERE session_id = ?", sid)
            if not got:
                time.sleep(0.1)  # polling a condition with a deadline, not synchronisation
        assert [r["participant"] for r in got] == [ids[0]], got
        (rnd,) = rows(led, "SELECT status FROM training_rounds WHERE session_id = ?", sid)
        assert rnd["status"] == "running"  # written before the round's end, not with it
    finally:
        c.procs.stop_all()


def test_the_batch_bounds_are_what_the_docs_say() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    assert f"{session_mod.UPDATE_BATCH_ROWS} rows" in doc
    assert f"{session_mod.UPDATE_BATCH_S:g} s" in doc
