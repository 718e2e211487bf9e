"""Over-selection for stragglers end to end: real processes on 127.0.0.1.

Four participants, one of them slow (``--train-delay`` 60 s, past any round of this test);
the spec needs 3 updates a round (max_participants) and asks 25 % more ([selection]
over_selection: ceil(3 x 1.25) = 4). Each round closes on the three fast updates without
waiting for the slow one, which is told the round ended (round_end), stops, and is recorded
as not needed: not dropped in the round, no failed task in its quality figures.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.conftest import cli_json, start_cluster
from tests.test_quality_e2e import (
    create,
    future_ids,
    online,
    rows,
    spec_file,
    start_and_watch,
    until,
)

pytestmark = pytest.mark.timeout(120)

SLOW_S = 60.0  # the straggler's delay: a round that waited for it would time the test out


def test_over_selection_closes_rounds_without_the_straggler(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 4)
        spec = spec_file(
            tmp_path,
            "spares",
            rounds=2,
            participants=ids,
            min_participants=3,
            max_participants=3,
            round_timeout_s=SLOW_S + 30,
            selection={"over_selection": 0.25},
        )
        sid = create(c, spec)
        for k in range(3):
            c.start_participant(k, 4)
        c.start_participant(3, 4, "--train-delay", str(SLOW_S))
        slow, fast = ids[3], sorted(ids[:3])
        asyncio.run(until(c, online(4)))  # round 1 must find all four to ask
        start_and_watch(c, sid)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status

        led = c.coordinator_home.ledger_path

        def events(kind: str) -> list[dict[str, object]]:
            got = rows(
                led, "SELECT data FROM events WHERE session_id = ? AND kind = ? ORDER BY id",
                sid, kind,
            )  # fmt: skip
            return [json.loads(r["data"]) for r in got]

        started = events("round_started")
        assert [(sorted(e["selected"]), e["needed"]) for e in started] == [(sorted(ids), 3)] * 2
        done = events("round_completed")
        assert [(e["participants"], e["dropped"], e["not_needed"]) for e in done] == [
            (fast, [], [slow])
        ] * 2
        assert all(e["duration_s"] < SLOW_S / 2 for e in done), done  # not waited for
        table = rows(
            led, "SELECT participants, dropped FROM training_rounds WHERE session_id = ?", sid
        )
        assert [(r["participants"], r["dropped"]) for r in table] == [(3, 0)] * 2

        # Its quality figures count no task it failed (nor one it was asked for).
        figures = rows(
            led,
            "SELECT tasks_selected, tasks_failed, task_completion_rate "
            "FROM participant_quality_metrics WHERE peer_id = ? AND session_id = ?",
            slow,
            sid,
        )
        assert len(figures) == 2
        assert all((f["tasks_selected"], f["tasks_failed"]) == (0, 0) for f in figures), figures
        assert all(f["task_completion_rate"] is None for f in figures)

        # Its own ledger: each task stopped at the round's end, as not needed.
        tasks = rows(
            c.participant_homes[3].ledger_path, "SELECT round, status FROM participant_tasks"
        )
        assert [(t["round"], t["status"]) for t in tasks] == [(1, "not_needed"), (2, "not_needed")]
    finally:
        c.procs.stop_all()
