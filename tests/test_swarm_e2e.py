"""`fednode swarm` end to end: one process of 50 virtual participants against a real
coordinator process on 127.0.0.1. The coordinator sees 50 peers, each with its own key,
connection and accepted updates; each virtual participant's own ledger records its tasks."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, rows, spec_file

pytestmark = pytest.mark.timeout(180)

N = 50
WORKERS = 2


def test_a_swarm_of_50_completes_a_session(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        spec = spec_file(
            tmp_path,
            "swarm",
            rounds=2,
            min_participants=N,
            model={"kind": "logreg"},
            training={"local_epochs": 1, "batch_size": 16},
            round_timeout_s=60,
        )
        sid = create(c, spec)
        token = cli_json("invite", "--session", sid, "--uses", str(N), target=c)["token"]
        root = tmp_path / "swarm"
        ready = c.procs.start_swarm(
            root, c.ready, N, "--join-token", token, "--workers", str(WORKERS)
        )
        peers = ready["peer_ids"]
        assert ready["event"] == "started" and len(set(peers)) == N, ready
        assert Path(ready["peers_file"]).read_text().split() == peers

        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status

        # The coordinator: 50 distinct peers, each with an accepted update in both rounds.
        got = rows(
            c.coordinator_home.ledger_path,
            "SELECT participant, COUNT(DISTINCT round) AS n FROM client_updates "
            "WHERE session_id = ? AND status = 'accepted' GROUP BY participant",
            sid,
        )
        assert {r["participant"]: r["n"] for r in got} == {p: 2 for p in peers}

        # Each virtual participant: its own ledger holds its own two tasks, done.
        for k in range(N):
            tasks = rows(
                root / f"virtual-{k}" / "ledger.db",
                "SELECT round, status, coordinator FROM participant_tasks WHERE session_id = ?",
                sid,
            )
            assert [(t["round"], t["status"]) for t in tasks] == [(1, "done"), (2, "done")], k
            assert {t["coordinator"] for t in tasks} == {c.peer_id}

        # Stopped: its last line says the pool held (never more than --workers at once).
        proc = c.procs.procs["swarm"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert proc.stdout is not None
        stopped = json.loads(proc.stdout.readline())
        assert stopped["event"] == "stopped" and stopped["failed"] == 0, stopped
        assert 1 <= stopped["peak_trainings"] <= WORKERS, stopped
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # about 13 s on 2 cores; the swarm itself is tested above
def test_the_demo_runs_40_participants_as_one_swarm(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = cli(
        *("--key", str(tmp_path / "op.key"), "demo", "--participants", "40", "--swarm"),
        *("--rounds", "2", "--workdir", str(work), "--json"),
        timeout=170,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout)
    assert summary["status"] == "completed" and summary["participants"] == 40, summary
    assert len({t["participant"] for t in summary["traffic"]}) == 40
    assert len(list(work.glob("swarm/virtual-*/ledger.db"))) == 40
    assert not list(work.glob("participant-*"))  # no process of its own for any of them
