"""What the parts of a coordinator need of each other, as narrow typed interfaces.

The coordinator (fednode.coordinator) builds a session run per session, one quality monitor
and one admin API, and hands each of them itself; a session run builds a secure round. Each
part is annotated with the interface below that says what it uses, not with the class that
happens to provide it, so no part imports the module of the part it serves and fednode/ has
no import cycle (tests/test_imports.py). The classes satisfy these structurally
(``typing.Protocol``): nothing here is inherited or registered.

* ``Recorder``: events into the hash chain and to subscribers, event-driven alerts;
* ``Peers``: the connected participants (send to one, who is online, their names);
* ``SessionHost``: what a session run (fednode.session) uses of the node: the ledger, the
  store, the storage guard, the event bus, the monitor's hooks, plus the two above;
* ``MonitorHost``: what the quality monitor's loop (fednode.monitor) uses of the node;
* ``AdminHost``: what the admin API (fednode.admin) uses of the node;
* ``SessionControl``/``RoundView``: what the monitor, the admin API and a secure round see
  of a session run and its round in flight; ``SecureSession`` what a secure round
  (fednode.secure_round) uses of its session run.

Only types: nothing here runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fednode.events import EventBus
    from fednode.ledger import Ledger
    from fednode.quality import SLA, ParticipantObservation, ParticipantScores
    from fednode.storage_guard import StorageGuard
    from fednode.store import ContentStore
    from fednode.strategies.base import State, Strategy
    from fednode.transport import Connection
    from fednode.weights import Weights
    from protocol import messages
    from protocol.errors import FednodeError
    from protocol.identity import Identity
    from protocol.lifecycle import RoundPhase, SessionState


# --- a session run and its round, as the other parts see them ---------------------------------


class RoundView(Protocol):
    """The round in flight (fednode.rounds.RoundRun)."""

    number: int
    model_cid: str
    selected: list[str]
    started_at: float
    phase: RoundPhase
    failed: dict[str, str]
    not_needed: list[str]  # over-selection's spares, not waited for: no task counted
    bytes_up: int
    next_state: State | None  # the strategy's state after this round's aggregate

    @property
    def received(self) -> Mapping[str, Any]: ...


class SessionControl(Protocol):
    """A session run (fednode.session.SessionRun) as the node's other parts drive it."""

    session_id: str
    spec: dict[str, Any]
    shapes: Any  # the model's tensor names and shapes
    state: SessionState
    round: RoundView | None
    paused_for_storage: bool

    def act(self, action: str) -> SessionState: ...
    def wake(self) -> None: ...
    def on_peer_lost(self, peer: str, reason: str) -> None: ...
    def request_rollback(self, to_round: int, by: str) -> dict[str, Any]: ...
    def model_bytes(self, cid: str) -> bytes | None: ...


class SecureSession(Protocol):
    """What a secure round (fednode.secure_round) uses of its session run."""

    session_id: str
    spec: dict[str, Any]
    shapes: Any
    strategy: Strategy
    strategy_state: State  # that of the current model version
    global_cid: str
    global_weights: Weights
    coord: Recorder

    def assigned_weights(self, selected: list[str], max_weight: int) -> dict[str, int]: ...
    def record_masked(self, peer: str, msg: messages.SecaggMasked, size: int) -> None: ...


# --- the node, as each part sees it --------------------------------------------------------


class Recorder(Protocol):
    """Events into the ledger's hash chain (by default) and then to subscribers; alerts for
    something that happened (protocol.alerts gives the severity)."""

    def record(
        self,
        kind: str,
        session_id: str | None,
        data: dict[str, Any],
        *,
        ledger: bool = True,
        entity_id: str | None = None,
    ) -> None: ...

    def raise_alert(
        self, alert_type: str, entity_id: str, session_id: str | None, message: str
    ) -> None: ...


class Peers(Protocol):
    """The connected participants."""

    def online_participants(self) -> list[str]: ...
    async def send_to(self, peer_id: str, msg: messages.Message, session_id: str = "") -> bool: ...
    def names_of(self, peer_id: str) -> set[str]: ...
    def registered_examples(self, peer_id: str) -> int: ...


class MonitorHooks(Protocol):
    """What a session run tells the quality monitor, and asks it."""

    def after_round(
        self, run: SessionControl, rnd: RoundView, anomalous_pct: float | None
    ) -> Any: ...  # what the monitor decided (fednode.monitor), for the node to apply
    def on_update(
        self, peer_id: str, session_id: str, now: float, msg: messages.Update
    ) -> None: ...
    def on_model_quality(self, peer_id: str, score: float) -> None: ...
    def on_round_figures(
        self, session_id: str, metrics: Mapping[str, float], loss: float | None
    ) -> None: ...
    def on_task_error(self, peer_id: str, session_id: str, round: int, code: str) -> None: ...
    def alerted(self) -> set[str]: ...
    def excluded(self) -> set[str]: ...


class PeerScoring(MonitorHooks, Protocol):
    """What the admin API reads of the monitor: each peer's figures, measured now."""

    peers: Mapping[str, Any]

    def score_peer(
        self, peer_id: str, now: float
    ) -> tuple[ParticipantObservation, ParticipantScores]: ...


class SessionHost(Recorder, Peers, Protocol):
    """What a session run uses of the node."""

    ledger: Ledger
    store: ContentStore
    guard: StorageGuard
    events: EventBus
    monitor: MonitorHooks
    stopping: bool

    def allowed(self, run: SessionControl) -> set[str]: ...
    async def broadcast_session_end(self, run: SessionControl) -> None: ...
    def apply(self, actions: Any) -> None: ...  # what the monitor decided (fednode.monitor)
    def uploads_closed(self, session_id: str, status: str) -> None: ...  # grants lapse


class MonitorHost(Protocol):
    """What the quality monitor's loop uses of the node: whether storage can take writes,
    the connected peers to ping, the sessions (whose round a peer is in), and the node's
    hand to carry out what an evaluation decided."""

    guard: StorageGuard
    peers: Mapping[str, Any]  # peer ID -> connected peer (``.conn`` for pings)
    sessions: Mapping[str, SessionControl]

    def apply(self, actions: Any) -> None: ...


class AdminHost(Recorder, Protocol):
    """What the admin API uses of the node."""

    identity: Identity
    ledger: Ledger
    store: ContentStore
    guard: StorageGuard
    events: EventBus
    sla: SLA
    monitor: PeerScoring
    peers: Collection[str]
    sessions: Mapping[str, SessionControl]
    started_at: float
    _refused: Callable[[Connection | None, str, FednodeError], Awaitable[None]]

    def session(self, session_id: str) -> SessionControl: ...
    def create_session(self, spec: dict[str, Any]) -> str: ...
    def wake_sessions(self, peer_id: str | None = None, reason: str = "") -> None: ...
    def storage_alert(self) -> dict[str, Any] | None: ...
    def allowed(self, run: SessionControl) -> set[str]: ...
