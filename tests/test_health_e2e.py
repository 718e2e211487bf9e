"""`fednode run --health`: the probes of real node processes on 127.0.0.1 follow the node's
life. A coordinator's port refuses before it starts, readiness is 200 once it accepts
handshakes and 503 while another process holds its ledger's write lock; a participant is
not ready until its coordinator admits it; SIGTERM stops either with exit status 0 and the
port closes. (What the server answers in each state, SIGTERM's 503 included: test_health.py.)
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fednode.home import NodeHome
from protocol import spec as specmod
from tests.conftest import Cluster, start_cluster
from tests.test_quality_e2e import operator, spec_file

pytestmark = pytest.mark.timeout(90)

DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(url: str) -> tuple[int | None, dict[str, Any]]:
    """(status, body) of one GET; (None, {}) when the port refuses."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            return None, {}
        raise


def poll(url: str, until: Callable[[int | None, dict[str, Any]], bool]) -> list[int | None]:
    """Probe every 50 ms until ``until(status, body)`` holds; the statuses seen, in order
    (repeats collapsed). Fails at the deadline."""
    seen: list[int | None] = []
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        status, body = probe(url)
        if not seen or seen[-1] != status:
            seen.append(status)
        if until(status, body):
            return seen
        time.sleep(0.05)  # the poll's period, not a synchronisation: the condition decides
    raise AssertionError(f"{url}: condition not met in {DEADLINE_S} s; statuses {seen}")


def stops_cleanly(proc: subprocess.Popen[bytes], health: str) -> None:
    """SIGTERM: exit status 0 within seconds, and the probe port closed."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert probe(health + "/livez") == (None, {})


def test_coordinator_probes_follow_its_life(tmp_path: Path) -> None:
    """Refused while it starts, 200 once it listens, 503 while another process holds its
    ledger's write lock (and alive meanwhile), 200 again, SIGTERM: exit 0, port closed."""
    home = NodeHome(tmp_path / "coordinator")
    home.init()
    port = free_port()
    health = f"http://127.0.0.1:{port}"
    args = ["run", "--role", "coordinator", "--listen", "127.0.0.1:0"]
    args += ["--data-dir", str(home.root), "--health", f"127.0.0.1:{port}"]
    with (tmp_path / "coordinator.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fednode", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            seen = poll(health + "/readyz", lambda s, _b: s == 200)
            # refused while the process starts, perhaps 503 before it listens, then 200
            assert seen[0] is None and seen[-1] == 200 and set(seen) <= {None, 503, 200}, seen
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["event"] == "listening" and ready["health"] == health, ready
            status, body = probe(health + "/readyz")
            assert status == 200 and body == {
                "ready": True,
                "stopping": False,
                "checks": {"accepting": True, "storage": True, "ledger_writable": True},
            }
            assert probe(health + "/livez") == (200, {"live": True})

            # another process (a backup, sqlite3 opened by hand) holds the ledger's write lock
            holder = sqlite3.connect(home.ledger_path, isolation_level=None)
            try:
                holder.execute("BEGIN EXCLUSIVE")
                poll(health + "/readyz", lambda s, _b: s == 503)
                status, body = probe(health + "/readyz")
                assert body["checks"]["ledger_writable"] is False, body
                assert body["checks"]["accepting"] is True, body
                assert probe(health + "/livez")[0] == 200  # the loop does not wait on it
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            poll(health + "/readyz", lambda s, b: s == 200 and b["checks"]["ledger_writable"])

            stops_cleanly(proc, health)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


async def create_session(c: Cluster, spec: Path) -> str:
    """Over the admin channel, in this process (fedctl's own process costs seconds here)."""
    async with operator(c) as client:
        created = await client.call("session.create", spec=specmod.load(spec))
    return str(created["session_id"])


@pytest.mark.slow  # ~9 s; test_metrics_e2e.py covers 503-then-200 on joining, and SIGTERM
def test_participant_is_ready_once_admitted_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Connected and handshaken is not enough: until a session admits it, 503."""
    c = start_cluster(tmp_path / "fed", 0)
    try:
        home = NodeHome(c.root / "participant-0")
        peer_id = home.init()[0].peer_id
        port = free_port()
        health = f"http://127.0.0.1:{port}"
        c.procs.start_participant(
            "participant-0", home, c.ready, "digits:0/1", "--health", f"127.0.0.1:{port}"
        )
        # no open session lists it: connected and handshaken, but refused, so not ready
        poll(health + "/readyz", lambda s, _b: s is not None)
        status, body = probe(health + "/readyz")
        assert status == 503 and body["checks"] == {"joined": False, "ledger_writable": True}
        asyncio.run(
            create_session(c, spec_file(tmp_path, "health", rounds=1, participants=[peer_id]))
        )
        seen = poll(health + "/readyz", lambda s, _b: s == 200)
        assert seen[-2:] == [503, 200], seen
        status, body = probe(health + "/readyz")
        assert body["checks"] == {"joined": True, "ledger_writable": True}, body
        stops_cleanly(c.procs.procs["participant-0"], health)
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # ~10 s; the probe server and its checks are covered by the fast tests
def test_a_swarm_is_ready_once_every_participant_is_admitted(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        line = c.procs.start_swarm(tmp_path / "swarm", c.ready, 2, "--health", "127.0.0.1:0")
        health = line["health"]
        status, body = probe(health + "/readyz")  # no session admits them yet
        assert status == 503 and body["checks"] == {"joined": False, "ledger_writable": True}
        spec = spec_file(tmp_path, "swarm", rounds=1, participants=line["peer_ids"])
        asyncio.run(create_session(c, spec))
        poll(health + "/readyz", lambda s, _b: s == 200)
        stops_cleanly(c.procs.procs["swarm"], health)
    finally:
        c.procs.stop_all()
