"""`fednode swarm --ray local --actors 2` end to end: 50 virtual participants in two Ray
actors (worker processes of a local Ray instance) against a real coordinator process on
127.0.0.1. A session of 50 completes, each peer's updates accepted in both rounds; then one
actor is killed, the driver reports it and the other group runs on until stopped.

Needs the optional extra (`pip install 'fednode[ray]'`): skipped without it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, rows, spec_file

pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'fednode[ray]'")

# Ray's start (its head processes, then two workers importing torch) takes most of it.
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

N = 50
ACTORS = 2


def test_50_participants_in_2_ray_actors_complete_a_session(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        spec = spec_file(
            tmp_path,
            "ray-swarm",
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
            root, c.ready, N, "--join-token", token, "--ray", "local", "--actors", str(ACTORS)
        )
        peers = ready["peer_ids"]
        assert ready["event"] == "started" and len(set(peers)) == N, ready
        placed = ready["ray"]
        assert placed["actors"] == ACTORS
        groups = placed["groups"]
        assert [(g["first"], g["count"]) for g in groups] == [(0, 25), (25, 25)]
        pids = {g["pid"] for g in groups}
        assert len(pids) == ACTORS and os.getpid() not in pids  # two processes of their own
        assert c.procs.procs["swarm"].pid not in pids
        # The actors read the identities the driver made in its data dir.
        assert Path(ready["peers_file"]).read_text().split() == peers
        assert [(root / f"virtual-{k}" / "identity.key").exists() for k in range(N)] == [True] * N

        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=150)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status
        got = rows(
            c.coordinator_home.ledger_path,
            "SELECT participant, COUNT(DISTINCT round) AS n FROM client_updates "
            "WHERE session_id = ? AND status = 'accepted' GROUP BY participant",
            sid,
        )
        assert {r["participant"]: r["n"] for r in got} == {p: 2 for p in peers}
        # Each virtual participant kept its own ledger, written by the actor hosting it.
        for k in (0, 24, 25, 49):
            tasks = rows(
                root / f"virtual-{k}" / "ledger.db",
                "SELECT round, status FROM participant_tasks WHERE session_id = ?",
                sid,
            )
            assert [(t["round"], t["status"]) for t in tasks] == [(1, "done"), (2, "done")], k

        # An actor dies: the driver reports it, the other group runs on until stopped.
        os.kill(groups[1]["pid"], signal.SIGKILL)
        proc = c.procs.procs["swarm"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 1  # an actor died: said by the exit status
        assert proc.stdout is not None
        stopped = json.loads(proc.stdout.readline())
        assert stopped["event"] == "stopped" and stopped["actors"] == ACTORS, stopped
        assert stopped["actors_failed"] == 1 and stopped["failed"] == 25, stopped
        by_actor = {g["actor"]: g for g in stopped["groups"]}
        assert by_actor[0]["ok"] and by_actor[0]["failed"] == 0  # ran until told to stop
        assert not by_actor[1]["ok"]
        log = (c.root / "logs" / "swarm.log").read_text()
        assert "ray: actor 0 hosts virtual-0..virtual-24" in log
        assert "ray: actor 1 (virtual-25..virtual-49) ended" in log
    finally:
        c.procs.stop_all(grace_s=30)
