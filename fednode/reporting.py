"""The data of a session report, read from a ledger (online through the admin channel, or
offline from a node's data dir after the node has stopped, as after `fedctl demo`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fednode.ledger import Ledger


def last_sla(ledger: Ledger) -> dict[str, Any] | None:
    """The SLA the coordinator ran with, as it recorded it at its last start."""
    event = ledger.latest_event("sla")
    return event["data"].get("sla") if event is not None else None


def build_report(
    ledger: Ledger,
    session_id: str,
    *,
    sla: dict[str, Any] | None = None,
    online: set[str] | frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """Everything `fedctl report` renders: summary, quality per round, peers, alerts."""
    session = ledger.get_session(session_id)
    selected: set[str] = set()
    for r in ledger.rounds(session_id):
        selected.update(r["selected"])
    latest = ledger.latest_participant_quality(session_id=session_id)
    known = {p["peer_id"]: p for p in ledger.participants()}
    peers = []
    for pid in sorted(selected):
        q = latest.get(pid) or {}
        peers.append(
            {
                "peer_id": pid,
                "overall_score": q.get("overall_score"),
                "performance_score": q.get("performance_score"),
                "reliability_score": q.get("reliability_score"),
                "network_score": q.get("network_score"),
                "resource_score": q.get("resource_score"),
                "uptime": q.get("uptime"),
                "latency_ms": q.get("latency_ms"),
                "task_completion_rate": q.get("task_completion_rate"),
                "error_rate": q.get("error_rate"),
                "training_time_ms": q.get("training_time_ms"),
                "trend": q.get("trend"),
                "rounds_completed": (known.get(pid) or {}).get("rounds_completed"),
                "online": pid in online,
            }
        )
    alerts = [
        a
        for a in ledger.alerts(status="all")
        if a.get("session_id") == session_id or a.get("entity_id") in selected | {session_id}
    ]
    return {
        "session": ledger.summary(session_id),
        "name": session["name"],
        "rounds": session["rounds"],
        "quality": ledger.session_quality(session_id),
        "participants": peers,
        "alerts": alerts,
        "sla": sla if sla is not None else last_sla(ledger),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
