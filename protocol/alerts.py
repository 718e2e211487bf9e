"""Alerts: their severities in order, every alert type with its severity, and their states.

``SEVERITIES`` runs from the most severe down; ``severity_rank`` sorts by it (an unknown
word last). ``ALERT_SEVERITY`` gives every alert type its severity. Two families:

* rule alerts (``RULE_ALERT_TYPES``): fednode.quality evaluates a condition after each
  round or scoring pass; the alert resolves by itself when the condition clears;
* event alerts (``EVENT_ALERT_TYPES``): raised by something that happened (a security
  violation, a rolled-back or rejected model, storage that failed) and only ever
  acknowledged by an operator, never resolved by a rule.

An alert is ``open``, ``acknowledged`` (an operator saw it) or ``resolved``; ``active`` is
the first two. ``alerts.list`` filters by ``ALERT_FILTERS``. A pushed ``alert`` event says
what changed (``AlertChange``). An open ``critical`` alert on a participant keeps it out of
selection (``HOLDS_SELECTION``).

Pure: no I/O.
"""

from __future__ import annotations

from enum import StrEnum


class Severity(StrEnum):
    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class AlertStatus(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


class AlertChange(StrEnum):
    """What a pushed ``alert`` event reports (protocol.events.Alert.change)."""

    RAISED = "raised"
    RESOLVED = "resolved"
    ACKNOWLEDGED = "acknowledged"


#: Most severe first.
SEVERITIES: tuple[Severity, ...] = tuple(Severity)
_RANK = {s.value: i for i, s in enumerate(SEVERITIES)}

#: The severity whose open alert on a participant keeps it out of selection.
HOLDS_SELECTION = Severity.CRITICAL

#: Every alert type with its severity.
ALERT_SEVERITY: dict[str, Severity] = {
    "task_completion": Severity.CRITICAL,
    "uptime": Severity.CRITICAL,
    "quality_score": Severity.HIGH,
    "error_rate": Severity.HIGH,
    "latency": Severity.MEDIUM,
    "heartbeat": Severity.MEDIUM,
    "training_time": Severity.MEDIUM,
    "resource_efficiency": Severity.LOW,
    "connection_stability": Severity.LOW,
    "model_quality": Severity.MEDIUM,
    "data_quality": Severity.MEDIUM,
    "privacy_compliance": Severity.HIGH,
    "anomaly": Severity.MEDIUM,
    "security_score": Severity.HIGH,
    "convergence": Severity.LOW,
    "security_violation": Severity.CRITICAL,
    "model_divergence": Severity.HIGH,
    "aggregate_rejected": Severity.HIGH,
    "storage_unavailable": Severity.CRITICAL,
    # outlier detection left the peer's updates out in K of its last M rounds
    # (spec robustness.quarantine_after / quarantine_window): no selection until acknowledged
    "quarantined": Severity.CRITICAL,
    # a participant reported local-DP spending of at least 80 % of its own --max-epsilon
    # (fednode.dpsgd.BUDGET_WARNING_SHARE): it will soon decline rounds
    "privacy_budget": Severity.MEDIUM,
}

EVENT_ALERT_TYPES: frozenset[str] = frozenset(
    {
        "security_violation",
        "model_divergence",
        "aggregate_rejected",
        "storage_unavailable",
        "quarantined",
        "privacy_budget",
    }
)
RULE_ALERT_TYPES: frozenset[str] = frozenset(ALERT_SEVERITY) - EVENT_ALERT_TYPES
ALERT_TYPES: frozenset[str] = frozenset(ALERT_SEVERITY)

ALERT_STATUSES: tuple[AlertStatus, ...] = tuple(AlertStatus)
ACTIVE_ALERT_STATUSES: tuple[AlertStatus, ...] = (AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED)
#: What ``alerts.list`` accepts as ``status``: one state, ``active`` (open or acknowledged)
#: or ``all``; ``active`` is the default.
ALERT_FILTERS: tuple[str, ...] = ("active", *ALERT_STATUSES, "all")


def severity_rank(severity: object) -> int:
    """0 for the most severe; an unknown word (a newer node's, or garbage) sorts last."""
    return _RANK.get(severity, len(_RANK)) if isinstance(severity, str) else len(_RANK)


def is_severe(severity: object) -> bool:
    """Critical or high: what a client shows as bad rather than as a warning."""
    return severity_rank(severity) <= _RANK[Severity.HIGH]
