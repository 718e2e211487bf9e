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


def latest_audit(ledger: Ledger, session_id: str) -> dict[str, Any] | None:
    """The session's newest privacy audit (an ``audit`` event: protocol.audit's record, with
    ``by`` and the event's ``ts``), or None if none was run."""
    found = None
    since = 0
    while batch := ledger.events(session_id, since_id=since, limit=1000):
        for event in batch:
            if event["kind"] == "audit":
                found = {**event["data"], "ts": event["ts"]}
        since = batch[-1]["id"]
    return found


def audit_inputs(ledger: Ledger, session_id: str) -> dict[str, Any]:
    """What a privacy audit needs of a coordinator's ledger (admin ``audit.inputs``): the
    session's spec and current model, and the dataset each contributor (a peer with an
    accepted update) registered: the members, in the participants' own words."""
    session = ledger.get_session(session_id)
    contributors = {
        u["participant"] for u in ledger.updates(session_id) if u["status"] == "accepted"
    }
    known = {p["peer_id"]: p for p in ledger.participants()}
    return {
        "session_id": session_id,
        "status": session["status"],
        "spec": session["spec"],
        "model_cid": session["model_cid"],
        "datasets": {
            pid: str((known.get(pid) or {}).get("dataset") or "") for pid in sorted(contributors)
        },
    }


# What `fedctl privacy` shows of each participant, from its latest update's dp_* figures
PRIVACY_FIGURES = (
    "epsilon",
    "spent_epsilon",
    "delta",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "accountant",
    "max_epsilon",
)


def privacy_report(ledger: Ledger, session_id: str) -> dict[str, Any]:
    """The session's privacy spending (local DP-SGD, fednode.dpsgd): the spec's settings,
    per participant the figures of its latest update that reported them (``epsilon``: its
    ε in this session; ``spent_epsilon``: over all its training on that data; ``round``),
    the session's ε (for local DP the largest participant's), and the rounds participants
    declined because their own budget would have been passed (LIMIT_EPSILON)."""
    session = ledger.get_session(session_id)
    settings = session["spec"].get("privacy") or {}
    latest: dict[str, dict[str, Any]] = {}
    for u in ledger.updates(session_id):  # oldest first: the last one wins
        if u.get("dp_epsilon") is not None:
            latest[u["participant"]] = {
                "peer_id": u["participant"],
                "round": u["round"],
                **{k: u.get(f"dp_{k}") for k in PRIVACY_FIGURES},
            }
    declined = []
    since = 0
    while batch := ledger.events(session_id, since_id=since, limit=1000):
        for e in batch:
            if e["kind"] == "task_error" and e["data"].get("code") == "LIMIT_EPSILON":
                declined.append(
                    {k: e["data"].get(k) for k in ("peer_id", "round", "code", "message")}
                )
        since = batch[-1]["id"]
    peers = [latest[p] for p in sorted(latest)]
    return {
        "mode": settings.get("mode", "none"),
        "target_epsilon": settings.get("target_epsilon"),
        "delta": settings.get("delta"),
        "accountant": settings.get("accountant"),
        "epsilon": max((p["epsilon"] for p in peers), default=None),
        "participants": peers,
        "declined": declined,
    }


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
        "spec": session["spec"],  # as validated at creation (`fedctl export mlflow` logs it)
        "quality": ledger.session_quality(session_id),
        "participants": peers,
        "alerts": alerts,
        "sla": sla if sla is not None else last_sla(ledger),
        "privacy": privacy_report(ledger, session_id),  # local DP spending (fedctl privacy)
        "privacy_audit": latest_audit(ledger, session_id),  # None: no audit was run
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
