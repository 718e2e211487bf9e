"""Evaluation where the data is, end to end: real processes on 127.0.0.1, a coordinator with
no data at all (data.dataset = "none"), three participants on digits shards that each hold
out a test split and report the round's model on it with their updates.

What must hold: the session completes; each round's accuracy and loss in the ledger are the
example-weighted mean of the participants' reports in client_updates; those figures describe
the model the round trained from (its version row carries them, the newest version has none
yet); the final accuracy is far above chance (0.1 for ten classes); and the coordinator
evaluated nothing: no participant has a model-quality figure (which needs coordinator data).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file

pytestmark = pytest.mark.timeout(180)

ROUNDS = 3


def test_participants_evaluate_and_the_coordinator_needs_no_data(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 3)
        spec = spec_file(
            tmp_path,
            "where-the-data-is",
            rounds=ROUNDS,
            participants=ids,
            min_participants=3,
            data={"dataset": "none"},
            evaluation={"on": "participants"},
            rollback={"enabled": False},  # the figures are checked, not what a rollback does
        )
        sid = create(c, spec)
        for k in range(3):
            c.start_participant(k, 3)
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == ROUNDS, status
        assert status["evaluation"] == "participants"

        led = c.coordinator_home.ledger_path
        done = rows(
            led,
            "SELECT round, accuracy, loss, model_cid_in, model_cid FROM training_rounds "
            "WHERE session_id = ? AND status = 'completed' ORDER BY round",
            sid,
        )
        assert [r["round"] for r in done] == list(range(1, ROUNDS + 1))
        for r in done:
            reports = rows(
                led,
                "SELECT participant, eval_examples, eval_loss, eval_metrics FROM client_updates "
                "WHERE session_id = ? AND round = ? AND status = 'accepted'",
                sid,
                r["round"],
            )
            assert len(reports) == 3 and all(u["eval_examples"] > 0 for u in reports), reports
            n = sum(u["eval_examples"] for u in reports)
            acc = sum(
                u["eval_examples"] * json.loads(u["eval_metrics"])["accuracy"] for u in reports
            )
            loss = sum(u["eval_examples"] * u["eval_loss"] for u in reports)
            assert r["accuracy"] == pytest.approx(acc / n, abs=1e-9)
            assert r["loss"] == pytest.approx(loss / n, abs=1e-9)
            # the figures are those of the model the round trained from: on its version's row
            (version,) = rows(
                led,
                "SELECT accuracy FROM model_versions WHERE session_id = ? AND cid = ?",
                sid,
                r["model_cid_in"],
            )
            assert version["accuracy"] == r["accuracy"]
        (newest,) = rows(
            led,
            "SELECT accuracy FROM model_versions WHERE session_id = ? AND round = ?",
            sid,
            ROUNDS,
        )
        assert newest["accuracy"] is None  # measured by the next round's participants, if any

        assert status["final_accuracy"] == done[-1]["accuracy"]
        assert status["final_accuracy"] > 0.8, status  # chance is 0.1
        assert done[-1]["accuracy"] > done[0]["accuracy"]  # round 1 reports the initial model

        # No coordinator evaluation: no model-quality figure for anyone (it needs coordinator
        # data), and every round_completed event says who measured.
        quality = rows(led, "SELECT peer_id, model_quality FROM participant_quality_metrics")
        assert {q["peer_id"] for q in quality} >= set(ids)  # the scoring ran
        assert [q["model_quality"] for q in quality] == [None] * len(quality)
        events = rows(
            led, "SELECT data FROM events WHERE session_id = ? AND kind = 'round_completed'", sid
        )
        payloads = [json.loads(e["data"]) for e in events]
        assert [p["evaluation"] for p in payloads] == ["participants"] * ROUNDS
        assert [p["participant_eval"]["reports"] for p in payloads] == [3] * ROUNDS
    finally:
        c.procs.stop_all()
