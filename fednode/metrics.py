"""Prometheus exposition (``fednode run --metrics HOST:PORT``): the quality figures, and the
federation's own: sessions, rounds, evaluation, bytes, compression, privacy ε, exclusions and
alerts. docs/monitoring.md lists every metric with its labels.

prometheus-client serves them from its own HTTP server (a thread) on a private registry, so
nothing else in the process leaks into the scrape. Three feeds, none of which reads the
ledger when Prometheus scrapes:

* the quality monitor (fednode.monitor) sets the per-peer and per-session scores as it
  computes them, each published round's evaluation, and each local-DP ε a peer reports;
* every event on the coordinator's one road (``EventBus.tap``, ``on_event``): session
  states, the round that runs, the last round's updates and duration, central DP's ε,
  alerts raised, acknowledged and resolved; O(1) per event;
* the ledger's sums (``Ledger.session_figures``, ``Ledger.active_alerts``): once at start
  (what a restarted node had already done) and once per finished round (``after_round``),
  so the totals are the ledger's own and survive restarts.

Labels take bounded values only: session IDs (the coordinator makes them), peer IDs (checked
in the handshake), and words from fixed lists (session states, round statuses, severities,
metric names, directions). Nothing a peer writes becomes a label. Only what was measured is
set: a figure never measured has no sample, rather than a misleading zero.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fednode.quality import ParticipantObservation, ParticipantScores, SessionScores
from protocol import events
from protocol.alerts import SEVERITIES, AlertStatus
from protocol.lifecycle import RoundStatus, SessionState
from protocol.messages import EVAL_METRICS

if TYPE_CHECKING:
    from fednode.ledger import Ledger

log = logging.getLogger("fednode.metrics")

PARTS = ("performance", "reliability", "network", "resource")
#: The statuses a finished round ends in (a running round is not counted yet).
FINISHED = tuple(s.value for s in RoundStatus if s is not RoundStatus.RUNNING)
ACTIVE = (AlertStatus.OPEN.value, AlertStatus.ACKNOWLEDGED.value)
STATES = frozenset(s.value for s in SessionState)
LEVELS = frozenset(s.value for s in SEVERITIES)
DIRECTIONS = ("up", "down")  # up: participants to the coordinator
#: The event kinds on_event reads; every other kind costs one set lookup.
_KINDS = frozenset({"session", "round_started", "round_completed", "central_dp", "alert"})


@dataclass(frozen=True, slots=True)
class _Alert:
    severity: str
    status: str
    alert_type: str
    session_id: str | None


class _SessionTotals(Collector):
    """The ledger's per-session sums as counters, and the compression ratios, from the
    snapshot the event loop last handed over. A scrape runs in the HTTP server's thread and
    reads that dict only; it is replaced whole, never changed in place."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, Any]] = {}

    def update(self, figures: Mapping[str, dict[str, Any]]) -> None:
        self.figures = {**self.figures, **figures}

    def collect(self) -> Iterator[Metric]:
        figures = self.figures
        rounds = CounterMetricFamily(
            "fednode_session_rounds",
            "finished rounds of the session by status (completed, failed, rejected, aborted)",
            labels=["session", "status"],
        )
        wire = CounterMetricFamily(
            "fednode_session_bytes",
            "bytes on the wire in the session's rounds, by direction (up: to the coordinator)",
            labels=["session", "direction"],
        )
        updates = CounterMetricFamily(
            "fednode_session_update_bytes",
            "accepted updates' bytes by direction, on the wire and raw (float32, uncompressed)",
            labels=["session", "direction", "measure"],
        )
        ratio = GaugeMetricFamily(
            "fednode_session_compression_ratio",
            "raw / wire bytes of the accepted updates, by direction (1 = no compression)",
            labels=["session", "direction"],
        )
        excluded = CounterMetricFamily(
            "fednode_session_excluded_updates",
            "updates outlier detection left out of the session's aggregates",
            labels=["session"],
        )
        for sid, f in figures.items():
            for status in FINISHED:
                rounds.add_metric([sid, status], f["rounds_by_status"].get(status, 0))
            wire.add_metric([sid, "up"], f["bytes_up"])
            wire.add_metric([sid, "down"], f["bytes_down"])
            for direction in DIRECTIONS:
                on_wire, raw = f["update_bytes"][direction]
                updates.add_metric([sid, direction, "wire"], on_wire)
                updates.add_metric([sid, direction, "raw"], raw)
                if on_wire > 0 and raw > 0:
                    ratio.add_metric([sid, direction], raw / on_wire)
            excluded.add_metric([sid], f["excluded_updates"])
        yield from (rounds, wire, updates, ratio, excluded)


class Exporter:
    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # --- quality (fednode.monitor) ---------------------------------------------------
        self.score = Gauge(
            "fednode_participant_quality_score", "overall score 0..100", ["peer"], registry=r
        )
        self.part = Gauge(
            "fednode_participant_part_score",
            "performance/reliability/network/resource score 0..100",
            ["peer", "part"],
            registry=r,
        )
        self.uptime = Gauge(
            "fednode_participant_uptime_percent",
            "connected share of the window",
            ["peer"],
            registry=r,
        )
        self.latency = Gauge(
            "fednode_participant_latency_ms", "median ping round trip", ["peer"], registry=r
        )
        self.bandwidth = Gauge(
            "fednode_participant_bandwidth_mbps", "model download rate", ["peer"], registry=r
        )
        self.training = Gauge(
            "fednode_participant_training_time_ms",
            "median local training time",
            ["peer"],
            registry=r,
        )
        self.completion = Gauge(
            "fednode_participant_task_completion_percent",
            "selected tasks completed",
            ["peer"],
            registry=r,
        )
        self.online = Gauge("fednode_participant_online", "1 when connected", ["peer"], registry=r)
        self.health = Gauge(
            "fednode_session_health_score", "session health 0..100", ["session"], registry=r
        )
        self.session_part = Gauge(
            "fednode_session_part_score",
            "session health parts 0..100",
            ["session", "part"],
            registry=r,
        )
        self.round_metric = Gauge(
            "fednode_round_metric",
            "the last published round's evaluation, by metric (accuracy, roc_auc, mae, r2, loss)",
            ["session", "metric"],
            registry=r,
        )
        self.privacy_epsilon = Gauge(
            "fednode_privacy_epsilon",
            "local DP-SGD: the ε a participant reported spending in the session so far",
            ["session", "peer"],
            registry=r,
        )
        # --- the federation (events and the ledger's sums) --------------------------------
        self.sessions = Gauge(
            "fednode_sessions", "sessions on this coordinator by state", ["state"], registry=r
        )
        self.current_round = Gauge(
            "fednode_session_current_round",
            "the round the session runs, or ran last (0 = none yet)",
            ["session"],
            registry=r,
        )
        self.rounds_planned = Gauge(
            "fednode_session_rounds_planned",
            "the rounds its spec asks for",
            ["session"],
            registry=r,
        )
        self.round_duration = Gauge(
            "fednode_round_duration_seconds",
            "the last completed round's duration",
            ["session"],
            registry=r,
        )
        self.round_updates = Gauge(
            "fednode_round_updates",
            "the last completed round's selected participants by outcome: aggregated, dropped "
            "(no update), excluded (outlier detection left it out)",
            ["session", "outcome"],
            registry=r,
        )
        self.session_epsilon = Gauge(
            "fednode_session_privacy_epsilon",
            "the session's privacy ε so far: central_dp (the noisy aggregates' accounting) or "
            "local_dp (the largest ε a participant reported)",
            ["session", "mechanism"],
            registry=r,
        )
        self.quarantined = Gauge(
            "fednode_session_quarantined_peers",
            "peers quarantined in the session (an open quarantined alert: not selected)",
            ["session"],
            registry=r,
        )
        self.peers_excluded = Gauge(
            "fednode_peers_excluded",
            "peers left out of selection: by an operator, or by an open critical alert "
            "(quarantined peers among them)",
            ["reason"],
            registry=r,
        )
        self.alerts_open = Gauge(
            "fednode_alerts_open",
            "open (unacknowledged) alerts by severity",
            ["severity"],
            registry=r,
        )
        self.alerts_acked = Gauge(
            "fednode_alerts_acknowledged",
            "acknowledged alerts not yet resolved, by severity",
            ["severity"],
            registry=r,
        )
        self.connected = Gauge(
            "fednode_participants_connected", "participants connected now", registry=r
        )
        self.storage_ok = Gauge(
            "fednode_storage_healthy",
            "1 while the ledger and the store take writes, 0 during a storage outage",
            registry=r,
        )
        self.totals = _SessionTotals()
        r.register(self.totals)
        for state in SessionState:  # a state with no session is a 0, not a missing series
            self.sessions.labels(state.value).set(0)
        for severity in SEVERITIES:
            self.alerts_open.labels(severity.value).set(0)
            self.alerts_acked.labels(severity.value).set(0)
        self._states: dict[str, str] = {}
        self._alerts: dict[int, _Alert] = {}
        self._alert_counts: Counter[tuple[str, str]] = Counter()
        self._quarantined: Counter[str] = Counter()
        self._local_epsilon: dict[str, float] = {}
        self._ledger: Ledger | None = None
        self.server, self._thread = start_http_server(port, addr=host, registry=r)
        bound = self.server.server_address
        self.url = f"http://{bound[0]}:{bound[1]}/metrics"

    @staticmethod
    def _set(g: Gauge, labels: tuple[str, ...], value: Any) -> None:
        if value is not None:
            g.labels(*labels).set(float(value))

    # --- from the quality monitor ----------------------------------------------------------

    def participant(
        self, peer: str, obs: ParticipantObservation, s: ParticipantScores, online: bool
    ) -> None:
        self._set(self.score, (peer,), s.overall)
        for part in PARTS:
            self._set(self.part, (peer, part), getattr(s, part))
        self._set(self.uptime, (peer,), obs.uptime_pct)
        self._set(self.latency, (peer,), obs.latency_ms)
        self._set(self.bandwidth, (peer,), obs.bandwidth_mbps)
        self._set(self.training, (peer,), obs.training_time_ms)
        self._set(self.completion, (peer,), s.task_completion_rate)
        self.online.labels(peer).set(1.0 if online else 0.0)

    def session(self, session_id: str, s: SessionScores) -> None:
        self._set(self.health, (session_id,), s.health)
        for part in (
            "convergence",
            "participant_quality",
            "data_integrity",
            "network_efficiency",
            "security_score",
            "privacy_compliance",
        ):
            self._set(self.session_part, (session_id, part), getattr(s, part))

    def round(self, session_id: str, metrics: Mapping[str, float], loss: float | None) -> None:
        """The round's figures by name. The label takes only EVAL_METRICS names and "loss",
        so a peer's report cannot grow the scrape (the ledger checked the names already)."""
        for name, value in metrics.items():
            if name in EVAL_METRICS:
                self._set(self.round_metric, (session_id, name), value)
        self._set(self.round_metric, (session_id, "loss"), loss)

    def privacy(self, session_id: str, peer: str, epsilon: float | None) -> None:
        """A participant's ε in the session (an accepted update's dp_epsilon), and the
        session's largest so far."""
        if epsilon is None:
            return
        self._set(self.privacy_epsilon, (session_id, peer), epsilon)
        top = max(float(epsilon), self._local_epsilon.get(session_id, 0.0))
        self._local_epsilon[session_id] = top
        self.session_epsilon.labels(session_id, "local_dp").set(top)

    def peers_left_out(self, by_operator: int, by_alert: int) -> None:
        self.peers_excluded.labels("operator").set(by_operator)
        self.peers_excluded.labels("alert").set(by_alert)

    # --- the node's own state, read when Prometheus scrapes -------------------------------

    def watch(self, connected: Callable[[], int], storage_ok: Callable[[], bool]) -> None:
        """Figures the scrape reads live (in the server's thread): each callable must only
        read a value (a dict's length, an attribute), never wait or write."""
        self.connected.set_function(lambda: float(connected()))
        self.storage_ok.set_function(lambda: 1.0 if storage_ok() else 0.0)

    # --- the ledger's sums: at start, and once per round -----------------------------------

    def load(self, ledger: Ledger) -> None:
        """What the ledger holds already (a restarted coordinator's sessions, rounds and
        alerts), and the ledger to read a new session's figures from."""
        self._ledger = ledger
        figures = ledger.session_figures()
        self.refresh(figures)
        for sid, f in figures.items():
            if f["rounds_by_status"].get(RoundStatus.COMPLETED.value):
                self.round(sid, f["metrics"], f["loss"])
        self.reset_alerts(ledger.active_alerts())

    def refresh(self, figures: Mapping[str, dict[str, Any]]) -> None:
        """Sessions' figures from ``Ledger.session_figures``."""
        self.totals.update(figures)
        for sid, f in figures.items():
            self._state(sid, f["status"])
            self.rounds_planned.labels(sid).set(f["rounds"])
            self.current_round.labels(sid).set(f["current_round"])

    def reset_alerts(self, rows: list[dict[str, Any]]) -> None:
        """Every active alert from the ledger (``Ledger.active_alerts``): corrects anything
        the events missed. The storage outage's alert (id -1) lives in memory only: kept."""
        for sid in list(self._quarantined):
            self._quarantined[sid] = 0
            self.quarantined.labels(sid).set(0)
        outage = self._alerts.get(-1)
        self._alerts.clear()
        self._alert_counts.clear()
        for severity in SEVERITIES:
            self.alerts_open.labels(severity.value).set(0)
            self.alerts_acked.labels(severity.value).set(0)
        if outage is not None:
            self._alert_put(-1, outage)
        for row in rows:
            self._alert_put(row["id"], self._alert_of(row))

    # --- the one road of events (EventBus.tap) ---------------------------------------------

    def on_event(self, kind: str, data: dict[str, Any], session_id: str | None) -> None:
        """One published event; never raises (it runs inside the ledger's write)."""
        if kind not in _KINDS:
            return
        try:
            self._on_event(events.parse_event(kind, data), session_id)
        except Exception:  # a figure lost must not lose the event
            log.exception("metrics: %s event not counted", kind)

    def _on_event(self, ev: events.Parsed, sid: str | None) -> None:
        if isinstance(ev, events.Alert):
            if ev.id is None:
                return
            row = {
                "severity": ev.severity,
                "status": ev.status,
                "alert_type": ev.alert_type,
                "session_id": ev.session_id,
            }
            self._alert_put(ev.id, None if ev.change == "resolved" else self._alert_of(row))
            return
        if not sid:
            return
        if isinstance(ev, events.Session):
            if sid not in self._states and self._ledger is not None:
                self.refresh(self._ledger.session_figures(sid))  # new: its planned rounds
            self._state(sid, ev.status)
        elif isinstance(ev, events.RoundStarted):
            self.current_round.labels(sid).set(ev.round)
        elif isinstance(ev, events.RoundCompleted):
            self._set(self.round_duration, (sid,), ev.duration_s)
            self.round_updates.labels(sid, "aggregated").set(len(ev.participants))
            self.round_updates.labels(sid, "dropped").set(len(ev.dropped))
            self.round_updates.labels(sid, "excluded").set(len(ev.excluded))
        elif isinstance(ev, events.CentralDp):
            self._set(self.session_epsilon, (sid, "central_dp"), ev.epsilon)

    def _state(self, sid: str, state: str) -> None:
        if state not in STATES:
            return
        old = self._states.get(sid)
        if old == state:
            return
        if old is not None:
            self.sessions.labels(old).dec()
        self._states[sid] = state
        self.sessions.labels(state).inc()

    @staticmethod
    def _alert_of(row: Mapping[str, Any]) -> _Alert | None:
        """The alert as counted, or None when it no longer counts (resolved) or carries a
        word outside the fixed lists (nothing else may become a label)."""
        severity, status = row.get("severity"), row.get("status") or AlertStatus.OPEN.value
        if severity not in LEVELS or status not in ACTIVE:
            return None
        return _Alert(severity, status, str(row.get("alert_type") or ""), row.get("session_id"))

    def _alert_put(self, alert_id: int, alert: _Alert | None) -> None:
        """Alert ``alert_id`` is now ``alert`` (None: gone): the counts move by one."""
        old = self._alerts.pop(alert_id, None)
        if old is not None:
            self._count(old, -1)
        if alert is not None:
            self._alerts[alert_id] = alert
            self._count(alert, 1)

    def _count(self, a: _Alert, step: int) -> None:
        key = (a.severity, a.status)
        self._alert_counts[key] += step
        gauge = self.alerts_open if a.status == AlertStatus.OPEN.value else self.alerts_acked
        gauge.labels(a.severity).set(self._alert_counts[key])
        # one open quarantined alert per (peer, session): the ledger updates a repeat in place
        if a.alert_type == "quarantined" and a.status == AlertStatus.OPEN.value and a.session_id:
            self._quarantined[a.session_id] += step
            self.quarantined.labels(a.session_id).set(self._quarantined[a.session_id])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def scrape_config(
    targets: Sequence[str],
    *,
    interval_s: int = 15,
    job: str = "fednode",
    rules: Sequence[str] = (),
) -> str:
    """A prometheus.yml that scrapes fednode coordinators at ``targets`` (HOST:PORT of their
    ``--metrics``) every ``interval_s`` seconds (`fednode prometheus-config`). JSON is YAML,
    so Prometheus reads it as it is; ``rules``: rule files to load (deploy/prometheus/alerts.yml
    has fednode's alert rules)."""
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": f"{interval_s}s",
            # a scrape may not outlast its interval (Prometheus refuses the config)
            "scrape_timeout": f"{min(interval_s, 10)}s",
            "evaluation_interval": f"{interval_s}s",
        },
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    if rules:
        config["rule_files"] = list(rules)
    return json.dumps(config, indent=2) + "\n"
