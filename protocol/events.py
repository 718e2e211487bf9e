"""Event kinds and their payloads: what a coordinator records in its hash chain and pushes
to subscribers (``event`` messages), and the one parser every client uses.

Each kind is a frozen dataclass below whose ``KIND`` is the word on the wire and in the
ledger's ``events`` table, and whose fields are the payload (``data``) the coordinator
writes. ``parse_event(kind, data)`` is tolerant, because a client must outlive whatever a
coordinator sends (a newer one, or a hostile one): it never raises, and returns

* the typed payload, every string in it cleaned (protocol.text.clean); fields the payload
  lacks take their defaults and keys this version does not know are ignored, so a newer
  coordinator may add fields;
* ``UnknownEvent`` for a kind this version does not know;
* ``MalformedEvent`` naming the field, when a required field is missing or a field has the
  wrong type.

fedctl's live lines (fedctl.render), its demo and the dashboard's model (tui.state) all
read events through it; none of them indexes a raw payload.

Kinds (who writes them): ``session``, ``round_started``, ``update_received`` (push only),
``round_completed``, ``round_failed``, ``round_aborted``, ``coordinator_restarted``,
``coordinator_stopped``,
``task_error``, ``participant``, ``action``, ``anomaly``, ``aggregation``, ``central_dp``,
``secagg`` (push
only), ``rollback``, ``audit`` (a privacy audit's figures), ``invite``, ``quality`` (push
only), ``sla`` and ``security`` (ledger only), the ledger's alert trail
``alert_raised``/``alert_resolved``/``alert_acked`` and the pushed ``alert`` (with
``change``), ``lagged`` (made by the admin channel for a subscriber that fell behind),
and a participant's own ledger: ``joined``, ``task_done``,
``task_failed``, ``task_declined``, ``secagg_input``, ``attack``, ``privacy_budget``.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from protocol import text
from protocol.errors import ValidationError
from protocol.messages import check_value


class Payload:
    """Base of every event payload; ``KIND`` is its word."""

    KIND: ClassVar[str] = ""


# --- sessions and rounds ------------------------------------------------------------------


@dataclass(frozen=True)
class Session(Payload):
    """The session changed state (protocol.lifecycle.SessionState); ``name`` on creation."""

    KIND: ClassVar[str] = "session"
    status: str
    error: str = ""
    name: str = ""
    # paused, and the round that ran when the pause came has ended: nothing in flight
    idle: bool = False


@dataclass(frozen=True)
class RoundStarted(Payload):
    KIND: ClassVar[str] = "round_started"
    round: int
    selected: list[str]
    model_cid: str = ""
    started_at: float | None = None
    deadline_s: float | None = None
    # the updates that close the round: fewer than selected with [selection] over_selection
    needed: int | None = None


@dataclass(frozen=True)
class UpdateReceived(Payload):
    """One selected participant's update was accepted (``received`` of ``selected`` now)."""

    KIND: ClassVar[str] = "update_received"
    round: int
    participant: str
    samples: int | None = None
    loss: float | None = None
    train_s: float | None = None
    bytes: int | None = None
    received: int | None = None
    selected: int | None = None
    epsilon: float | None = None  # local DP: the ε the participant spent in the session


@dataclass(frozen=True)
class RoundCompleted(Payload):
    KIND: ClassVar[str] = "round_completed"
    round: int
    # the round's score (accuracy; R² for regression: what rollback compares) and loss
    accuracy: float | None = None
    loss: float | None = None
    # the task's metrics by name (protocol.messages.EVAL_METRICS), from the same evaluation
    metrics: dict[str, Any] = field(default_factory=dict)
    model_cid: str = ""
    duration_s: float | None = None
    participants: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # plain rounds: updates that arrived but outlier detection left out of the aggregate
    excluded: list[str] = field(default_factory=list)
    # [selection] over_selection: asked as spares, not waited for once enough had arrived
    # (neither dropped nor failed)
    not_needed: list[str] = field(default_factory=list)
    bytes_up: int | None = None
    bytes_down: int | None = None
    # compression (compression.codec): the uplink codec, the contributors' updates as float32
    # bytes, and bytes_up_raw / bytes_up (None: nothing crossed the uplink)
    codec: str = ""
    bytes_up_raw: int | None = None
    up_ratio: float | None = None
    # backpressure (fednode.uploads): the most of this round's updates on their way at once,
    # and how many waited for a slot
    uploads_peak: int = 0
    uploads_waited: int = 0
    # plain rounds: the bytes the accepted updates took as rows, and whether they were held
    # on disk (fednode.round_updates; fednode run --round-ram-mib)
    updates_held_bytes: int = 0
    updates_on_disk: bool = False
    # who measured accuracy and loss (spec evaluation.on); with "participants" they are the
    # participants' figures of the model the round started from (model_cid_in)
    evaluation: str = "coordinator"
    # the participants' example-weighted figures, when they evaluated: examples, loss,
    # metrics (by name), reports (how many), model_cid (the model they describe)
    participant_eval: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundFailed(Payload):
    """A round that published nothing: ``status`` is a protocol.lifecycle.RoundStatus
    (failed, aborted or rejected)."""

    KIND: ClassVar[str] = "round_failed"
    round: int
    status: str = "failed"
    reason: str = ""


@dataclass(frozen=True)
class RoundAborted(Payload):
    """The round in flight when the coordinator stopped; it runs again (``attempt``)."""

    KIND: ClassVar[str] = "round_aborted"
    round: int
    attempt: int = 1
    started_at: float | None = None
    selected: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass(frozen=True)
class CoordinatorRestarted(Payload):
    KIND: ClassVar[str] = "coordinator_restarted"
    restarts: int = 0
    clean: bool = False
    aborted_rounds: list[int] = field(default_factory=list)
    status: str = ""


@dataclass(frozen=True)
class CoordinatorStopped(Payload):
    """A clean stop (SIGTERM) while the session was live; ``round`` was in flight (0: none)."""

    KIND: ClassVar[str] = "coordinator_stopped"
    round: int = 0


@dataclass(frozen=True)
class TaskError(Payload):
    """A participant could not do its task; ``code`` and ``message`` are its own words."""

    KIND: ClassVar[str] = "task_error"
    round: int
    peer_id: str
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class Participant(Payload):
    """A participant came online or went offline (``online``), or an operator excluded or
    readmitted it (``excluded``, ``reason``); ``None`` = the event does not say."""

    KIND: ClassVar[str] = "participant"
    peer_id: str
    online: bool | None = None
    dataset: str = ""
    excluded: bool | None = None
    reason: str = ""


@dataclass(frozen=True)
class Action(Payload):
    """Something done to a session or a peer: by an operator (``exclude``, ``readmit``),
    or by the node itself (``pause``/``resume`` for storage or a security violation,
    ``excluded_from_selection``, ``rollback_skipped``; outlier detection's
    ``excluded_from_aggregate`` and ``quarantined``, fednode.robustness)."""

    KIND: ClassVar[str] = "action"
    action: str
    reason: str = ""
    peer_id: str = ""
    round: int | None = None
    by: str = ""
    to_round: int | None = None


@dataclass(frozen=True)
class Anomaly(Payload):
    KIND: ClassVar[str] = "anomaly"
    round: int
    peer_id: str
    distance: float | None = None


@dataclass(frozen=True)
class Robustness(Payload):
    """Outlier detection's view of a plain round (docs/robustness.md): each update's
    figures and verdict by peer (norm, norm_ratio, cosine, distance, z, outlier, excluded,
    reasons), who was an outlier and who was left out of the aggregate."""

    KIND: ClassVar[str] = "robustness"
    round: int
    detection: str = ""
    outliers: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    scores: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Aggregation(Payload):
    """How a round's updates were weighed and bounded (docs/architecture.md, "Bounds")."""

    KIND: ClassVar[str] = "aggregation"
    round: int
    secure: bool = False
    weighting: str = ""
    max_weight_share: float | None = None
    max_update_norm: float | None = None
    max_examples: int | None = None
    updates: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CentralDp(Payload):
    """A central-DP session released a noisy aggregate (fednode.central_dp, docs/privacy.md):
    the round's effective and planned noise multiplier, clip_norm, sample rate q = selected /
    eligible, the updates in the sum, the noise's std on the mean, whether each participant
    added its share (secure, sized for ``share_count``), and the session's ε so far."""

    KIND: ClassVar[str] = "central_dp"
    round: int
    noise_multiplier: float | None = None
    planned_noise_multiplier: float | None = None
    clip_norm: float | None = None
    sample_rate: float | None = None
    selected: int | None = None
    eligible: int | None = None
    updates: int | None = None
    noise_std: float | None = None
    secure: bool = False
    share_count: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    accountant: str = ""
    norms: dict[str, Any] = field(default_factory=dict)  # plain: each update's, before clipping


@dataclass(frozen=True)
class Secagg(Payload):
    KIND: ClassVar[str] = "secagg"
    round: int
    stage: str = ""
    participant: str = ""


@dataclass(frozen=True)
class Rollback(Payload):
    KIND: ClassVar[str] = "rollback"
    to_round: int
    to_cid: str = ""
    from_round: int | None = None
    from_cid: str = ""
    rolled_back: list[int] = field(default_factory=list)
    reason: str = ""
    trigger: str = ""  # accuracy | operator
    round: int | None = None
    by: str = ""


@dataclass(frozen=True)
class Audit(Payload):
    """A membership-inference audit of the session's model (``fedctl audit privacy``): the
    record of protocol.audit (``attacks``: each attack's figures by name), ``by`` who ran it
    (an operator's peer ID; ``offline`` when written to a stopped node's ledger)."""

    KIND: ClassVar[str] = "audit"
    model_cid: str = ""
    attacks: dict[str, Any] = field(default_factory=dict)
    members: int | None = None
    nonmembers: int | None = None
    shadow_models: int | None = None
    member_accuracy: float | None = None
    nonmember_accuracy: float | None = None
    members_data: str = ""
    nonmembers_data: str = ""
    by: str = ""


@dataclass(frozen=True)
class Invite(Payload):
    KIND: ClassVar[str] = "invite"
    token_id: str = ""
    uses: int | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class Quality(Payload):
    """A session's scores after a round (fednode.quality.SessionScores, ``health_score``)."""

    KIND: ClassVar[str] = "quality"
    round: int
    health_score: float | None = None


@dataclass(frozen=True)
class Sla(Payload):
    KIND: ClassVar[str] = "sla"
    sla: dict[str, Any] = field(default_factory=dict)
    heartbeat_s: float | None = None


@dataclass(frozen=True)
class Security(Payload):
    """A frame or a handshake refused (fednode.transport's bad-input policy)."""

    KIND: ClassVar[str] = "security"
    code: str = ""
    message: str = ""
    address: str = ""


# --- alerts (protocol.alerts has the words) ------------------------------------------------


@dataclass(frozen=True)
class Alert(Payload):
    """A pushed alert change: ``change`` (protocol.alerts.AlertChange) and the alert's row.
    ``id`` -1 is the storage outage shown from memory; ``None``: the event does not say."""

    KIND: ClassVar[str] = "alert"
    change: str = "raised"
    id: int | None = None
    alert_type: str = ""
    severity: str = ""
    entity_id: str | None = None
    session_id: str | None = None
    message: str = ""
    status: str = ""
    created_at: float | None = None
    updated_at: float | None = None


@dataclass(frozen=True)
class AlertRaised(Alert):
    KIND: ClassVar[str] = "alert_raised"


@dataclass(frozen=True)
class AlertResolved(Alert):
    KIND: ClassVar[str] = "alert_resolved"
    change: str = "resolved"


@dataclass(frozen=True)
class AlertAcked(Alert):
    KIND: ClassVar[str] = "alert_acked"
    change: str = "acknowledged"


@dataclass(frozen=True)
class Lagged(Payload):
    """Made by the admin channel: this subscriber fell behind and ``dropped`` events."""

    KIND: ClassVar[str] = "lagged"
    dropped: int = 0


# --- a participant's own ledger ------------------------------------------------------------


@dataclass(frozen=True)
class Joined(Payload):
    KIND: ClassVar[str] = "joined"


@dataclass(frozen=True)
class TaskDone(Payload):
    KIND: ClassVar[str] = "task_done"
    round: int | None = None


@dataclass(frozen=True)
class TaskFailed(Payload):
    KIND: ClassVar[str] = "task_failed"
    round: int | None = None
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class TaskDeclined(TaskFailed):
    KIND: ClassVar[str] = "task_declined"


@dataclass(frozen=True)
class SecaggInput(Payload):
    KIND: ClassVar[str] = "secagg_input"
    round: int | None = None


@dataclass(frozen=True)
class Attack(Payload):
    """A participant started with `fednode run --attack` (fednode.attacks), in its own
    ledger only: at start ``attack`` and ``what``; each round it attacked, ``round`` with the
    L2 norms of its trained update and of the update it sent."""

    KIND: ClassVar[str] = "attack"
    attack: str = ""
    what: str = ""
    round: int | None = None
    honest_norm: float | None = None
    sent_norm: float | None = None


@dataclass(frozen=True)
class PrivacyBudget(Payload):
    """A participant's own ledger: its data has spent at least 80 % of its --max-epsilon
    under local DP-SGD (fednode.dpsgd), after ``round`` of the event's session."""

    KIND: ClassVar[str] = "privacy_budget"
    round: int | None = None
    dataset: str = ""
    spent_epsilon: float | None = None
    max_epsilon: float | None = None
    share: float | None = None


EVENTS: dict[str, type[Payload]] = {
    cls.KIND: cls
    for cls in (
        Session,
        RoundStarted,
        UpdateReceived,
        RoundCompleted,
        RoundFailed,
        RoundAborted,
        CoordinatorRestarted,
        CoordinatorStopped,
        TaskError,
        Participant,
        Action,
        Anomaly,
        Robustness,
        Aggregation,
        CentralDp,
        Secagg,
        Rollback,
        Audit,
        Invite,
        Quality,
        Sla,
        Security,
        Alert,
        AlertRaised,
        AlertResolved,
        AlertAcked,
        Lagged,
        Joined,
        TaskDone,
        TaskFailed,
        TaskDeclined,
        SecaggInput,
        Attack,
        PrivacyBudget,
    )
}
#: Every event kind this version knows.
KINDS: frozenset[str] = frozenset(EVENTS)
#: The kinds that carry an alert (the pushed one and the ledger's trail).
ALERT_KINDS: frozenset[str] = frozenset(k for k, cls in EVENTS.items() if issubclass(cls, Alert))


@dataclass(frozen=True)
class UnknownEvent:
    """A kind this version does not know: shown by name, acted on by nobody."""

    kind: str
    data: dict[str, Any]


@dataclass(frozen=True)
class MalformedEvent:
    """A known kind whose payload is not its shape; ``reason`` names the field."""

    kind: str
    data: dict[str, Any]
    reason: str


Parsed = Payload | UnknownEvent | MalformedEvent


def parse_event(kind: Any, data: Any) -> Parsed:
    """The typed payload of one event, or why not; never raises (see the module doc)."""
    name = text.clean(kind if isinstance(kind, str) else str(kind))
    raw: dict[str, Any] = data if isinstance(data, dict) else {}
    cls = EVENTS.get(name) if isinstance(kind, str) else None
    if cls is None:
        return UnknownEvent(name, raw)
    if not isinstance(data, dict):
        return MalformedEvent(name, {}, f"the data of a {name!r} event must be a map")
    values: dict[str, Any] = {}
    for fname, hint, required in _shape(cls):
        if fname not in data:
            if required:
                return MalformedEvent(name, raw, f"field {fname!r} is missing")
            continue
        value = data[fname]
        try:
            if isinstance(value, str) and (hint is str or str in typing.get_args(hint)):
                # Peer-written text (an alert message, a task error) is cut, not refused.
                values[fname] = text.clean(value, text.MAX_TEXT)
            else:
                values[fname] = check_value(fname, value, hint)
        except ValidationError as err:
            return MalformedEvent(name, raw, err.message)
    return cls(**values)


@functools.cache
def _shape(cls: type[Payload]) -> tuple[tuple[str, Any, bool], ...]:
    """(field, type, required) of a payload class, worked out once per class."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    )


def describe_malformed(event: UnknownEvent | MalformedEvent) -> str:
    """One cleaned line saying what was wrong with an event (for a log or a live line)."""
    if isinstance(event, UnknownEvent):
        return f"{event.kind} (an event kind this version does not know)"
    return f"{event.kind} event with unexpected data: {text.clean(event.reason, 200)}"
