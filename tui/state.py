"""The dashboard's model: what the coordinator told us, as plain dataclasses.

The data worker applies the ``subscribe`` snapshot once and then every pushed event to a
``DashboardState``; each call returns a ``Change`` naming what moved, so the screens redraw
only those parts (one table row, one progress panel) instead of everything. Nothing here
imports Textual or does I/O, so the rules (who is late, what a round adds to the history,
what an alert change does) are unit-tested on their own and cost microseconds per event.

Everything the coordinator says is untrusted text (and some of it, alert messages, task
errors, dataset names, it relays from participants): each ``apply_*`` entry point passes
what it is given through protocol.text.clean_tree first, so no control character or
over-long string gets into the model, whatever source fed it. Widgets then render it as
rich ``Text``, never as markup. An event whose data is not what its kind carries changes
nothing but still gets a log line: a hostile coordinator cannot stop the dashboard.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol.alerts import HOLDS_SELECTION, is_severe, severity_rank
from protocol.events import MalformedEvent, UnknownEvent, parse_event
from protocol.lifecycle import TERMINAL
from protocol.messages import EVAL_METRICS, METRIC_LABELS, headline_metric
from protocol.text import clean, clean_tree

EVENTS_KEPT = 200
# Pushed but not ledger events: one per participant per round, already shown by the round
# panel; logging them would push the rare, interesting lines (alerts, failures) out.
NOT_LOGGED = frozenset({"update_received", "secagg", "lagged"})
# How much of one peer-written message (a task error, an alert) a log line keeps.
LINE_TEXT = 300
# What malformed data of a known kind raises in the handlers and in ``describe``.
_MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError)


def short(peer_id: str | None, n: int = 8) -> str:
    """Peer IDs all start with 12D3KooW; their tail is what tells two peers apart."""
    if not peer_id:
        return "–"
    return peer_id if len(peer_id) <= n + 1 else "…" + peer_id[-n:]


def _str(v: Any) -> str:
    """Text for the model: cleaned, and a non-text value as its (cleaned) repr."""
    return clean(v if isinstance(v, str) else str(v))


def _words(v: Any) -> str:
    """A peer-written phrase for one log line: cleaned and cut to LINE_TEXT."""
    return clean("" if v is None else v if isinstance(v, str) else str(v), LINE_TEXT)


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _int(v: Any, default: int = 0) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else default


@dataclass
class SessionInfo:
    """One row of the sessions table (``session.list`` shape)."""

    session_id: str
    name: str = ""
    status: str = "created"
    round: int = 0  # completed rounds
    rounds: int = 0  # rounds in the spec
    participants: int = 0
    accuracy: float | None = None
    error: str = ""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SessionInfo:
        return cls(
            session_id=_str(row["session_id"]),
            name=_str(row.get("name") or ""),
            status=_str(row.get("status") or "created"),
            round=_int(row.get("round")),
            rounds=_int(row.get("rounds")),
            participants=_int(row.get("participants")),
            accuracy=_float(row.get("accuracy")),
        )


@dataclass(frozen=True)
class RoundPoint:
    """One completed round: a point of the plot of the task's headline metric and loss."""

    round: int
    accuracy: float | None
    loss: float | None
    duration_s: float | None = None
    participants: int = 0
    # the task's metrics by name (EVAL_METRICS only); empty from a node before them
    metrics: dict[str, float] = field(default_factory=dict)

    def value(self, name: str) -> float | None:
        """This round's figure of metric ``name`` (accuracy alone from an older node)."""
        if not self.metrics and name == "accuracy":
            return self.accuracy
        return self.metrics.get(name)


def headline(points: list[RoundPoint]) -> str:
    """The metric the plot follows: accuracy where the task has it, else R², else MAE."""
    return headline_metric({m for p in points for m in p.metrics}) or "accuracy"


def headline_label(points: list[RoundPoint]) -> str:
    return METRIC_LABELS[headline(points)]


def _metrics(raw: Any) -> dict[str, float]:
    """A peer-sent metrics dict cut to the EVAL_METRICS names with finite numbers."""
    if not isinstance(raw, dict):
        return {}
    out = {k: _float(v) for k, v in raw.items() if k in EVAL_METRICS}
    return {k: v for k, v in out.items() if v is not None}


@dataclass
class CurrentRound:
    """The round in flight (or the last one), as far as the events tell."""

    round: int
    phase: str  # selecting | training | aggregating | evaluating | done | failed | aborted
    selected: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # in arrival order
    failed: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    deadline_s: float | None = None

    def late(self) -> list[str]:
        """Selected peers that have sent nothing yet while the round still waits on them."""
        if self.phase not in ("selecting", "training"):
            return []
        got = set(self.received) | set(self.failed)
        return [p for p in self.selected if p not in got]

    def elapsed(self, now: float) -> float | None:
        return None if self.started_at is None else max(0.0, now - self.started_at)


@dataclass
class SessionDetail:
    """What the session screen needs beyond the table row: history and the current round."""

    session_id: str
    history: dict[int, RoundPoint] = field(default_factory=dict)
    current: CurrentRound | None = None
    strategy: str = ""
    secure_aggregation: bool = False
    model_cid: str = ""
    deadline_s: float | None = None  # the spec's round_timeout_s, learned from a round
    health_score: float | None = None
    contributors: set[str] = field(default_factory=set)
    # compression (docs/compression.md): the uplink codec and how many times fewer bytes
    # crossed the wire than float32 (session totals; the latest round's from its event)
    codec: str = ""
    up_ratio: float | None = None
    down_ratio: float | None = None

    def points(self) -> list[RoundPoint]:
        return [self.history[k] for k in sorted(self.history)]


@dataclass
class LastRound:
    session_id: str
    round: int
    at: float | None


@dataclass
class Participant:
    peer_id: str
    online: bool = False
    status: str = "active"  # active | excluded | alerted
    quality_score: float | None = None
    latency_ms: float | None = None
    uptime: float | None = None
    last_seen: float | None = None
    rounds_completed: int = 0
    last_round: LastRound | None = None
    excluded: bool = False
    dataset: str = ""
    epsilon: float | None = None  # local DP: the ε it reported spending, last update

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Participant:
        lr = row.get("last_round")
        last = (
            LastRound(_str(lr.get("session_id") or ""), _int(lr.get("round")), _float(lr.get("at")))
            if isinstance(lr, dict)
            else None
        )
        status = _str(row.get("status") or "active")
        return cls(
            peer_id=_str(row["peer_id"]),
            online=bool(row.get("online")),
            status=status,
            quality_score=_float(row.get("quality_score")),
            latency_ms=_float(row.get("latency_ms")),
            uptime=_float(row.get("uptime")),
            last_seen=_float(row.get("last_seen")),
            rounds_completed=_int(row.get("rounds_completed")),
            last_round=last,
            excluded=bool(row.get("excluded", False)),
            dataset=_str(row.get("dataset") or ""),
        )


@dataclass
class Alert:
    id: int
    severity: str
    alert_type: str
    entity_id: str
    session_id: str
    message: str
    status: str  # open | acknowledged
    created_at: float | None
    updated_at: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Alert:
        return cls(
            id=_int(row.get("id")),
            severity=_str(row.get("severity") or "low"),
            alert_type=_str(row.get("alert_type") or ""),
            entity_id=_str(row.get("entity_id") or ""),
            session_id=_str(row.get("session_id") or ""),
            message=_str(row.get("message") or ""),
            status=_str(row.get("status") or "open"),
            created_at=_float(row.get("created_at")),
            updated_at=_float(row.get("updated_at")),
        )

    def rank(self) -> tuple[int, float]:
        """Most severe first, then newest first: the order an operator reads them in."""
        return (severity_rank(self.severity), -(self.created_at or 0.0))


@dataclass(frozen=True)
class LogEntry:
    """One line of the events log, already worded (formatting once, not per redraw)."""

    ts: float
    kind: str
    session_id: str
    text: str
    level: str = ""  # "", "good", "warn", "bad": how the line is coloured


@dataclass
class Change:
    """What one snapshot or event changed: the screens redraw just these parts."""

    full: bool = False
    sessions: set[str] = field(default_factory=set)
    participants: set[str] = field(default_factory=set)
    alerts: bool = False
    events: list[LogEntry] = field(default_factory=list)
    history: set[str] = field(default_factory=set)  # sessions whose plot gained a point
    rounds: set[str] = field(default_factory=set)  # sessions whose current round moved
    details: set[str] = field(default_factory=set)  # other session detail (health, cid)
    fetch: set[str] = field(default_factory=set)  # sessions the worker should load
    resnapshot: bool = False

    def merge(self, other: Change) -> Change:
        self.full |= other.full
        self.sessions |= other.sessions
        self.participants |= other.participants
        self.alerts |= other.alerts
        self.events += other.events
        self.history |= other.history
        self.rounds |= other.rounds
        self.details |= other.details
        self.fetch |= other.fetch
        self.resnapshot |= other.resnapshot
        return self


# --- wording of events ---------------------------------------------------------------


def describe(kind: str, data: dict[str, Any], rounds: int = 0) -> tuple[str, str]:
    """A pushed or ledger event as one line of text and its level; never raises. Its shape
    is protocol.events.parse_event's call: a malformed payload is worded as such."""
    if isinstance(parse_event(kind, data), MalformedEvent):
        return f"{_words(kind)} (unexpected data)", "warn"
    try:
        return _describe(kind, data, rounds)
    except _MALFORMED:
        return f"{_words(kind)} (unexpected data)", "warn"


def _describe(kind: str, data: dict[str, Any], rounds: int) -> tuple[str, str]:
    of = f"/{rounds}" if rounds else ""
    peer = short(data.get("peer_id") or data.get("participant") or data.get("entity_id"))
    if kind == "session":
        status = data.get("status", "?")
        err = f": {_words(data['error'])}" if data.get("error") else ""
        idle = " (the round in flight has ended)" if data.get("idle") is True else ""
        level = {"completed": "good", "failed": "bad", "paused": "warn", "stopped": "warn"}
        return f"session {status}{err}{idle}", level.get(str(status), "")
    if kind == "round_started":
        n = len(data.get("selected") or [])
        return f"round {data.get('round')}{of} started, {n} selected", ""
    if kind == "round_completed":
        metrics = _metrics(data.get("metrics"))
        name = headline_metric(metrics) or "accuracy"  # the task's, as the plot shows it
        acc = metrics.get(name) if metrics else _float(data.get("accuracy"))
        loss = _float(data.get("loss"))
        dropped = len(data.get("dropped") or [])
        ratio = _float(data.get("up_ratio"))
        codec = _words(str(data.get("codec") or ""))
        return (
            f"round {data.get('round')}{of} done: {METRIC_LABELS[name]} {_num(acc)} "
            f"loss {_num(loss)}, "
            f"{len(data.get('participants') or [])} trained"
            + (f", {dropped} dropped" if dropped else "")
            + (f", uplink {ratio:.1f}x fewer bytes ({codec})" if ratio and codec else ""),
            "good",
        )
    if kind == "round_failed":
        reason = _words(data.get("reason", ""))
        return f"round {data.get('round')} {data.get('status')}: {reason}", "bad"
    if kind == "task_error":  # the participant's own code and message, as plain words
        code, message = _words(data.get("code")), _words(data.get("message"))
        return f"{peer} could not do round {data.get('round')}: {code}: {message}", "bad"
    if kind == "participant":
        if "excluded" in data:
            word = "excluded by an operator" if data["excluded"] else "readmitted"
            return f"{peer} {word}", "warn" if data["excluded"] else ""
        if data.get("online"):
            return f"{peer} online", ""
        return f"{peer} offline", "warn"
    if kind in ("alert", "alert_raised", "alert_resolved", "alert_acknowledged"):
        change = data.get("change") or kind.removeprefix("alert_") or "raised"
        if change == "alert":
            change = "raised"
        sev = data.get("severity", "")
        level = "bad" if change == "raised" and is_severe(sev) else ""
        if change == "raised" and not level:
            level = "warn"
        return f"alert {change}: {sev} {data.get('alert_type', '')} {peer}", level
    if kind == "quality":
        return f"round {data.get('round')} health {_num(_float(data.get('health_score')), 1)}", ""
    if kind == "action":
        action = data.get("action")
        if action == "excluded_from_selection":
            return f"{peer} left out of round {data.get('round')} (open critical alert)", "warn"
        if action == "pause":
            return f"session paused: {_words(data.get('reason', ''))}", "bad"
        reason = f" ({_words(data['reason'])})" if data.get("reason") else ""
        return f"{action} {peer}{reason}", "warn"
    if kind == "anomaly":
        return f"anomaly: {peer} round {data.get('round')}", "warn"
    if kind == "security":
        code, message = _words(data.get("code", "")), _words(data.get("message", ""))
        return f"security: {code} {message}".strip(), "bad"
    if kind == "invite":
        return f"invite issued ({data.get('uses', '?')} uses)", ""
    if kind == "update_received":
        eps = _float(data.get("epsilon"))  # local DP: what the participant has spent
        spent = f" (ε {_num(eps, 2)} spent)" if eps is not None else ""
        return f"{peer} trained round {data.get('round')}{spent}", ""
    if kind == "central_dp":
        eps = _float(data.get("epsilon"))
        return f"round {data.get('round')} noisy aggregate (central DP): ε {_num(eps, 2)}", ""
    if kind == "robustness":
        out = [short(p) for p in data.get("excluded") or []]
        if not out:
            return f"round {data.get('round')}: no outlier left out", ""
        return f"round {data.get('round')}: left out {', '.join(out)} (outliers)", "warn"
    return _words(kind), ""


def _num(v: float | None, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


# --- the model -----------------------------------------------------------------------


class DashboardState:
    """Sessions, participants, alerts, the events ring and per-session detail."""

    def __init__(self) -> None:
        self.sessions: dict[str, SessionInfo] = {}
        self.participants: dict[str, Participant] = {}
        self.alerts: dict[int, Alert] = {}
        self.events: deque[LogEntry] = deque(maxlen=EVENTS_KEPT)
        self.details: dict[str, SessionDetail] = {}
        self.loaded = False

    # -- whole answers ----------------------------------------------------------------

    def apply_snapshot(self, snap: dict[str, Any]) -> Change:
        """Replace everything with the answer to ``subscribe`` (after a (re)connect)."""
        snap = clean_tree(snap)
        self.sessions = {
            s.session_id: s for s in (SessionInfo.from_row(r) for r in snap.get("sessions") or [])
        }
        self.participants = {
            p.peer_id: p for p in (Participant.from_row(r) for r in snap.get("participants") or [])
        }
        self.alerts = {
            a.id: a
            for a in (Alert.from_row(r) for r in snap.get("alerts") or [])
            if a.status != "resolved"
        }
        self.events.clear()
        for row in snap.get("events") or []:
            self._log_ledger_row(row)
        self.details = {}
        if isinstance(snap.get("session"), dict):
            self.apply_status(snap["session"])
        self.loaded = True
        return Change(full=True)

    def apply_status(self, summary: dict[str, Any]) -> Change:
        """A ``session.status`` answer: the history and current round of one session."""
        summary = clean_tree(summary)
        sid = _str(summary["session_id"])
        info = self.sessions.get(sid) or SessionInfo(sid)
        self.sessions[sid] = info
        info.name = _str(summary.get("name") or info.name)
        info.status = _str(summary.get("status") or info.status)
        info.round = _int(summary.get("rounds_completed"), info.round)
        info.rounds = _int(summary.get("rounds"), info.rounds)
        info.participants = _int(summary.get("participants"), info.participants)
        acc = _float(summary.get("final_accuracy"))
        info.accuracy = acc if acc is not None else info.accuracy
        old = self.details.get(sid)
        det = SessionDetail(
            sid,
            strategy=_str(summary.get("strategy") or ""),
            secure_aggregation=bool(summary.get("secure_aggregation")),
            model_cid=_str(summary.get("model_cid") or ""),
            health_score=old.health_score if old else None,
        )
        comp = summary.get("compression")
        if isinstance(comp, dict):
            det.codec = _str(comp.get("codec") or "")
            det.up_ratio = _float(comp.get("up_ratio"))
            det.down_ratio = _float(comp.get("down_ratio"))
        for h in summary.get("history") or []:
            p = RoundPoint(
                _int(h.get("round")),
                _float(h.get("accuracy")),
                _float(h.get("loss")),
                _float(h.get("duration_s")),
                _int(h.get("participants")),
                _metrics(h.get("metrics")),
            )
            det.history[p.round] = p
        cur = summary.get("current_round")
        if isinstance(cur, dict):
            det.current = CurrentRound(
                round=_int(cur.get("round")),
                phase=_str(cur.get("phase") or "training"),
                selected=list(cur.get("selected") or []),
                received=list(cur.get("received") or []),
                failed=dict(cur.get("failed") or {}),
                started_at=_float(cur.get("started_at")),
                deadline_s=_float(cur.get("deadline_s")),
            )
            det.deadline_s = det.current.deadline_s
        elif old is not None:
            det.deadline_s = old.deadline_s
        self.details[sid] = det
        return Change(sessions={sid}, history={sid}, rounds={sid}, details={sid})

    def apply_quality(self, session_id: str, answer: dict[str, Any]) -> Change:
        """A ``quality.session`` answer: the health score before the next round's event."""
        session_id, answer = _str(session_id), clean_tree(answer)
        health = _float(answer.get("health_score"))
        if health is not None:
            self._detail(session_id).health_score = health
        return Change(details={session_id})

    def apply_events_list(self, rows: list[dict[str, Any]]) -> Change:
        """An ``events.list`` answer (oldest first): the log starts from these."""
        self.events.clear()
        for row in clean_tree(rows):
            self._log_ledger_row(row)
        return Change(full=True)

    def _log_ledger_row(self, row: dict[str, Any]) -> None:
        data = row.get("data") if isinstance(row.get("data"), dict) else {}
        sid = _str(row.get("session_id") or "")
        kind = _str(row.get("kind") or "")
        if row.get("entity_id") and "peer_id" not in data:
            data = {**data, "entity_id": row["entity_id"]}
        info = self.sessions.get(sid)
        text, level = describe(kind, data, info.rounds if info else 0)
        self.events.append(LogEntry(_float(row.get("ts")) or 0.0, kind, sid, text, level))

    # -- pushed events ------------------------------------------------------------------

    def apply_event(self, kind: str, session_id: str, ts: float, data: dict[str, Any]) -> Change:
        """One pushed event; unknown kinds only reach the log."""
        kind, session_id, data = _str(kind), _str(session_id), clean_tree(data)
        if not isinstance(data, dict):
            data = {}
        parsed = parse_event(kind, data)  # the shape check: a bad payload changes nothing
        handler = (
            None
            if isinstance(parsed, UnknownEvent | MalformedEvent)
            else getattr(self, "_on_" + kind, None)
        )
        try:
            change = handler(session_id, ts, data) if handler is not None else Change()
        except _MALFORMED:  # data not of its kind's shape: log it, change nothing else
            change = Change()
        if kind not in NOT_LOGGED:
            info = self.sessions.get(session_id)
            text, level = describe(kind, data, info.rounds if info else 0)
            entry = LogEntry(ts, kind, session_id, text, level)
            self.events.append(entry)
            change.events.append(entry)
        return change

    def _session(self, sid: str, change: Change) -> SessionInfo:
        info = self.sessions.get(sid)
        if info is None:  # created since the snapshot: the worker loads its row
            info = self.sessions[sid] = SessionInfo(sid)
            change.fetch.add(sid)
        change.sessions.add(sid)
        return info

    def _detail(self, sid: str) -> SessionDetail:
        det = self.details.get(sid)
        if det is None:
            det = self.details[sid] = SessionDetail(sid)
        return det

    def _participant(self, peer: str, change: Change) -> Participant:
        p = self.participants.get(peer)
        if p is None:
            p = self.participants[peer] = Participant(peer)
        change.participants.add(peer)
        return p

    def _restatus(self, p: Participant) -> None:
        """The coordinator's rule: excluded by an operator, or alerted while an open
        critical alert keeps it out of selection, or active."""
        held = any(
            a.entity_id == p.peer_id and a.severity == HOLDS_SELECTION and a.status == "open"
            for a in self.alerts.values()
        )
        p.status = "excluded" if p.excluded else "alerted" if held else "active"

    def _on_session(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change()
        if not sid:
            return change
        info = self._session(sid, change)
        info.status = _str(data.get("status") or info.status)
        info.error = _str(data.get("error") or "")
        if data.get("name"):
            info.name = _str(data["name"])
        det = self.details.get(sid)
        if det and det.current and info.status in TERMINAL and det.current.phase != "done":
            det.current.phase = "aborted" if info.status == "stopped" else det.current.phase
            change.rounds.add(sid)
        return change

    def _on_round_started(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change(rounds={sid})
        info = self._session(sid, change)
        if info.status in ("created", "paused"):
            info.status = "running"
        det = self._detail(sid)
        deadline = _float(data.get("deadline_s"))
        if deadline is not None:
            det.deadline_s = deadline
        elif det.deadline_s is None:  # the event does not say: session.status does, once
            change.fetch.add(sid)
        det.current = CurrentRound(
            round=_int(data.get("round")),
            phase="training",
            selected=list(data.get("selected") or []),
            started_at=_float(data.get("started_at")) or ts,
            deadline_s=det.deadline_s,
        )
        return change

    def _on_update_received(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change(rounds={sid})
        peer = _str(data.get("participant") or "")
        rnd = _int(data.get("round"))
        det = self._detail(sid)
        cur = det.current
        if cur is None or cur.round != rnd:  # joined mid-round: what the event itself says
            cur = det.current = CurrentRound(rnd, "training", deadline_s=det.deadline_s)
        if peer and peer not in cur.received:
            cur.received.append(peer)
        if peer and peer not in cur.selected:
            cur.selected.append(peer)
        if peer:
            p = self._participant(peer, change)
            p.last_round = LastRound(sid, rnd, ts)
            p.last_seen = ts
            eps = _float(data.get("epsilon"))
            if eps is not None:  # local DP: what the participant says it has spent
                p.epsilon = eps
        return change

    def _on_round_completed(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change(history={sid}, rounds={sid})
        rnd = _int(data.get("round"))
        contributors = [_str(p) for p in data.get("participants") or []]
        info = self._session(sid, change)
        info.round = max(info.round, rnd)
        metrics = _metrics(data.get("metrics"))
        # the event's accuracy is the round's score (R² for regression); by name, it is not
        acc = metrics.get("accuracy") if metrics else _float(data.get("accuracy"))
        info.accuracy = acc if acc is not None else info.accuracy
        det = self._detail(sid)
        det.contributors.update(contributors)
        info.participants = max(info.participants, len(det.contributors))
        det.history[rnd] = RoundPoint(
            rnd,
            acc,
            _float(data.get("loss")),
            _float(data.get("duration_s")),
            len(contributors),
            metrics,
        )
        det.model_cid = _str(data.get("model_cid") or det.model_cid)
        det.codec = _str(data.get("codec") or det.codec)
        ratio = _float(data.get("up_ratio"))
        det.up_ratio = ratio if ratio is not None else det.up_ratio
        if det.current and det.current.round == rnd:
            det.current.phase = "done"
            for p in data.get("dropped") or []:
                det.current.failed.setdefault(_str(p), "dropped")
        for peer in contributors:
            part = self._participant(peer, change)
            if part.last_round is None or (part.last_round.session_id, part.last_round.round) != (
                sid,
                rnd,
            ):
                part.last_round = LastRound(sid, rnd, ts)
            part.rounds_completed += 1
        return change

    def _on_round_failed(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change(rounds={sid})
        det = self._detail(sid)
        if det.current and det.current.round == _int(data.get("round")):
            det.current.phase = _str(data.get("status") or "failed")
        return change

    def _on_participant(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change()
        peer = data.get("peer_id")
        if not peer:
            return change
        p = self._participant(_str(peer), change)
        if "online" in data:
            p.online = bool(data["online"])
            p.last_seen = ts
        if data.get("dataset"):
            p.dataset = _str(data["dataset"])
        if "excluded" in data:
            p.excluded = bool(data["excluded"])
            self._restatus(p)
        return change

    def _on_alert(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        change = Change(alerts=True)
        if "id" not in data:
            return change
        alert = Alert.from_row(data)
        if data.get("change") == "resolved" or alert.status == "resolved":
            self.alerts.pop(alert.id, None)
        else:
            if data.get("change") == "acknowledged":
                alert.status = "acknowledged"
            self.alerts[alert.id] = alert
        p = self.participants.get(alert.entity_id)
        if p is not None:  # the coordinator's rule: an open critical alert keeps it out
            change.participants.add(p.peer_id)
            self._restatus(p)
        return change

    def _on_quality(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        health = _float(data.get("health_score"))
        if health is not None and sid:
            self._detail(sid).health_score = health
        return Change(details={sid})

    def _on_lagged(self, sid: str, ts: float, data: dict[str, Any]) -> Change:
        return Change(resnapshot=True)

    # -- questions the screens ask ------------------------------------------------------

    def late(self, session_id: str) -> list[str]:
        det = self.details.get(session_id)
        return det.current.late() if det and det.current else []

    def alerts_sorted(self, session_id: str | None = None) -> list[Alert]:
        """Active alerts, most severe first; for a session, its own and node-wide ones."""
        out = list(self.alerts.values())
        if session_id is not None:
            det = self.details.get(session_id)
            peers = set(det.contributors) if det else set()
            if det and det.current:
                peers |= set(det.current.selected)
            out = [a for a in out if a.session_id in ("", session_id) or a.entity_id in peers]
        return sorted(out, key=Alert.rank)

    def session_events(self, session_id: str | None = None) -> list[LogEntry]:
        if session_id is None:
            return list(self.events)
        return [e for e in self.events if e.session_id in ("", session_id)]

    def round_state(self, session_id: str, peer_id: str) -> str:
        """A peer's part in the session's current round: trained, late, failed or ''."""
        det = self.details.get(session_id)
        cur = det.current if det else None
        if cur is None or peer_id not in cur.selected:
            return ""
        if peer_id in cur.received:
            return "trained"
        if peer_id in cur.failed:
            return "failed"
        return "late" if cur.phase in ("selecting", "training") else ""
