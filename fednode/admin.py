"""The coordinator's admin channel: operations for fedctl and the dashboard.

Operators and viewers speak the same authenticated protocol as participants; an ``admin``
message names an operation and its arguments, the reply carries the result or a typed
error. Viewers may only call read operations. ``subscribe`` answers at once with a snapshot
and then streams ``event`` messages until the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from fednode import factories, versions
from fednode.ledger import accuracy_of
from fednode.storage_guard import describe, is_storage_fault
from protocol import messages, modelspec, spec, tokens
from protocol.alerts import ALERT_FILTERS, SEVERITIES
from protocol.car import walk_dag
from protocol.cid import normalize_cid
from protocol.errors import (
    FednodeError,
    NotAuthorized,
    StateError,
    StorageUnavailable,
    ValidationError,
)
from protocol.lifecycle import TERMINAL, Action, SessionState
from protocol.operations import PARTICIPANT_SORTS, PARTICIPANTS_PAGE_MAX, READ_OPS, Op

if TYPE_CHECKING:
    from fednode.services import AdminHost, SessionControl
    from fednode.transport import Connection

log = logging.getLogger("fednode.admin")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]] | dict[str, Any]]


def _arg(args: dict[str, Any], name: str, kind: type = str) -> Any:
    value = args.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValidationError(f"admin argument {name!r} must be a {kind.__name__}")
    return value


_SORT_KEYS: dict[str, str] = {
    "peer_id": "peer_id",
    "score": "quality_score",
    "last_seen": "last_seen",
    "rounds": "rounds_completed",
    "latency": "latency_ms",
    "uptime": "uptime",
}


def page_participants(rows: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    """One page of participants.list (filtered, sorted, cut), its total and a summary of
    every peer seen: what an operator of a thousand peers reads instead of a thousand rows.
    Rows without the sort's figure go last, either way."""
    sort = args.get("sort", "peer_id")
    if sort not in _SORT_KEYS:
        raise ValidationError(
            f"sort {sort!r} is not one of {', '.join(PARTICIPANT_SORTS)}", code="USAGE"
        )
    offset = args.get("offset", 0)
    limit = args.get("limit", PARTICIPANTS_PAGE_MAX)
    for name, value, lo in (("offset", offset, 0), ("limit", limit, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValidationError(f"{name} must be an integer >= {lo}", code="USAGE")
    limit = min(limit, PARTICIPANTS_PAGE_MAX)
    status = args.get("status")
    if status is not None and status not in ("active", "alerted", "excluded"):
        raise ValidationError(f"status {status!r}: use active, alerted or excluded", code="USAGE")
    key = _SORT_KEYS[sort]
    chosen = [
        r
        for r in rows
        if (not args.get("online") or r["online"]) and (status is None or r["status"] == status)
    ]
    known = sorted((r for r in chosen if r.get(key) is not None), key=lambda r: r[key])
    if args.get("desc"):
        known.reverse()
    ordered = known + [r for r in chosen if r.get(key) is None]
    scores = sorted(r["quality_score"] for r in rows if r.get("quality_score") is not None)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    return {
        "participants": ordered[offset : offset + limit],
        "total": len(ordered),
        "offset": offset,
        "summary": {
            "seen": len(rows),
            "online": sum(1 for r in rows if r["online"]),
            "status": by_status,
            "score": {
                "min": scores[0],
                "median": scores[len(scores) // 2],
                "max": scores[-1],
            }
            if scores
            else None,
        },
    }


class AdminAPI:
    def __init__(self, coord: AdminHost):
        self.coord = coord
        self.ops: dict[str, Handler] = {
            Op.NODE_INFO: self.node_info,
            Op.SESSION_CREATE: self.session_create,
            Op.SESSION_START: lambda a: self.session_action(Action.START, a),
            Op.SESSION_STOP: lambda a: self.session_action(Action.STOP, a),
            Op.SESSION_PAUSE: lambda a: self.session_action(Action.PAUSE, a),
            Op.SESSION_RESUME: lambda a: self.session_action(Action.RESUME, a),
            Op.SESSION_ROLLBACK: self.session_rollback,
            Op.SESSION_STATUS: self.session_status,
            Op.SESSION_LIST: self.session_list,
            Op.PARTICIPANTS_LIST: self.participants_list,
            Op.MODEL_LIST: self.model_list,
            Op.MODEL_GET: self.model_get,
            Op.MODEL_EXPORT: self.model_export,
            Op.INVITE_CREATE: self.invite_create,
            Op.ALERTS_LIST: self.alerts_list,
            Op.ALERTS_ACK: self.alerts_ack,
            Op.QUALITY_SESSION: self.quality_session,
            Op.REPORT: self.report,
            Op.EVENTS_LIST: self.events_list,
            Op.PARTICIPANTS_EXCLUDE: lambda a: self.participant_exclusion(a, True),
            Op.PARTICIPANTS_READMIT: lambda a: self.participant_exclusion(a, False),
            Op.AUDIT_INPUTS: self.audit_inputs,
            Op.AUDIT_RECORD: self.audit_record,
        }

    async def serve(self, conn: Connection, role: str) -> None:
        forwarders: list[asyncio.Task[None]] = []
        try:
            async for _env, msg in conn.messages(self.coord._refused):
                if not isinstance(msg, messages.Admin):
                    await conn.send_error(
                        ValidationError(
                            f"operators send 'admin' messages, not {msg.TYPE!r}",
                            code="UNEXPECTED_MESSAGE",
                        )
                    )
                    continue
                reply = await self._call(conn, role, msg, forwarders)
                await conn.send(reply)
        except ConnectionClosed:
            pass
        finally:
            for task in forwarders:
                task.cancel()

    async def _call(
        self, conn: Connection, role: str, msg: messages.Admin, forwarders: list[asyncio.Task[None]]
    ) -> messages.AdminReply:
        try:
            if role != "operator" and msg.op not in READ_OPS:
                raise NotAuthorized(
                    f"{conn.peer_id} is a viewer and may not call {msg.op!r}",
                    hint="ask for an operator key (--operator on the coordinator)",
                )
            if msg.op == Op.SUBSCRIBE:
                result = self.subscribe(conn, msg.args, forwarders)
            else:
                handler = self.ops.get(msg.op)
                if handler is None:
                    raise ValidationError(
                        f"unknown admin operation {msg.op!r}",
                        hint="known: " + ", ".join(sorted(self.ops)),
                        code="UNKNOWN_OP",
                    )
                result = handler({**msg.args, "_by": conn.peer_id})
                if asyncio.iscoroutine(result):
                    result = await result
            return messages.AdminReply(id=msg.id, ok=True, result=result, error={})
        except FednodeError as err:
            return messages.AdminReply(id=msg.id, ok=False, result={}, error=err.to_dict())
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            # A write that met a full disk or a held lock: nothing was committed (each write
            # is one transaction); the operator is told, the node keeps serving.
            self.coord.guard.fault(exc)
            err = StorageUnavailable(f"{msg.op!r} could not be written: {describe(exc)}")
            return messages.AdminReply(id=msg.id, ok=False, result={}, error=err.to_dict())

    # --- operations --------------------------------------------------------------------

    def node_info(self, args: dict[str, Any]) -> dict[str, Any]:
        c = self.coord
        return {
            "peer_id": c.identity.peer_id,
            "ledger": str(c.ledger.path),
            "participants_online": len(c.peers),
            "sessions": len(c.sessions),
            "started_at": c.started_at,
        }

    async def session_create(self, args: dict[str, Any]) -> dict[str, Any]:
        checked = spec.validate(args.get("spec"))
        if modelspec.is_python(checked["model"]):
            # The coordinator builds the initial model and evaluates it: a python model it
            # may not build (not allowed, or its code differs from the fingerprint) is
            # refused now, not at the session's start. The factory runs off the event loop.
            await asyncio.to_thread(factories.verify, checked["model"])
        return {"session_id": self.coord.create_session(checked)}

    def session_action(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        run = self.coord.session(_arg(args, "session_id"))
        if action == "start" and run.state is SessionState.CREATED:
            self._require_joinable(run)
        state = run.act(action)
        return {"session_id": run.session_id, "status": state.value}

    def _require_joinable(self, run: SessionControl) -> None:
        """Refuse to start a session that nobody may join (Coordinator.allowed): no peer
        listed in its spec, nobody admitted by an invite yet, and no invite that can still
        admit someone (unexpired, with uses left). Started, it would wait
        wait_participants_s for nobody and fail; refused, the operator learns why now."""
        sid = run.session_id
        if run.spec["participants"] or self.coord.ledger.members(sid):
            return
        if not self.coord.ledger.has_usable_invite(sid, time.time()):
            raise StateError(
                f"session {sid} lists no participants and has no usable invite: nobody may join",
                hint=f"invite participants with `fedctl invite --session {sid}` (each passes "
                "the token to `fednode run --join-token`), or list their peer IDs in the "
                "spec's participants and create the session again",
            )

    def session_rollback(self, args: dict[str, Any]) -> dict[str, Any]:
        """Operator only: the next round starts from round ``round``'s version."""
        run = self.coord.session(_arg(args, "session_id"))
        to_round = _arg(args, "round", int)
        if to_round < 0:
            raise ValidationError(
                f"round {to_round}: rounds are numbered from 0 (the initial model)"
            )
        return run.request_rollback(to_round, str(args.get("_by", "")))

    def session_status(self, args: dict[str, Any]) -> dict[str, Any]:
        run = self.coord.session(_arg(args, "session_id"))
        summary = self.coord.ledger.summary(run.session_id)
        rnd = run.round
        summary["current_round"] = (
            None
            if rnd is None
            else {
                "round": rnd.number,
                "phase": rnd.phase.value,
                "selected": rnd.selected,
                "received": sorted(rnd.received),
                "failed": rnd.failed,
                "started_at": rnd.started_at,
                "deadline_s": run.spec["round_timeout_s"],
            }
        )
        summary["rounds"] = run.spec["rounds"]
        summary["name"] = run.spec["name"]
        summary["storage"] = self.coord.guard.info()["state"]  # ok | retrying | down
        summary["paused_for_storage"] = run.paused_for_storage
        # paused with nothing in flight: the pause has taken effect (the round that ran
        # when it came has ended)
        summary["idle"] = run.idle
        return summary

    def session_list(self, args: dict[str, Any]) -> dict[str, Any]:
        out = []
        for row in self.coord.ledger.list_sessions():
            out.append(
                {
                    "session_id": row["session_id"],
                    "name": row["name"],
                    "status": row["status"],
                    "round": row["rounds_completed"] or 0,
                    "rounds": row["rounds"],
                    "participants": self.coord.ledger.summary(row["session_id"])["participants"],
                    "accuracy": accuracy_of(row["final_accuracy"], row.get("final_metrics")),
                    "metrics": row.get("final_metrics") or {},  # by name; {} = not measured
                }
            )
        return {"sessions": out}

    def participants_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every peer seen, with what the monitor measures of it now (not a stale row)."""
        out = []
        monitor = self.coord.monitor
        alerted = monitor.alerted()
        latest = self.coord.ledger.latest_participant_quality()
        last = self.coord.ledger.last_contributions()
        now = time.time()
        for row in self.coord.ledger.participants():
            pid = row["peer_id"]
            online = pid in self.coord.peers
            entry: dict[str, Any] = {
                "peer_id": pid,
                "online": online,
                "quality_score": row.get("quality_score"),
                "latency_ms": None,
                "uptime": row.get("uptime"),
                "last_seen": row["last_seen"],
                # excluded: by an operator; alerted: an open critical alert keeps it out
                "status": "excluded"
                if row.get("excluded")
                else ("alerted" if pid in alerted else "active"),
                "excluded": bool(row.get("excluded")),
                "last_round": last.get(pid),
                "address": row.get("address"),
                "dataset": row.get("dataset"),
                "num_examples": row.get("num_examples"),
                "rounds_completed": row.get("rounds_completed"),
                "trend": (latest.get(pid) or {}).get("trend"),
            }
            if pid in monitor.peers:
                obs, scores = monitor.score_peer(pid, now)
                entry.update(
                    quality_score=scores.overall,
                    latency_ms=obs.latency_ms,
                    uptime=obs.uptime_pct,
                    heartbeat_consistency=obs.heartbeat_consistency_pct,
                    bandwidth_mbps=obs.bandwidth_mbps,
                    training_time_ms=obs.training_time_ms,
                    task_completion_rate=scores.task_completion_rate,
                    error_rate=scores.error_rate,
                    scores={
                        "performance": scores.performance,
                        "reliability": scores.reliability,
                        "network": scores.network,
                        "resource": scores.resource,
                    },
                )
            out.append(entry)
        return page_participants(out, args)

    # --- quality -------------------------------------------------------------------

    def alerts_list(self, args: dict[str, Any]) -> dict[str, Any]:
        status = args.get("status", "active")
        if status not in ALERT_FILTERS:
            raise ValidationError(
                f"alert status {status!r} is not one of {', '.join(ALERT_FILTERS)}"
            )
        severity = args.get("severity") or []
        if not isinstance(severity, list) or not all(s in SEVERITIES for s in severity):
            raise ValidationError(
                f"severity {severity!r}: use one or more of {', '.join(SEVERITIES)}",
                code="USAGE",
            )
        session_id = args.get("session_id") or None
        rows = self.coord.ledger.alerts(
            status=status, severity=set(severity) or None, session_id=session_id
        )
        outage = self.coord.storage_alert()  # not in the ledger until storage is back
        shown = status in ("active", "open", "all") and not session_id
        if outage is not None and shown and (not severity or outage["severity"] in severity):
            rows = [outage, *rows]
        return {"alerts": rows}

    def alerts_ack(self, args: dict[str, Any]) -> dict[str, Any]:
        alert_id = _arg(args, "alert_id", int)
        row = self.coord.ledger.ack_alert(alert_id, str(args.get("_by", "")), time.time())
        self.coord.events.publish("alert", {"change": "acknowledged", **row}, row.get("session_id"))
        return {"alert": row}

    def events_list(self, args: dict[str, Any]) -> dict[str, Any]:
        """The most recent ledger events (oldest first), of one session or of the node."""
        limit = args.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise ValidationError("limit must be an integer in [1, 1000]")
        session_id = args.get("session_id") or None
        keys = ("id", "ts", "kind", "session_id", "entity_id", "data")  # not the chain's hashes
        rows = self.coord.ledger.latest_events(session_id, limit)
        return {"events": [{k: r[k] for k in keys} for r in rows]}

    def participant_exclusion(self, args: dict[str, Any], exclude: bool) -> dict[str, Any]:
        """An operator's call: keep a peer out of every session's selection, or let it back."""
        peer_id = _arg(args, "peer_id")
        ledger = self.coord.ledger
        ledger.get_participant(peer_id)  # NotFound for a peer never seen
        reason = str(args.get("reason") or "")
        ledger.upsert_participant(peer_id, excluded=exclude)
        action = "exclude" if exclude else "readmit"
        self.coord.record(
            "action",
            None,
            {
                "action": action,
                "peer_id": peer_id,
                "by": str(args.get("_by", "")),
                "reason": reason,
            },
            entity_id=peer_id,
        )
        self.coord.events.publish(
            "participant", {"peer_id": peer_id, "excluded": exclude, "reason": reason}
        )
        self.coord.wake_sessions()
        entry = next(
            p for p in self.participants_list({})["participants"] if p["peer_id"] == peer_id
        )
        return {"participant": entry}

    def quality_session(self, args: dict[str, Any]) -> dict[str, Any]:
        run = self.coord.session(_arg(args, "session_id"))
        rows = self.coord.ledger.session_quality(run.session_id)
        return {
            "session_id": run.session_id,
            "health_score": rows[-1]["health_score"] if rows else None,
            "latest": rows[-1] if rows else None,
            "rounds": rows,
            "sla": self.coord.sla.to_dict(),
        }

    def report(self, args: dict[str, Any]) -> dict[str, Any]:
        from fednode.reporting import build_report

        run = self.coord.session(_arg(args, "session_id"))
        return build_report(
            self.coord.ledger,
            run.session_id,
            sla=self.coord.sla.to_dict(),
            online=set(self.coord.peers),
        )

    def audit_inputs(self, args: dict[str, Any]) -> dict[str, Any]:
        """Operator only: what a privacy audit needs (fedctl audit privacy runs it where
        the members' data is; the coordinator holds none)."""
        from fednode.reporting import audit_inputs

        run = self.coord.session(_arg(args, "session_id"))
        return audit_inputs(self.coord.ledger, run.session_id)

    def audit_record(self, args: dict[str, Any]) -> dict[str, Any]:
        """Operator only: keep an audit's figures (protocol.audit bounds each) as an
        ``audit`` event in the session's hash chain, on the one road of events."""
        from protocol.audit import check_record

        run = self.coord.session(_arg(args, "session_id"))
        record = {**check_record(args.get("audit")), "by": str(args.get("_by", ""))}
        self.coord.record("audit", run.session_id, record)
        return {"session_id": run.session_id}

    def model_list(self, args: dict[str, Any]) -> dict[str, Any]:
        run = self.coord.session(_arg(args, "session_id"))
        models = self.coord.ledger.models(run.session_id)
        status = versions.statuses(
            [m["round"] for m in models], [m["rolled_back_at"] is not None for m in models]
        )
        return {
            "models": [
                {
                    "round": m["round"],
                    "cid": m["cid"],
                    "accuracy": accuracy_of(m["accuracy"], m.get("metrics")),
                    "loss": m["loss"],
                    "metrics": m.get("metrics") or {},  # by name; {} = not measured
                    "size": m["size"],
                    "parent_cid": m["parent_cid"],
                    "status": st,  # current | superseded | rolled_back
                    "rolled_back_to": m["rolled_back_to"],
                }
                for m, st in zip(models, status, strict=True)
            ]
        }

    def model_get(self, args: dict[str, Any]) -> dict[str, Any]:
        cid = _arg(args, "cid")
        return {"cid": cid, "data": self.coord.store.get(cid)}

    async def model_export(self, args: dict[str, Any]) -> dict[str, Any]:
        """Every block of a model's DAG, depth first (the order of a CAR; protocol.car)."""
        root = normalize_cid(_arg(args, "cid"))
        store = self.coord.store

        def blocks() -> list[dict[str, Any]]:
            return [{"cid": b.cid, "data": b.data} for b in walk_dag(root, store.get_block)]

        return {"cid": root, "blocks": await asyncio.to_thread(blocks)}

    def invite_create(self, args: dict[str, Any]) -> dict[str, Any]:
        run = self.coord.session(_arg(args, "session_id"))
        if run.state in TERMINAL:
            raise StateError(f"session {run.session_id} is {run.state.value}: nobody can join")
        expires_s = args.get("expires_s", 86400.0)
        uses = args.get("uses", 1)
        if not isinstance(expires_s, int | float) or not 0 < expires_s <= 366 * 86400:
            raise ValidationError("expires_s must be in (0, 31622400] seconds")
        if not isinstance(uses, int) or isinstance(uses, bool) or not 1 <= uses <= 100_000:
            raise ValidationError("uses must be an integer in [1, 100000]")
        expires_at = time.time() + float(expires_s)
        token, tok = tokens.issue(
            self.coord.identity, run.session_id, expires_at=expires_at, uses=uses
        )
        self.coord.ledger.record_token(
            tok.token_id,
            run.session_id,
            expires_at=expires_at,
            max_uses=uses,
            created_by=str(args.get("_by", "")),
        )
        self.coord.record(
            "invite",
            run.session_id,
            {"token_id": tok.token_id, "uses": uses, "expires_at": expires_at},
        )
        return {
            "token": token,
            "token_id": tok.token_id,
            "session_id": run.session_id,
            "expires_at": expires_at,
            "uses": uses,
        }

    def subscribe(
        self, conn: Connection, args: dict[str, Any], forwarders: list[asyncio.Task[None]]
    ) -> dict[str, Any]:
        session_id = args.get("session_id") or ""
        snapshot: dict[str, Any] = {
            "participants": self.participants_list({})["participants"],
            "sessions": self.session_list({})["sessions"],
            "alerts": self.alerts_list({})["alerts"],
            "events": self.events_list({"session_id": session_id})["events"],
        }
        if session_id:
            snapshot["session"] = self.session_status({"session_id": session_id})
        sub = self.coord.events.subscribe(session_id)

        async def forward() -> None:
            try:
                while True:
                    event = await sub.queue.get()
                    if sub.lagged:  # tell a slow subscriber what it missed, then go on
                        await conn.send(
                            messages.Event(
                                kind="lagged", data={"dropped": sub.lagged}, ts=event["ts"]
                            )
                        )
                        sub.lagged = 0
                    await conn.send(
                        messages.Event(kind=event["kind"], data=event["data"], ts=event["ts"]),
                        event["session_id"],
                    )
            except ConnectionClosed:
                pass
            finally:
                self.coord.events.unsubscribe(sub)

        forwarders.append(asyncio.create_task(forward()))
        return {"snapshot": snapshot}
