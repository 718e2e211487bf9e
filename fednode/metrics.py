"""Prometheus exposition of the quality figures (``fednode run --metrics HOST:PORT``).

The same figures as the ledger's quality tables, as gauges, through prometheus-client's own
HTTP server on a private registry (so nothing else in the process leaks into the scrape).
Only what the monitor measured is set: a figure that was never measured has no sample, rather
than a misleading zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from fednode.quality import ParticipantObservation, ParticipantScores, SessionScores
from protocol.messages import EVAL_METRICS

PARTS = ("performance", "reliability", "network", "resource")


class Exporter:
    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.server, self._thread = start_http_server(port, addr=host, registry=r)
        bound = self.server.server_address
        self.url = f"http://{bound[0]}:{bound[1]}/metrics"

    @staticmethod
    def _set(g: Gauge, labels: tuple[str, ...], value: Any) -> None:
        if value is not None:
            g.labels(*labels).set(float(value))

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
        """A participant's ε in the session (an accepted update's dp_epsilon)."""
        self._set(self.privacy_epsilon, (session_id, peer), epsilon)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
