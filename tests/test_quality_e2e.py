"""The quality ledger against real conditions: real nodes, real slowness, real kills.

Each test drives a condition (a participant that trains slowly, one that is killed and comes
back, one whose stream breaks the rules) on a coordinator process with a fast heartbeat, then
checks the rows, the alerts and the actions that follow. Waiting is on the coordinator's
pushed events (with timeouts), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from fedctl.client import AdminClient, Target
from fednode.home import NodeHome
from tests.conftest import Charts, Cluster, cli, cli_json, start_cluster
from tests.test_attacks import Raw

pytestmark = pytest.mark.timeout(240)


def operator(c: Cluster) -> AdminClient:
    return AdminClient(Target(c.url, c.peer_id, c.operator_key))


async def until(
    c: Cluster, check: Callable[[AdminClient], Awaitable[bool]], timeout: float = 60
) -> None:
    """Re-check a condition on every event the coordinator pushes, until it holds."""
    async with operator(c) as client:
        await client.call("subscribe")
        async with asyncio.timeout(timeout):
            while not await check(client):
                async for _ev in client.stream():
                    break


def spec_file(tmp: Path, name: str, **fields: Any) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"name": name, **fields}))
    return path


def create(c: Cluster, spec: Path) -> str:
    return cli_json("session", "create", str(spec), target=c)["session_id"]


def start_and_watch(c: Cluster, sid: str) -> None:
    cli_json("session", "start", sid, target=c)
    cli("session", "watch", sid, "--json", check=True, target=c, timeout=180)


def online(n: int) -> Callable[[AdminClient], Awaitable[bool]]:
    async def check(client: AdminClient) -> bool:
        ps = (await client.call("participants.list"))["participants"]
        return sum(p["online"] for p in ps) == n

    return check


def future_ids(c: Cluster, n: int) -> list[str]:
    """The peer IDs participants 0..n-1 will have, so a session can list them before they
    start (a peer no open session lists is refused and retries with backoff)."""
    return [NodeHome(c.root / f"participant-{k}").init()[0].peer_id for k in range(n)]


def rows(db_path: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    try:
        return list(db.execute(sql, args))
    finally:
        db.close()


def peer_table(c: Cluster) -> dict[str, dict[str, Any]]:
    return {p["peer_id"]: p for p in cli_json("participants", "list", target=c)["participants"]}


def test_slow_participant_raises_the_training_time_alert(tmp_path: Path) -> None:
    sla = tmp_path / "sla.json"
    sla.write_text(json.dumps({"max_training_time": 800}))
    c = start_cluster(
        tmp_path / "fed", 0, "--sla", str(sla), "--heartbeat", "0.5", "--metrics", "127.0.0.1:0"
    )
    try:
        ids = future_ids(c, 3)
        sid = create(c, spec_file(tmp_path, "slow", rounds=2, participants=ids, min_participants=3))
        c.start_participant(0, 3)
        c.start_participant(1, 3)
        c.start_participant(2, 3, "--train-delay", "1.2")
        slow, fast = c.peer_ids[2], c.peer_ids[:2]
        asyncio.run(until(c, online(3)))
        start_and_watch(c, sid)

        alerts = cli_json("alerts", "list", target=c)["alerts"]
        training = [a for a in alerts if a["alert_type"] == "training_time"]
        assert [a["entity_id"] for a in training] == [slow], alerts
        assert training[0]["severity"] == "medium" and training[0]["status"] == "open"
        assert "800" in training[0]["message"]
        assert cli_json("alerts", "list", "--severity", "critical", target=c)["alerts"] == []

        peers = {
            p["peer_id"]: p for p in cli_json("participants", "list", target=c)["participants"]
        }
        assert peers[slow]["training_time_ms"] >= 1200
        assert all(peers[p]["training_time_ms"] < 800 for p in fast)
        assert all(0 < peers[p]["latency_ms"] < 500 for p in c.peer_ids)
        assert peers[slow]["quality_score"] < min(peers[p]["quality_score"] for p in fast)

        q = cli_json("quality", "session", sid, target=c)
        assert [r["round"] for r in q["rounds"]] == [1, 2]
        assert 0 < q["health_score"] <= 100

        led = c.coordinator_home.ledger_path
        per_round = rows(
            led,
            "SELECT peer_id, COUNT(*) AS n FROM participant_quality_metrics "
            "WHERE session_id = ? GROUP BY peer_id",
            sid,
        )
        assert {r["peer_id"]: r["n"] for r in per_round} == dict.fromkeys(c.peer_ids, 2)
        pings = rows(led, "SELECT rtt_ms FROM network_quality_metrics WHERE direction = 'ping'")
        assert pings and all(r["rtt_ms"] > 0 for r in pings)
        downs = rows(
            led, "SELECT bandwidth_mbps FROM network_quality_metrics WHERE direction='down'"
        )
        assert downs and all(r["bandwidth_mbps"] > 0 for r in downs)

        # The slow participant's own ledger: what it was asked, and what it took.
        tasks = rows(c.participant_homes[2].ledger_path, "SELECT * FROM participant_tasks")
        assert [(t["round"], t["status"]) for t in tasks] == [(1, "done"), (2, "done")]
        assert all(t["train_s"] >= 1.2 and t["bytes_up"] > 0 for t in tasks)
        assert tasks[0]["bytes_down"] > 0  # it fetched round 1's model by CID

        # Prometheus: the same figures
        text = urllib.request.urlopen(c.ready["metrics"], timeout=10).read().decode()
        assert f'fednode_participant_quality_score{{peer="{slow}"}}' in text
        assert f'fednode_session_health_score{{session="{sid}"}}' in text

        out = tmp_path / "report.html"
        cli("report", sid, "--format", "html", "-o", str(out), check=True, target=c)
        charts = Charts()
        charts.feed(out.read_text())
        assert len(charts.points["accuracy-chart"]) == 2
        assert len(charts.points["scores-chart"]) == 3
    finally:
        c.procs.stop_all()

    # Tampering with the alert's hash-chained event is found offline.
    db = sqlite3.connect(c.coordinator_home.ledger_path)
    with db:
        db.execute(
            "UPDATE events SET data = replace(data, 'training_time', 'nothing') "
            "WHERE kind = 'alert_raised'"
        )
    db.close()
    proc = cli("ledger", "verify", "--data-dir", str(c.coordinator_home.root), "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "LEDGER_TAMPERED"


async def test_killed_participant_loses_uptime_and_is_left_out(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0, "--heartbeat", "0.3")
    try:
        ids = future_ids(c, 3)
        sid = create(c, spec_file(tmp_path, "warm", rounds=1, participants=ids, min_participants=3))
        for k in range(3):
            c.start_participant(k, 3)
        await until(c, online(3))
        await asyncio.to_thread(start_and_watch, c, sid)
        victim = c.peer_ids[2]

        c.procs.kill("participant-2")

        async def offline(client: AdminClient) -> bool:
            ps = (await client.call("participants.list"))["participants"]
            return any(p["peer_id"] == victim and not p["online"] for p in ps)

        await until(c, offline)
        # A peer is admitted only while an open session lists it: create the next one first.
        spec = spec_file(tmp_path, "after", rounds=2, participants=c.peer_ids, min_participants=2)
        sid = create(c, spec)
        ready = {"url": c.url, "peer_id": c.peer_id}
        home = c.participant_homes[2]
        c.procs.start_participant("participant-2", home, ready, "digits:2/3")

        async def back_with_alert(client: AdminClient) -> bool:
            ps = (await client.call("participants.list"))["participants"]
            alerts = (await client.call("alerts.list", severity=["critical"]))["alerts"]
            online = any(p["peer_id"] == victim and p["online"] for p in ps)
            return online and any(
                a["alert_type"] == "uptime" and a["entity_id"] == victim for a in alerts
            )

        await until(c, back_with_alert)
        peers = {
            p["peer_id"]: p for p in cli_json("participants", "list", target=c)["participants"]
        }
        assert peers[victim]["uptime"] < 90 and peers[victim]["status"] == "alerted"
        assert all(peers[p]["uptime"] > 99 for p in c.peer_ids[:2])

        await asyncio.to_thread(start_and_watch, c, sid)
        led = c.coordinator_home.ledger_path
        selected = [
            json.loads(r["selected"])
            for r in rows(
                led, "SELECT selected FROM training_rounds WHERE session_id = ? ORDER BY round", sid
            )
        ]
        assert selected == [sorted(c.peer_ids[:2])] * 2
        actions = rows(led, "SELECT data FROM events WHERE kind = 'action' AND session_id = ?", sid)
        excluded = [json.loads(a["data"]) for a in actions]
        assert {(e["action"], e["peer_id"]) for e in excluded} == {
            ("excluded_from_selection", victim)
        }

        # The operator acknowledges the alert: the peer is readmitted to the next session.
        alert = next(
            a
            for a in cli_json("alerts", "list", "--severity", "critical", target=c)["alerts"]
            if a["entity_id"] == victim
        )
        acked = cli_json("alerts", "ack", str(alert["id"]), target=c)["alert"]
        assert acked["status"] == "acknowledged"
        spec = spec_file(tmp_path, "readmit", rounds=1, participants=c.peer_ids, min_participants=3)
        sid = create(c, spec)
        await asyncio.to_thread(start_and_watch, c, sid)
        (r,) = rows(led, "SELECT selected FROM training_rounds WHERE session_id = ?", sid)
        assert victim in json.loads(r["selected"])
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # 18 s; fast: the monitor's alert and pause actions (test_monitor.py), the
# security events of hostile frames (test_attacks.py), pause and resume (test_e2e.py)
async def test_security_violation_pauses_the_session(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0, "--heartbeat", "0.5")
    try:
        raw = Raw(c)
        members = [*future_ids(c, 3), raw.ident.peer_id]
        sid = create(
            c, spec_file(tmp_path, "sec", rounds=8, participants=members, min_participants=3)
        )
        for k in range(3):
            c.start_participant(k, 3, *(["--train-delay", "0.3"] if k == 0 else []))
        await (await raw.open()).handshake()
        assert (await raw.register()).type == "admitted"
        await until(c, online(4))  # round 1 must not start with the attacker as the third
        cli_json("session", "start", sid, target=c)

        async def started(client: AdminClient) -> bool:
            st = await client.call("session.status", session_id=sid)
            return st["current_round"] is not None

        await until(c, started)
        frame = bytearray(raw.frame("heartbeat", {"status": "idle", "ts": 0.0}))
        frame[-5] ^= 0x40  # a bit inside the signature
        await raw.ws.send(bytes(frame))
        codes = []
        with pytest.raises(ConnectionClosed):
            while True:
                env = await raw.recv()
                if env.type == "error":
                    codes.append(env.payload["code"])
        assert codes == ["BAD_SIGNATURE"]

        async def paused(client: AdminClient) -> bool:
            st = await client.call("session.status", session_id=sid)
            return st["status"] == "paused"

        await until(c, paused)
        alerts = cli_json("alerts", "list", "--severity", "critical", target=c)["alerts"]
        (alert,) = [a for a in alerts if a["alert_type"] == "security_violation"]
        assert alert["entity_id"] == raw.ident.peer_id and alert["session_id"] == sid
        assert "BAD_SIGNATURE" in alert["message"]
        led = c.coordinator_home.ledger_path
        (action,) = rows(
            led, "SELECT data FROM events WHERE kind = 'action' AND session_id = ?", sid
        )
        assert json.loads(action["data"])["action"] == "pause"

        cli_json("session", "resume", sid, target=c)
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=180)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 8
        q = cli_json("quality", "session", sid, target=c)
        assert q["latest"]["security_score"] < 100
    finally:
        c.procs.stop_all()
