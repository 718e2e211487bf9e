"""The Prometheus endpoint and the probes of a real federation: a coordinator (`--metrics`,
`--health`) and two participants (`--health`) as processes on 127.0.0.1 run a two-round
session. Its /metrics, scraped over HTTP and read with prometheus-client's parser, says what
the ledger says (through the admin channel); a real Prometheus (Debian's `prometheus`),
started from a generated config while the federation comes up, scrapes it and answers the
figures through its HTTP API; each participant's readiness went from 503 to 200 as it
joined; SIGTERM stops a participant (exit 0) and the coordinator counts one fewer.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fednode.home import NodeHome
from fednode.metrics import scrape_config
from protocol import spec as specmod
from tests.conftest import Cluster, start_cluster
from tests.test_health_e2e import free_port, poll, probe
from tests.test_quality_e2e import future_ids, operator, spec_file

pytestmark = pytest.mark.timeout(180)

ROUNDS = 2
DEADLINE_S = 60.0


@dataclass
class Fed:
    c: Cluster
    sid: str
    status: dict[str, Any]  # `session status` once it completed
    alerts: list[dict[str, Any]]  # the active alerts then
    health: list[str]  # each participant's probe URL
    readiness: list[list[int | None]]  # each participant's readyz statuses as it started
    prometheus: str | None  # its URL; None when it is not installed


def start_prometheus(root: Path, target: str, c: Cluster) -> str | None:
    """Prometheus scraping ``target`` every second from a generated config, its TSDB under
    ``root``; stopped with the cluster's processes. None when it is not installed."""
    exe = shutil.which("prometheus")
    if exe is None:
        return None
    config = root / "prometheus.yml"
    config.write_text(scrape_config([target], interval_s=1))
    port = free_port()
    log = (root / "prometheus.log").open("wb")
    c.procs.logs.append(log)  # closed by stop_all
    c.procs.procs["prometheus"] = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    return f"http://127.0.0.1:{port}"


async def drive(c: Cluster, spec: Path, start: Callable[[], None]) -> tuple[str, dict, list]:
    """Create the session, ``start`` its participants, start it once both are online and
    wait, on pushed events, until it completed; its status and the active alerts then."""
    async with operator(c) as client:
        sid = (await client.call("session.create", spec=specmod.load(spec)))["session_id"]
        start()
        await client.call("subscribe")
        async with asyncio.timeout(DEADLINE_S):
            while True:
                ps = (await client.call("participants.list"))["participants"]
                if sum(p["online"] for p in ps) == 2:
                    break
                async for _ev in client.stream():
                    break
            await client.call("session.start", session_id=sid)
            while (status := await client.call("session.status", session_id=sid))[
                "status"
            ] != "completed":
                async for _ev in client.stream():
                    break
        alerts = (await client.call("alerts.list", status="active"))["alerts"]
    return sid, status, alerts


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    root = tmp_path_factory.mktemp("metrics")
    c = start_cluster(root / "fed", 0, "--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0")
    try:
        target = c.ready["metrics"].removeprefix("http://").removesuffix("/metrics")
        prometheus = start_prometheus(root, target, c)  # it starts while the rest comes up
        ids = future_ids(c, 2)
        spec = spec_file(root, "metrics", rounds=ROUNDS, participants=ids, min_participants=2)
        health = [f"http://127.0.0.1:{free_port()}" for _ in ids]
        readiness: list[list[int | None]] = [[], []]

        def watch(k: int) -> None:  # each participant's readiness, from before it listens
            readiness[k] = poll(health[k] + "/readyz", lambda s, _b: s == 200)

        def start() -> None:
            for k in range(2):
                home = NodeHome(c.root / f"participant-{k}")
                extra = ("--health", health[k].removeprefix("http://"))
                c.procs.start_participant(
                    f"participant-{k}", home, c.ready, f"digits:{k}/2", *extra
                )
                c.participant_homes.append(home)
                threading.Thread(target=watch, args=(k,), daemon=True).start()

        sid, status, alerts = asyncio.run(drive(c, spec, start))
        yield Fed(c, sid, status, alerts, health, readiness, prometheus)
    finally:
        c.procs.stop_all()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_participants_were_ready_only_once_joined(fed: Fed) -> None:
    for seen in fed.readiness:
        # refused while the process starts, 503 while it loads and dials, 200 once admitted
        assert seen[-2:] == [503, 200] and set(seen) <= {None, 503, 200}, fed.readiness
    for url in fed.health:
        status, body = probe(url + "/readyz")
        assert status == 200 and body["checks"] == {"joined": True, "ledger_writable": True}


def test_the_endpoint_says_what_the_ledger_says(fed: Fed) -> None:
    s = scrape(fed.c.ready["metrics"])

    def v(name: str, **labels: str) -> float | None:
        return s.get((name, frozenset(labels.items())))

    sid, st = fed.sid, fed.status
    assert st["status"] == "completed" and st["rounds_completed"] == ROUNDS, st
    assert v("fednode_session_rounds_total", session=sid, status="completed") == ROUNDS
    for other in ("failed", "rejected", "aborted"):
        assert v("fednode_session_rounds_total", session=sid, status=other) == 0
    assert v("fednode_session_current_round", session=sid) == ROUNDS
    assert v("fednode_session_rounds_planned", session=sid) == ROUNDS
    assert v("fednode_sessions", state="completed") == 1
    assert v("fednode_sessions", state="running") == 0
    accuracy = v("fednode_round_metric", session=sid, metric="accuracy")
    assert accuracy is not None and accuracy > 0 and accuracy == pytest.approx(st["final_accuracy"])
    assert v("fednode_round_metric", session=sid, metric="loss") == pytest.approx(st["final_loss"])
    for direction in ("up", "down"):
        wire = v("fednode_session_bytes_total", session=sid, direction=direction)
        assert wire == st[f"bytes_{direction}"] and wire > 0, (direction, wire)
        comp = st["compression"]
        upd = {"session": sid, "direction": direction}
        assert (
            v("fednode_session_update_bytes_total", measure="wire", **upd)
            == comp[f"{direction}_bytes"]
        )
        assert (
            v("fednode_session_update_bytes_total", measure="raw", **upd)
            == comp[f"{direction}_raw"]
        )
    ratio = v("fednode_session_compression_ratio", session=sid, direction="up")
    assert ratio == pytest.approx(st["compression"]["up_ratio"])
    assert v("fednode_round_updates", session=sid, outcome="aggregated") == 2
    assert v("fednode_round_updates", session=sid, outcome="dropped") == 0
    assert v("fednode_session_excluded_updates_total", session=sid) == 0
    duration = v("fednode_round_duration_seconds", session=sid)
    assert duration is not None and duration == pytest.approx(st["history"][-1]["duration_s"])
    for severity in ("critical", "high", "medium", "low"):
        opened = sum(a["status"] == "open" and a["severity"] == severity for a in fed.alerts)
        assert v("fednode_alerts_open", severity=severity) == opened, fed.alerts
    assert v("fednode_participants_connected") == 2
    assert v("fednode_storage_healthy") == 1
    assert v("fednode_peers_excluded", reason="operator") == 0
    # labels: the coordinator's session IDs, checked peer IDs, and fixed words only
    peers = set(fed.c.peer_ids)
    for (_name, labels), _value in s.items():
        for key, value in labels:
            if key == "session":
                assert value == sid
            elif key == "peer":
                assert value in peers


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            answer = json.loads(resp.read())
    except OSError:  # not listening yet
        return []
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_prometheus_scrapes_the_coordinator(fed: Fed) -> None:
    if fed.prometheus is None:
        pytest.skip("prometheus not installed: apt-get install prometheus")
    sid = fed.sid
    wanted = {
        f'fednode_session_rounds_total{{session="{sid}",status="completed"}}': ROUNDS,
        f'fednode_round_metric{{session="{sid}",metric="accuracy"}}': None,  # > 0
        f'fednode_session_bytes_total{{session="{sid}",direction="up"}}': None,
        'up{job="fednode"}': 1,
    }
    got: dict[str, float] = {}
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end and len(got) < len(wanted):
        for promql, expected in wanted.items():
            result = query(fed.prometheus, promql)
            if result:
                value = float(result[0]["value"][1])
                if (expected is None and value > 0) or value == expected:
                    got[promql] = value
        if len(got) < len(wanted):
            time.sleep(0.5)  # the poll's period (scrapes are every second)
    assert set(got) == set(wanted), (got, fed.prometheus)
    # what Prometheus holds is what the endpoint serves
    accuracy = got[f'fednode_round_metric{{session="{sid}",metric="accuracy"}}']
    assert accuracy == pytest.approx(fed.status["final_accuracy"])


def test_a_participant_stops_on_sigterm(fed: Fed) -> None:
    """Last in the module: it takes a participant away."""
    proc = fed.c.procs.procs["participant-1"]
    proc.terminate()
    assert proc.wait(15) == 0
    assert probe(fed.health[1] + "/livez") == (None, {})
    end = time.monotonic() + DEADLINE_S
    while scrape(fed.c.ready["metrics"])[("fednode_participants_connected", frozenset())] != 1:
        assert time.monotonic() < end, "the coordinator still counts two participants"
        time.sleep(0.1)
