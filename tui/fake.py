"""A scripted coordinator for tests, screenshots and the docs.

``FakeSource`` answers ``connect`` from a script (a link, an error, or a gate to wait on)
and ``FakeLink`` answers calls from a fixed snapshot and pushes whatever events a test
gives it. ``sample_snapshot`` is a realistic, fixed picture (timestamps relative to a
fixed ``NOW``), so screenshots of it are identical on every run.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from typing import Any

from fedctl.client import ClientEvent
from protocol.errors import FednodeError
from protocol.lifecycle import ACTIONS, Action
from protocol.operations import Op, lifecycle_op

LIFECYCLE_OPS = {lifecycle_op(a): a for a in Action}

NOW = 1767268800.0  # 2026-01-01T12:00:00Z: the fixed clock of tests and screenshots
TZ = UTC
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def fake_peer(n: int) -> str:
    """A plausible, stable libp2p peer ID (12D3KooW + 44 base58 characters)."""
    digest = hashlib.sha512(f"peer-{n}".encode()).digest()
    return "12D3KooW" + "".join(_B58[b % 58] for b in digest[:44])


Handler = Callable[[dict[str, Any]], dict[str, Any]]


class FakeLink:
    """One scripted connection: answers from ``snapshot``/``statuses``, pushes on demand."""

    def __init__(
        self,
        snapshot: dict[str, Any],
        statuses: dict[str, dict[str, Any]] | None = None,
        *,
        role: str = "operator",
        handlers: dict[str, Handler] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.statuses = statuses or {}
        self.role = role
        self.handlers = handlers or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.closed = False
        self._queue: asyncio.Queue[ClientEvent | None] = asyncio.Queue()

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        if self.closed:
            raise FednodeError("the coordinator closed the connection", code="DISCONNECTED")
        self.calls.append((op, args))
        if op in self.handlers:
            return self.handlers[op](args)
        if op == Op.SUBSCRIBE:
            return {"snapshot": copy.deepcopy(self.snapshot)}
        if op == Op.SESSION_STATUS:
            sid = args["session_id"]
            if sid not in self.statuses:
                raise FednodeError(f"no session {sid}", code="NOT_FOUND")
            return copy.deepcopy(self.statuses[sid])
        if op == Op.QUALITY_SESSION:
            sid = args["session_id"]
            health = self.statuses.get(sid, {}).get("health_score")
            return {"session_id": sid, "health_score": health, "rounds": []}
        if op == Op.EVENTS_LIST:
            return {"events": copy.deepcopy(self.snapshot.get("events", []))}
        if self.role != "operator":
            raise FednodeError(f"a viewer may not call {op!r}", code="NOT_AUTHORIZED")
        if op in LIFECYCLE_OPS:
            status = ACTIONS[LIFECYCLE_OPS[op]][1]
            self.push("session", {"status": status, "error": ""}, args["session_id"])
            return {"session_id": args["session_id"], "status": status}
        if op == Op.ALERTS_ACK:
            alert = next(a for a in self.snapshot["alerts"] if a["id"] == args["alert_id"])
            row = {**alert, "status": "acknowledged"}
            self.push("alert", {"change": "acknowledged", **row}, row.get("session_id") or "")
            return {"alert": row}
        if op in (Op.PARTICIPANTS_EXCLUDE, Op.PARTICIPANTS_READMIT):
            excluded = op.endswith("exclude")
            self.push("participant", {"peer_id": args["peer_id"], "excluded": excluded})
            return {"participant": {"peer_id": args["peer_id"], "excluded": excluded}}
        raise FednodeError(f"unknown admin operation {op!r}", code="UNKNOWN_OP")

    def push(self, kind: str, data: dict[str, Any], session_id: str = "", ts: float = NOW) -> None:
        self._queue.put_nowait(ClientEvent(kind, session_id, ts, data))

    def end(self) -> None:
        """The coordinator goes away: the stream ends and calls fail."""
        self.closed = True
        self._queue.put_nowait(None)

    async def stream(self) -> AsyncIterator[ClientEvent]:
        while True:
            ev = await self._queue.get()
            if ev is None:
                return
            yield ev

    async def close(self) -> None:
        self.closed = True


class FakeSource:
    """``connect`` follows ``script``: a FakeLink is returned, an exception raised, an
    asyncio.Event awaited before the next step. Past the end it waits forever."""

    def __init__(self, *script: FakeLink | BaseException | asyncio.Event, label: str = "") -> None:
        self.script = list(script)
        self.label = label or "ws://127.0.0.1:7700"
        self.attempts = 0

    async def connect(self) -> FakeLink:
        self.attempts += 1
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, asyncio.Event):
                await step.wait()
                continue
            if isinstance(step, BaseException):
                raise step
            return step
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


# --- a realistic picture ---------------------------------------------------------------

SESSION = "s-3f2a9c1b7d4e"
PEERS = [fake_peer(k) for k in range(5)]


def _history(n: int) -> list[dict[str, Any]]:
    out = []
    for r in range(1, n + 1):
        acc = 0.97 - 0.26 * 0.62 ** (r - 1)
        loss = 0.09 + 0.85 * 0.55 ** (r - 1)
        out.append(
            {
                "round": r,
                "accuracy": round(acc, 4),
                "loss": round(loss, 4),
                "duration_s": 2.1 + 0.1 * (r % 3),
                "participants": 4 if r < n else 3,
            }
        )
    return out


def sample_statuses(now: float = NOW) -> dict[str, dict[str, Any]]:
    hist = _history(5)
    running = {
        "session_id": SESSION,
        "name": "digits-mlp",
        "status": "running",
        "rounds_completed": 5,
        "rounds": 10,
        "participants": 4,
        "strategy": "fedavg",
        "secure_aggregation": False,
        "dropped": 1,
        "final_accuracy": hist[-1]["accuracy"],
        "final_loss": hist[-1]["loss"],
        "model_cid": "bafkreidd5hpffczi62cd5ff22jccdzli6mtwpvmlbklkqd7ckwn2ly32la",
        "duration_s": 71.4,
        "bytes_up": 5_270_450,
        "bytes_down": 5_263_865,
        "ledger": "/var/lib/fednode/ledger.db",
        "health_score": 87.4,  # not in session.status: what the fake's quality.session says
        "history": hist,
        "current_round": {
            "round": 6,
            "phase": "training",
            "selected": PEERS[:4],
            "received": [PEERS[0], PEERS[1]],
            "failed": {},
            "started_at": now - 14.2,
            "deadline_s": 60.0,
        },
    }
    done = {
        **running,
        "session_id": "s-91c04e7a2b10",
        "name": "digits-fedprox",
        "status": "completed",
        "rounds_completed": 10,
        "history": _history(10),
        "final_accuracy": _history(10)[-1]["accuracy"],
        "current_round": None,
        "strategy": "fedprox",
    }
    return {SESSION: running, done["session_id"]: done}


def sample_snapshot(now: float = NOW) -> dict[str, Any]:
    p = PEERS

    def peer(k: int, online: bool, score: float | None, lat: float | None, last: int | None):
        return {
            "peer_id": p[k],
            "online": online,
            "status": "active",
            "quality_score": score,
            "latency_ms": lat,
            "uptime": 100.0 if online else 71.5,
            "last_seen": now - (1.0 if online else 95.0),
            "rounds_completed": last or 0,
            "last_round": None
            if last is None
            else {"session_id": SESSION, "round": last, "at": now - (3.0 if last == 6 else 40.0)},
            "excluded": False,
            "dataset": f"digits:{k}/5",
            "num_examples": 287,
            "trend": "stable",
        }

    participants = [
        peer(0, True, 92.4, 3.1, 6),
        peer(1, True, 88.0, 4.7, 6),
        peer(2, True, 61.3, 212.5, 5),
        peer(3, True, 79.9, 8.2, 5),
        peer(4, False, 38.5, None, 4),
    ]
    participants[4]["status"] = "alerted"  # its open critical alert keeps it out
    alerts = [
        {
            "id": 7,
            "severity": "critical",
            "alert_type": "uptime",
            "entity_id": p[4],
            "session_id": "",
            "message": "uptime 71.5 % is under 90 % (critical): the peer was offline 28 % "
            "of the window",
            "status": "open",
            "created_at": now - 80,
            "updated_at": now - 80,
        },
        {
            "id": 6,
            "severity": "high",
            "alert_type": "latency",
            "entity_id": p[2],
            "session_id": "",
            "message": "latency 212.5 ms is over 200 ms (SLA): messages to and from the "
            "peer are slow",
            "status": "open",
            "created_at": now - 120,
            "updated_at": now - 120,
        },
        {
            "id": 5,
            "severity": "medium",
            "alert_type": "training_time",
            "entity_id": p[2],
            "session_id": SESSION,
            "message": "training time 1840 ms is over 800 ms (SLA)",
            "status": "acknowledged",
            "created_at": now - 300,
            "updated_at": now - 200,
        },
        {
            "id": 4,
            "severity": "low",
            "alert_type": "resource_efficiency",
            "entity_id": p[3],
            "session_id": "",
            "message": "resource efficiency 48 is under 50",
            "status": "open",
            "created_at": now - 400,
            "updated_at": now - 400,
        },
    ]
    ev: list[dict[str, Any]] = []

    def add(dt: float, kind: str, data: dict[str, Any], sid: str = SESSION, ent: str = ""):
        ev.append(
            {"id": len(ev) + 1, "ts": now - dt, "kind": kind, "session_id": sid,
             "entity_id": ent or None, "data": data}
        )  # fmt: skip

    add(200, "session", {"status": "running", "error": ""})
    hist = _history(5)
    for h in hist[2:]:
        t = 200 - 30 * (h["round"] - 2)
        add(t, "round_started", {"round": h["round"], "selected": p[:5], "model_cid": "bafk…"})
        add(
            t - 2,
            "round_completed",
            {"round": h["round"], "accuracy": h["accuracy"], "loss": h["loss"],
             "participants": p[: h["participants"]], "dropped": [p[4]] if h["round"] == 5 else []},
        )  # fmt: skip
    add(96, "participant", {"peer_id": p[4], "online": False}, "", p[4])
    add(80, "alert_raised", {"severity": "critical", "alert_type": "uptime"}, "", p[4])
    add(60, "action", {"action": "excluded_from_selection", "round": 6, "peer_id": p[4]}, SESSION)
    add(14.2, "round_started", {"round": 6, "selected": p[:4], "model_cid": "bafk…"})
    sessions = [
        {"session_id": SESSION, "name": "digits-mlp", "status": "running", "round": 5,
         "rounds": 10, "participants": 4, "accuracy": hist[-1]["accuracy"]},
        {"session_id": "s-91c04e7a2b10", "name": "digits-fedprox", "status": "completed",
         "round": 10, "rounds": 10, "participants": 4, "accuracy": _history(10)[-1]["accuracy"]},
        {"session_id": "s-0b7d55e2c8a3", "name": "digits-large", "status": "created",
         "round": 0, "rounds": 20, "participants": 0, "accuracy": None},
    ]  # fmt: skip
    return {"participants": participants, "sessions": sessions, "alerts": alerts, "events": ev}


def sample_link(role: str = "operator", now: float = NOW) -> FakeLink:
    return FakeLink(sample_snapshot(now), sample_statuses(now), role=role)


# --- a large picture, for the performance test -------------------------------------------


def synthetic(participants: int = 100, rounds: int = 1000, now: float = NOW) -> FakeLink:
    """A session that has run ``rounds`` rounds with ``participants`` peers, round
    ``rounds + 1`` in flight and nobody trained in it yet."""
    peers = [fake_peer(1000 + k) for k in range(participants)]
    sid = "s-perf00000000"
    hist = [
        {"round": r, "accuracy": 0.5 + 0.45 * (1 - 0.995**r), "loss": 0.1 + 2 * 0.995**r,
         "duration_s": 1.0, "participants": participants}
        for r in range(1, rounds + 1)
    ]  # fmt: skip
    status = {
        "session_id": sid,
        "name": "perf",
        "status": "running",
        "rounds_completed": rounds,
        "rounds": rounds + 100,
        "participants": participants,
        "strategy": "fedavg",
        "secure_aggregation": False,
        "final_accuracy": hist[-1]["accuracy"],
        "model_cid": "bafk…",
        "history": hist,
        "current_round": {
            "round": rounds + 1,
            "phase": "training",
            "selected": peers,
            "received": [],
            "failed": {},
            "started_at": now - 5,
            "deadline_s": 120.0,
        },
    }
    snap = {
        "participants": [
            {"peer_id": pid, "online": True, "status": "active", "quality_score": 90.0,
             "latency_ms": 2.0, "uptime": 100.0, "last_seen": now, "rounds_completed": rounds,
             "last_round": {"session_id": sid, "round": rounds, "at": now - 30},
             "excluded": False}
            for pid in peers
        ],
        "sessions": [
            {"session_id": sid, "name": "perf", "status": "running", "round": rounds,
             "rounds": rounds + 100, "participants": participants,
             "accuracy": hist[-1]["accuracy"]}
        ],
        "alerts": [],
        "events": [],
    }  # fmt: skip
    return FakeLink(snap, {sid: status})


async def until(
    pilot: Any, check: Callable[[], bool], timeout: float = 10.0, step: float | None = None
) -> None:
    """Let the app process messages until ``check()`` holds (or fail after ``timeout``).

    Tests synchronise on the app's own state this way, never on fixed sleeps; ``step``
    only spaces the checks out while real processes elsewhere do the work."""
    async with asyncio.timeout(timeout):
        while not check():
            await pilot.pause(step)
