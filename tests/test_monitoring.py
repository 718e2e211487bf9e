"""The Prometheus side, piece by piece: the ledger's sums (``Ledger.session_figures``)
against the session summary that computes them its own way, the exporter fed from a real
ledger and from events (alerts by severity, quarantines, session states, bounded labels),
read back over its HTTP endpoint; `fednode prometheus-config`; and deploy/prometheus/
checked by Prometheus's own promtool (config, rules and the rules' unit tests). A real
federation scraped by a real Prometheus: tests/test_metrics_e2e.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

import fednode.cli
from fednode.ledger import Ledger
from fednode.metrics import Exporter

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
PEERS = ["12D3KooWpeerA", "12D3KooWpeerB"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(exporter: Exporter) -> Samples:
    """Every sample of the endpoint, over HTTP, as Prometheus's text parser reads it."""
    with urllib.request.urlopen(exporter.url, timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _session(led: Ledger, sid: str, rounds: int) -> None:
    led.create_session(
        sid,
        name=sid,
        spec={"name": sid, "rounds": rounds},
        strategy="fedavg",
        secure_aggregation=False,
        rounds=rounds,
        created_at=100.0,
    )
    led.update_session(sid, status="running", started_at=100.0)


def _update(led: Ledger, sid: str, n: int, peer: str, **sizes: int) -> None:
    led.record_update(
        sid,
        n,
        participant=peer,
        samples=10,
        loss=0.5,
        bytes=sizes.get("bytes", 1000),
        duration_s=1.0,
        arrival_s=1.0,
        update_cid=None,
        received_at=100.0 + n,
        bytes_raw=sizes.get("bytes_raw", 4000),
        down_bytes=sizes.get("down_bytes", 3000),
        down_raw=sizes.get("down_raw", 6000),
    )


@pytest.fixture
def led(tmp_path: Path) -> Iterator[Ledger]:
    """Session s-a: round 1 completed (two updates, one excluded as an outlier), round 2
    failed, round 3 running; s-b: created, nothing run."""
    with Ledger(tmp_path / "ledger.db") as ledger:
        _session(ledger, "s-a", 5)
        _session(ledger, "s-b", 2)
        ledger.update_session("s-b", status="created")
        ledger.start_round("s-a", 1, selected=PEERS, model_cid_in="c0", started_at=101.0)
        _update(ledger, "s-a", 1, PEERS[0])
        _update(ledger, "s-a", 1, PEERS[1], bytes=500, down_bytes=0)
        ledger.record_scores("s-a", 1, {PEERS[1]: {"excluded": True}})
        ledger.complete_round(
            "s-a",
            1,
            ended_at=102.0,
            model_cid="c1",
            accuracy=0.75,
            loss=0.4,
            size=10,
            participants=1,
            bytes_up=1700,
            bytes_down=3100,
            metrics={"accuracy": 0.75},
        )
        ledger.start_round("s-a", 2, selected=PEERS, model_cid_in="c1", started_at=103.0)
        ledger.finish_round(
            "s-a", 2, status="failed", ended_at=104.0, bytes_up=10, bytes_down=20, reason="x"
        )
        ledger.start_round("s-a", 3, selected=PEERS, model_cid_in="c1", started_at=105.0)
        yield ledger


@pytest.fixture
def exporter() -> Iterator[Exporter]:
    e = Exporter("127.0.0.1", 0)
    try:
        yield e
    finally:
        e.close()


def test_session_figures_agree_with_the_summary(led: Ledger) -> None:
    f = led.session_figures()
    assert set(f) == {"s-a", "s-b"}
    a, summary = f["s-a"], led.summary("s-a")
    assert a["rounds_by_status"] == {"completed": 1, "failed": 1, "running": 1}
    assert (a["status"], a["rounds"], a["current_round"]) == ("running", 5, 3)
    assert (a["bytes_up"], a["bytes_down"]) == (summary["bytes_up"], summary["bytes_down"])
    comp = summary["compression"]  # the same rows summed by _traffic_totals
    assert a["update_bytes"]["up"] == (comp["up_bytes"], comp["up_raw"]) == (1500, 8000)
    assert a["update_bytes"]["down"] == (comp["down_bytes"], comp["down_raw"]) == (3000, 6000)
    assert a["excluded_updates"] == 1
    assert (a["loss"], a["metrics"]) == (0.4, {"accuracy": 0.75})
    assert f["s-b"]["rounds_by_status"] == {} and f["s-b"]["current_round"] == 0
    assert led.session_figures("s-b") == {"s-b": f["s-b"]}


def test_the_exporter_starts_from_the_ledger(led: Ledger, exporter: Exporter) -> None:
    """A restarted coordinator exports what its ledger already holds."""
    led.raise_event_alert("quarantined", "critical", PEERS[1], "s-a", "outlier", 106.0)
    led.raise_event_alert("model_divergence", "high", "s-a", "s-a", "fell", 107.0)
    exporter.load(led)
    s = scrape(exporter)
    assert value(s, "fednode_session_rounds_total", session="s-a", status="completed") == 1
    assert value(s, "fednode_session_rounds_total", session="s-a", status="failed") == 1
    assert value(s, "fednode_session_rounds_total", session="s-b", status="completed") == 0
    assert value(s, "fednode_session_current_round", session="s-a") == 3
    assert value(s, "fednode_session_rounds_planned", session="s-a") == 5
    assert value(s, "fednode_sessions", state="running") == 1
    assert value(s, "fednode_sessions", state="created") == 1
    assert value(s, "fednode_session_bytes_total", session="s-a", direction="up") == 1710
    assert value(s, "fednode_session_bytes_total", session="s-a", direction="down") == 3120
    up = {"session": "s-a", "direction": "up"}
    assert value(s, "fednode_session_update_bytes_total", measure="raw", **up) == 8000
    assert value(s, "fednode_session_update_bytes_total", measure="wire", **up) == 1500
    assert value(s, "fednode_session_compression_ratio", **up) == pytest.approx(8000 / 1500)
    assert value(s, "fednode_session_compression_ratio", session="s-b", direction="up") is None
    assert value(s, "fednode_session_excluded_updates_total", session="s-a") == 1
    assert value(s, "fednode_round_metric", session="s-a", metric="accuracy") == 0.75
    assert value(s, "fednode_round_metric", session="s-a", metric="loss") == 0.4
    assert value(s, "fednode_alerts_open", severity="critical") == 1
    assert value(s, "fednode_alerts_open", severity="high") == 1
    assert value(s, "fednode_alerts_open", severity="low") == 0
    assert value(s, "fednode_session_quarantined_peers", session="s-a") == 1


def _alert(change: str, alert_id: int, severity: str, **row: Any) -> dict[str, Any]:
    status = {"raised": "open", "acknowledged": "acknowledged", "resolved": "resolved"}[change]
    return {"change": change, "id": alert_id, "severity": severity, "status": status, **row}


def test_alerts_by_severity_follow_the_events(exporter: Exporter) -> None:
    def ev(change: str, alert_id: int, severity: str, **row: Any) -> None:
        exporter.on_event("alert", _alert(change, alert_id, severity, **row), row.get("session_id"))

    ev("raised", 1, "critical", alert_type="uptime", entity_id=PEERS[0])
    ev("raised", 2, "high", alert_type="quality_score", entity_id=PEERS[1])
    ev("raised", 2, "high", alert_type="quality_score", entity_id=PEERS[1])  # a repeat
    ev("raised", 3, "critical", alert_type="quarantined", entity_id=PEERS[1], session_id="s-a")
    s = scrape(exporter)
    assert value(s, "fednode_alerts_open", severity="critical") == 2
    assert value(s, "fednode_alerts_open", severity="high") == 1
    assert value(s, "fednode_session_quarantined_peers", session="s-a") == 1
    ev("acknowledged", 1, "critical", alert_type="uptime", entity_id=PEERS[0])
    ev("resolved", 2, "high", alert_type="quality_score", entity_id=PEERS[1])
    ev("acknowledged", 3, "critical", alert_type="quarantined", session_id="s-a")  # readmitted
    # the storage outage's alert lives in memory (id -1); its resolution says only its id
    exporter.on_event("alert", _alert("raised", -1, "critical"), None)
    s = scrape(exporter)
    assert value(s, "fednode_alerts_open", severity="critical") == 1
    assert value(s, "fednode_alerts_acknowledged", severity="critical") == 2
    assert value(s, "fednode_alerts_open", severity="high") == 0
    assert value(s, "fednode_session_quarantined_peers", session="s-a") == 0
    exporter.on_event("alert", {"change": "resolved", "id": -1}, None)
    assert value(scrape(exporter), "fednode_alerts_open", severity="critical") == 0


def test_rounds_and_states_follow_the_events(exporter: Exporter) -> None:
    exporter.on_event("session", {"status": "created", "name": "a"}, "s-a")
    exporter.on_event("session", {"status": "running"}, "s-a")
    exporter.on_event("round_started", {"round": 4, "selected": PEERS}, "s-a")
    done = {"round": 4, "duration_s": 2.5, "participants": PEERS[:1], "excluded": PEERS[1:]}
    exporter.on_event("round_completed", done, "s-a")
    exporter.on_event("central_dp", {"round": 4, "epsilon": 1.25}, "s-a")
    exporter.privacy("s-b", PEERS[0], 0.5)
    exporter.privacy("s-b", PEERS[1], 2.0)
    exporter.privacy("s-b", PEERS[0], 0.75)
    s = scrape(exporter)
    assert value(s, "fednode_sessions", state="running") == 1
    assert value(s, "fednode_sessions", state="created") == 0
    assert value(s, "fednode_session_current_round", session="s-a") == 4
    assert value(s, "fednode_round_duration_seconds", session="s-a") == 2.5
    assert value(s, "fednode_round_updates", session="s-a", outcome="aggregated") == 1
    assert value(s, "fednode_round_updates", session="s-a", outcome="excluded") == 1
    assert value(s, "fednode_round_updates", session="s-a", outcome="dropped") == 0
    assert (
        value(s, "fednode_session_privacy_epsilon", session="s-a", mechanism="central_dp") == 1.25
    )
    assert value(s, "fednode_session_privacy_epsilon", session="s-b", mechanism="local_dp") == 2.0
    assert value(s, "fednode_privacy_epsilon", session="s-b", peer=PEERS[0]) == 0.75


def test_labels_take_no_free_text(exporter: Exporter) -> None:
    """Words outside the fixed lists (a newer node's, or garbage) never become label values,
    and a malformed event costs its figure, not the ledger write it rides on."""
    exporter.on_event("alert", _alert("raised", 9, "catastrophic\n"), None)
    exporter.on_event(
        "alert", {"change": "raised", "id": 10, "severity": "high", "status": "x"}, None
    )
    exporter.on_event("session", {"status": "exploded"}, "s-a")
    exporter.on_event("round_completed", {"round": "not a number"}, "s-a")
    exporter.on_event("round_started", "not a map", "s-a")  # type: ignore[arg-type]
    exporter.round("s-a", {"made_up": 1.0, "accuracy": 0.5}, None)
    s = scrape(exporter)
    labels = {v for (_n, ls) in s for (_k, v) in ls}
    assert labels.isdisjoint({"catastrophic\n", "x", "exploded", "made_up"}), labels
    assert sum(v for (n, _l), v in s.items() if n == "fednode_alerts_open") == 0
    assert sum(v for (n, _l), v in s.items() if n == "fednode_sessions") == 0


def prometheus_config(*args: str) -> tuple[int, str]:
    """`fednode prometheus-config ARGS` through its typer app, in this process: (exit, output)."""
    result = CliRunner().invoke(fednode.cli.app, ["prometheus-config", *args])
    return result.exit_code, result.output


def test_prometheus_config_command() -> None:
    code, out = prometheus_config("10.0.0.5:9100", "c2:9100", "--interval", "1")
    assert code == 0, out
    config = json.loads(out)
    assert config["global"]["scrape_interval"] == "1s"
    assert config["global"]["scrape_timeout"] == "1s"  # never above the interval
    assert config["scrape_configs"] == [
        {
            "job_name": "fednode",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": ["10.0.0.5:9100", "c2:9100"]}],
        }
    ]
    code, out = prometheus_config("no-port")
    assert code == 2 and "TARGET 'no-port' is not HOST:PORT" in out, out
    code, out = prometheus_config("h:9100", "--job", "a b")
    assert code == 2 and "--job 'a b' is not a job name" in out, out


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed: apt-get install prometheus")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=30)


def test_the_sample_config_and_alert_rules_are_valid() -> None:
    proc = promtool("check", "config", "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout + proc.stderr


def test_the_alert_rules_fire_as_documented() -> None:
    proc = promtool("test", "rules", "alerts.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_generated_config_is_valid(tmp_path: Path) -> None:
    shutil.copy(DEPLOY / "alerts.yml", tmp_path / "alerts.yml")
    code, out = prometheus_config("127.0.0.1:9100", "--rules", "alerts.yml")
    assert code == 0, out
    (tmp_path / "prometheus.yml").write_text(out)
    proc = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
