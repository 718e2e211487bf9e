"""The operations of the admin channel: their names, who may call them, their arguments and
their results.

An operator or a viewer sends ``admin {id, op, args}`` (protocol.messages.Admin) and gets
``admin_reply {id, ok, result, error}``. ``op`` is an ``Op``; ``args`` and ``result`` have
the shapes below (``OPERATIONS`` pairs each op with them). Viewers may call only
``READ_OPS``. ``session.start|pause|resume|stop`` are the lifecycle actions of
protocol.lifecycle (``lifecycle_op``). ``subscribe`` answers with a snapshot and then
pushes ``event`` messages (protocol.events) until the connection closes.

Results carry more keys than are typed here where a row is a ledger row (a session summary,
an alert, a participant's figures); the typed keys are the ones clients rely on.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict

from protocol.lifecycle import Action


class Op(StrEnum):
    NODE_INFO = "node.info"
    SESSION_CREATE = "session.create"
    SESSION_START = "session.start"
    SESSION_PAUSE = "session.pause"
    SESSION_RESUME = "session.resume"
    SESSION_STOP = "session.stop"
    SESSION_ROLLBACK = "session.rollback"
    SESSION_STATUS = "session.status"
    SESSION_LIST = "session.list"
    PARTICIPANTS_LIST = "participants.list"
    PARTICIPANTS_EXCLUDE = "participants.exclude"
    PARTICIPANTS_READMIT = "participants.readmit"
    MODEL_LIST = "model.list"
    MODEL_GET = "model.get"
    MODEL_EXPORT = "model.export"
    INVITE_CREATE = "invite.create"
    ALERTS_LIST = "alerts.list"
    ALERTS_ACK = "alerts.ack"
    QUALITY_SESSION = "quality.session"
    REPORT = "report"
    EVENTS_LIST = "events.list"
    SUBSCRIBE = "subscribe"
    AUDIT_INPUTS = "audit.inputs"
    AUDIT_RECORD = "audit.record"


#: What a viewer (``--viewer``) may call; everything else is for operators.
READ_OPS: frozenset[Op] = frozenset(
    {
        Op.NODE_INFO,
        Op.SESSION_STATUS,
        Op.SESSION_LIST,
        Op.PARTICIPANTS_LIST,
        Op.MODEL_LIST,
        Op.MODEL_GET,
        Op.MODEL_EXPORT,
        Op.ALERTS_LIST,
        Op.QUALITY_SESSION,
        Op.REPORT,
        Op.EVENTS_LIST,
        Op.SUBSCRIBE,
    }
)

#: ``events.list``: how many events one call may ask for.
EVENTS_LIST_MAX = 1000


def lifecycle_op(action: str) -> Op:
    """The op of an operator's lifecycle action (``start`` -> ``session.start``)."""
    return Op(f"session.{Action(action).value}")


# --- arguments -----------------------------------------------------------------------------


class NoArgs(TypedDict):
    pass


class SessionArgs(TypedDict):
    session_id: str


class SessionCreateArgs(TypedDict):
    spec: dict[str, Any]  # protocol.spec validates it


class RollbackArgs(TypedDict):
    session_id: str
    round: int  # 0 = the initial model


class ExclusionArgs(TypedDict):
    peer_id: str
    reason: NotRequired[str]


class CidArgs(TypedDict):
    cid: str


class InviteArgs(TypedDict):
    session_id: str
    expires_s: NotRequired[float]  # (0, 366 days]; default one day
    uses: NotRequired[int]  # [1, 100000]; default 1


# participants.list: the columns it sorts by, and the most rows one page holds
PARTICIPANT_SORTS = ("peer_id", "score", "last_seen", "rounds", "latency", "uptime")
PARTICIPANTS_PAGE_MAX = 10_000


class ParticipantListArgs(TypedDict, total=False):
    sort: str  # PARTICIPANT_SORTS; default peer_id
    desc: bool  # largest first; default false (peer_id: A to Z)
    offset: int  # >= 0; default 0
    limit: int  # [1, PARTICIPANTS_PAGE_MAX]; default: every row
    online: bool  # only the peers connected now
    status: str  # only this status: active, alerted or excluded


class AlertsListArgs(TypedDict, total=False):
    status: str  # protocol.alerts.ALERT_FILTERS; default "active"
    severity: list[str]  # protocol.alerts.Severity; none = all
    session_id: str


class AlertAckArgs(TypedDict):
    alert_id: int


class EventsListArgs(TypedDict, total=False):
    limit: int  # [1, EVENTS_LIST_MAX]; default 50
    session_id: str  # "" = every session's and the node's


class AuditRecordArgs(TypedDict):
    session_id: str
    audit: dict[str, Any]  # protocol.audit.check_record bounds every field


class SubscribeArgs(TypedDict, total=False):
    session_id: str  # "" = every session


# --- results -------------------------------------------------------------------------------


class NodeInfo(TypedDict):
    peer_id: str
    ledger: str
    participants_online: int
    sessions: int
    started_at: float


class SessionCreated(TypedDict):
    session_id: str


class SessionStatusChange(TypedDict):
    session_id: str
    status: str  # protocol.lifecycle.SessionState


class SessionRow(TypedDict):
    session_id: str
    name: str
    status: str
    round: int  # rounds completed
    rounds: int
    participants: int
    accuracy: float | None


class SessionList(TypedDict):
    sessions: list[SessionRow]


class CurrentRound(TypedDict):
    round: int
    phase: str  # protocol.lifecycle.RoundPhase
    selected: list[str]
    received: list[str]
    failed: dict[str, str]
    started_at: float
    deadline_s: float


class SessionStatus(TypedDict):
    """The ledger's summary of a session, and what the running node adds."""

    session_id: str
    name: str
    status: str
    rounds: int
    rounds_completed: int
    history: list[dict[str, Any]]
    current_round: CurrentRound | None
    storage: str  # ok | retrying | down
    paused_for_storage: bool


class ParticipantList(TypedDict):
    participants: list[dict[str, Any]]  # the page
    total: NotRequired[int]  # rows that pass the filters, across pages
    offset: NotRequired[int]
    # every peer seen, whatever the filters: {seen, online, status: {name: count},
    # score: {min, median, max} of the scored ones (None when none is scored)}
    summary: NotRequired[dict[str, Any]]


class ParticipantChanged(TypedDict):
    participant: dict[str, Any]


class ModelList(TypedDict):
    models: list[dict[str, Any]]  # status: current | superseded | rolled_back


class ModelData(TypedDict):
    cid: str
    data: bytes


class ModelBlocks(TypedDict):
    cid: str
    blocks: list[dict[str, Any]]  # {cid, data}, depth first (the order of a CAR)


class Invite(TypedDict):
    token: str
    token_id: str
    session_id: str
    expires_at: float
    uses: int


class AlertList(TypedDict):
    alerts: list[dict[str, Any]]


class AlertAcked(TypedDict):
    alert: dict[str, Any]


class QualitySession(TypedDict):
    session_id: str
    health_score: float | None
    latest: dict[str, Any] | None
    rounds: list[dict[str, Any]]
    sla: dict[str, Any]


class EventRow(TypedDict):
    id: int
    ts: float
    kind: str  # protocol.events
    session_id: str | None
    entity_id: str | None
    data: dict[str, Any]


class EventList(TypedDict):
    events: list[EventRow]


class Snapshot(TypedDict):
    participants: list[dict[str, Any]]
    sessions: list[SessionRow]
    alerts: list[dict[str, Any]]
    events: list[EventRow]
    session: NotRequired[SessionStatus]


class AuditInputs(TypedDict):
    """What a privacy audit needs of the coordinator (fedctl audit privacy)."""

    session_id: str
    status: str
    spec: dict[str, Any]  # the validated spec the session runs
    model_cid: str | None  # the session's current model
    datasets: dict[str, str]  # contributor peer ID -> the dataset it registered (its word)


class AuditRecorded(TypedDict):
    session_id: str


class Subscribed(TypedDict):
    snapshot: Snapshot


@dataclass(frozen=True)
class Operation:
    op: Op
    args: type
    result: type


#: Every op with its argument and result shapes (the report is fednode.reporting's).
OPERATIONS: dict[Op, Operation] = {
    o.op: o
    for o in (
        Operation(Op.NODE_INFO, NoArgs, NodeInfo),
        Operation(Op.SESSION_CREATE, SessionCreateArgs, SessionCreated),
        Operation(Op.SESSION_START, SessionArgs, SessionStatusChange),
        Operation(Op.SESSION_PAUSE, SessionArgs, SessionStatusChange),
        Operation(Op.SESSION_RESUME, SessionArgs, SessionStatusChange),
        Operation(Op.SESSION_STOP, SessionArgs, SessionStatusChange),
        Operation(Op.SESSION_ROLLBACK, RollbackArgs, dict),
        Operation(Op.SESSION_STATUS, SessionArgs, SessionStatus),
        Operation(Op.SESSION_LIST, NoArgs, SessionList),
        Operation(Op.PARTICIPANTS_LIST, ParticipantListArgs, ParticipantList),
        Operation(Op.PARTICIPANTS_EXCLUDE, ExclusionArgs, ParticipantChanged),
        Operation(Op.PARTICIPANTS_READMIT, ExclusionArgs, ParticipantChanged),
        Operation(Op.MODEL_LIST, SessionArgs, ModelList),
        Operation(Op.MODEL_GET, CidArgs, ModelData),
        Operation(Op.MODEL_EXPORT, CidArgs, ModelBlocks),
        Operation(Op.INVITE_CREATE, InviteArgs, Invite),
        Operation(Op.ALERTS_LIST, AlertsListArgs, AlertList),
        Operation(Op.ALERTS_ACK, AlertAckArgs, AlertAcked),
        Operation(Op.QUALITY_SESSION, SessionArgs, QualitySession),
        Operation(Op.REPORT, SessionArgs, dict),
        Operation(Op.EVENTS_LIST, EventsListArgs, EventList),
        Operation(Op.SUBSCRIBE, SubscribeArgs, Subscribed),
        Operation(Op.AUDIT_INPUTS, SessionArgs, AuditInputs),
        Operation(Op.AUDIT_RECORD, AuditRecordArgs, AuditRecorded),
    )
}
