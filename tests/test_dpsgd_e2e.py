"""Local DP-SGD end to end: real processes on 127.0.0.1. A participant whose own budget
(`fednode run --max-epsilon`) lies between the ε of one and of two rounds trains round 1,
declines rounds 2 and 3 (LIMIT_EPSILON, in both ledgers), the session completes with the
others, and a second session on the same data finds the budget spent: declined at once.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fednode import dpsgd
from fednode.data import load_partition
from protocol import spec as specmod
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, online, rows, spec_file, until

# Two sessions and a dozen fedctl calls: 33 s measured on the shared 2-core box (load 5), so
# slow; test_dpsgd.py's participant test is the fast check of the same decline arithmetic.
pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

PRIVACY = {"mode": "local_dp", "target_epsilon": 3.0, "delta": 1e-5}
TRAINING = {"local_epochs": 1, "batch_size": 64}


def _round_epsilons(rounds: int) -> tuple[float, float]:
    """ε after one and after two rounds of participant 1 (digits:1/2), as it will plan them."""
    s = specmod.validate({"rounds": rounds, "training": TRAINING, "privacy": PRIVACY})
    n = len(load_partition("digits:1/2", features="none", partition="iid", seed=0))
    dp = dpsgd.plan_round(s["privacy"], s["training"], rounds, n)
    return (
        dpsgd.epsilon([dp.entry], dp.delta, dp.accountant),
        dpsgd.epsilon([dp.entry] * 2, dp.delta, dp.accountant),
    )


def _create(c, tmp_path: Path, name: str, ids: list[str], rounds: int) -> str:
    spec = spec_file(
        tmp_path,
        name,
        rounds=rounds,
        participants=ids,
        min_participants=1,
        training=TRAINING,
        privacy=PRIVACY,
    )
    return create(c, spec)


def _run(c, sid: str, rounds: int) -> None:
    asyncio.run(until(c, online(2)))  # every round selects both
    assert cli_json("session", "start", sid, target=c)["status"] == "running"
    cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
    status = cli_json("session", "status", sid, target=c)
    assert status["status"] == "completed" and status["rounds_completed"] == rounds, status


def test_a_participant_declines_past_its_own_budget_across_sessions(tmp_path: Path) -> None:
    eps1, eps2 = _round_epsilons(3)
    # within one round's ε and the next, and at least 80 % spent after round 1 (the alert)
    limit = min((eps1 + eps2) / 2, eps1 / dpsgd.BUDGET_WARNING_SHARE * 0.999)
    assert eps1 < limit < eps2
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 2)
        sid = _create(c, tmp_path, "dp1", ids, 3)  # first: so they are admitted at once
        c.start_participant(0, 2)
        home = c.start_participant(1, 2, "--max-epsilon", repr(limit))
        _run(c, sid, 3)

        # the participant's own ledger: one round spent, then declined with the reason
        spent = rows(home.ledger_path, "SELECT * FROM privacy_spending ORDER BY id")
        assert [(r["session_id"], r["round"]) for r in spent] == [(sid, 1)]
        assert spent[0]["dataset"] == "digits:1/2"
        declined = [
            json.loads(r["data"])
            for r in rows(
                home.ledger_path,
                "SELECT data FROM events WHERE session_id = ? AND kind = 'task_declined'",
                sid,
            )
        ]
        assert [(d["round"], d["code"]) for d in declined] == [(2, "LIMIT_EPSILON")] * 1 + [
            (3, "LIMIT_EPSILON")
        ]
        assert "--max-epsilon" in declined[0]["message"]
        warned = rows(home.ledger_path, "SELECT 1 FROM events WHERE kind = 'privacy_budget'")
        assert len(warned) == 1

        # the coordinator's: the task errors, the figures, the alert, fedctl privacy
        led = c.coordinator_home.ledger_path
        errors = [
            json.loads(r["data"])
            for r in rows(
                led, "SELECT data FROM events WHERE session_id = ? AND kind = 'task_error'", sid
            )
        ]
        assert sorted(e["round"] for e in errors if e["code"] == "LIMIT_EPSILON") == [2, 3]
        report = cli_json("privacy", sid, target=c)
        peers = {p["peer_id"]: p for p in report["participants"]}
        assert set(peers) == set(ids)
        assert peers[ids[1]]["max_epsilon"] == pytest.approx(limit)
        assert peers[ids[1]]["epsilon"] == pytest.approx(eps1, rel=1e-9)
        assert peers[ids[1]]["round"] == 1 and peers[ids[0]]["round"] == 3
        assert all(p["epsilon"] <= 3.0 for p in peers.values())
        assert report["epsilon"] == max(p["epsilon"] for p in peers.values())
        assert [(d["peer_id"], d["round"]) for d in report["declined"]] == [
            (ids[1], 2),
            (ids[1], 3),
        ]
        alerts = cli_json("alerts", "list", target=c)["alerts"]
        assert [a["entity_id"] for a in alerts if a["alert_type"] == "privacy_budget"] == [ids[1]]

        # a second session on the same data: the budget carried over, declined at round 1
        sid2 = _create(c, tmp_path, "dp2", ids, 1)
        _run(c, sid2, 1)
        again = rows(
            home.ledger_path,
            "SELECT data FROM events WHERE session_id = ? AND kind = 'task_declined'",
            sid2,
        )
        assert [json.loads(r["data"])["round"] for r in again] == [1]
        assert len(rows(home.ledger_path, "SELECT 1 FROM privacy_spending")) == 1
        assert [p["peer_id"] for p in cli_json("privacy", sid2, target=c)["participants"]] == [
            ids[0]
        ]
    finally:
        c.procs.stop_all()
