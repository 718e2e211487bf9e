"""Outlier detection that acts, end to end: five real participant processes, the last one
started with ``--attack sign_flip``; the coordinator is told nothing. It must leave the
attacker's update out of each round's aggregate (the ``robustness`` events, the ledger's
scores), quarantine it after ``quarantine_after`` exclusions (an ``action`` event, a
critical ``quarantined`` alert) and select it no more, while no honest update is ever left
out; an operator's acknowledgement readmits it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, online, peer_table, rows, spec_file, until

pytestmark = pytest.mark.timeout(180)

N = 5
ROUNDS = 4


async def test_a_sign_flip_attacker_is_left_out_then_quarantined(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, N)
        attacker = ids[-1]
        spec = spec_file(
            tmp_path,
            "robust",
            rounds=ROUNDS,
            participants=ids,
            min_participants=N - 1,
            training={"local_epochs": 1},
            robustness={"quarantine_after": 2, "quarantine_window": 3},
        )
        sid = create(c, spec)
        for k in range(N):
            c.start_participant(k, N, *(["--attack", "sign_flip"] if k == N - 1 else []))
        await until(c, online(N))  # round 1 selects all five
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == ROUNDS, status
        assert status["final_accuracy"] > 0.8, status  # the honest four still learn

        led = c.coordinator_home.ledger_path
        events = [
            (r["kind"], json.loads(r["data"]))
            for r in rows(
                led, "SELECT kind, data FROM events WHERE session_id = ? ORDER BY id", sid
            )
        ]
        judged = [d for k, d in events if k == "robustness"]
        # rounds 1 and 2: five updates, the attacker's left out; then it is not selected,
        # and rounds 3 and 4 judge the four honest updates and keep them all
        assert [d["excluded"] for d in judged] == [[attacker], [attacker], [], []], judged
        assert all(d["detection"] == "exclude" for d in judged)
        for d in judged[:2]:
            assert d["scores"][attacker]["cosine"] < 0, d["scores"][attacker]
            assert any("cosine" in r for r in d["scores"][attacker]["reasons"])
        selected = {d["round"]: d["selected"] for k, d in events if k == "round_started"}
        assert attacker in selected[1] and attacker in selected[2]
        assert attacker not in selected[3] and attacker not in selected[4]
        actions = [d for k, d in events if k == "action" and d.get("peer_id") == attacker]
        assert [a["action"] for a in actions if a["action"] != "excluded_from_selection"] == [
            "excluded_from_aggregate",
            "excluded_from_aggregate",
            "quarantined",
        ]
        # the ledger's own record of each judged update
        mine = rows(
            led,
            "SELECT round, excluded, quarantined, scores FROM client_updates WHERE "
            "session_id = ? AND participant = ? ORDER BY round",
            sid,
            attacker,
        )
        assert [(r["round"], r["excluded"], r["quarantined"]) for r in mine] == [
            (1, 1, None),
            (2, 1, 1),
        ]
        honest = rows(
            led,
            "SELECT excluded FROM client_updates WHERE session_id = ? AND participant != ?",
            sid,
            attacker,
        )
        assert len(honest) == 4 * ROUNDS and {r["excluded"] for r in honest} == {0}

        alerts = cli_json("alerts", "list", target=c)["alerts"]
        (quarantine,) = [a for a in alerts if a["alert_type"] == "quarantined"]
        assert quarantine["entity_id"] == attacker and quarantine["severity"] == "critical"
        assert quarantine["status"] == "open"
        assert peer_table(c)[attacker]["status"] == "alerted"
        cli_json("alerts", "ack", str(quarantine["id"]), target=c)
        assert peer_table(c)[attacker]["status"] == "active"  # selectable again
    finally:
        c.procs.stop_all()
