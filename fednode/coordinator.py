"""The coordinator node: who is connected, which sessions run, and the admin channel.

Every connection starts with the mutual handshake (fednode.transport). Then the peer's
role follows from its authenticated peer ID: one of ``--operator`` (may drive sessions),
one of ``--viewer`` (may only read), anyone else is a participant, which must register
first. Session logic lives in fednode.session; admin operations in fednode.admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from fednode import __version__
from fednode.admin import AdminAPI
from fednode.events import EventBus
from fednode.ledger import Ledger
from fednode.monitor import Action, QualityMonitor
from fednode.quality import SLA
from fednode.resume import ResumePoint, resume_point
from fednode.session import SessionRun
from fednode.storage_guard import StorageGuard, is_storage_fault, probe_paths
from fednode.store import ContentStore
from fednode.transport import (
    DEFAULT_RATE,
    HANDSHAKE_TIMEOUT_S,
    Connection,
    accept,
    is_untrustworthy,
    ws_options,
)
from fednode.uploads import ROUND_RAM_MIB, Ask, UploadSlots
from protocol import messages, tokens
from protocol import spec as spec_mod
from protocol.alerts import ALERT_SEVERITY
from protocol.blockstream import DagWalk
from protocol.cid import build_dag, normalize_cid
from protocol.errors import (
    FednodeError,
    NotAuthorized,
    NotFound,
    StorageUnavailable,
    ValidationError,
)
from protocol.handshake import error_frame
from protocol.identity import Identity
from protocol.lifecycle import TERMINAL, SessionState
from protocol.rotation import Rotation

log = logging.getLogger("fednode.coordinator")
# A participant's answers to a round: when one is refused, the round hears of it at once.
UPDATE_TYPES = frozenset({"update", "secagg_masked", "secagg_keys", "secagg_shares"})
HEARTBEAT_S = 5.0
MAX_PENDING_HANDSHAKES = 64
REGISTER_TIMEOUT_S = 10.0


@dataclass
class Peer:
    conn: Connection
    dataset: str
    num_examples: int
    connected_at: float
    last_seen: float


class Coordinator:
    def __init__(
        self,
        identity: Identity,
        ledger: Ledger,
        store: ContentStore,
        *,
        operators: set[str],
        viewers: set[str] | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
        chain: list[Rotation] | None = None,
        rate_limit: float = DEFAULT_RATE,
        sla: SLA | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        uploads: UploadSlots | None = None,
        round_ram_mib: int = ROUND_RAM_MIB,
    ):
        self.heartbeat_s = heartbeat_s
        # updates on their way at once, by count and announced bytes (fednode.uploads)
        self.uploads = uploads or UploadSlots()
        # a plain round's updates are held in memory up to this, beyond it in a file of
        # spill_dir's (fednode.round_updates)
        self.round_ram_bytes = round_ram_mib * 2**20
        self.spill_dir = ledger.path.parent / "rounds"
        self._grant_sends: set[asyncio.Task[bool]] = set()
        self.sla = sla or SLA()
        self.chain = chain or []
        self.rate_limit = rate_limit
        self.identity = identity
        self.handshake_timeout_s = handshake_timeout_s
        self.max_pending_handshakes = max_pending_handshakes
        self._pending_handshakes = 0
        self.ledger = ledger
        self.store = store
        self.operators = set(operators)
        self.viewers = set(viewers or ())
        self.peers: dict[str, Peer] = {}
        self.sessions: dict[str, SessionRun] = {}
        self.events = EventBus()
        store_root = getattr(store, "root", None)  # the embedded store's folder; IPFS has none
        self.guard = StorageGuard(
            functools.partial(
                probe_paths,
                ledger.path,
                [ledger.path.parent] + ([Path(store_root)] if store_root is not None else []),
            ),
            on_down=self._storage_down,
            on_up=self._storage_up,
        )
        self.admin = AdminAPI(self)
        self.monitor = QualityMonitor(
            ledger, self.sla, heartbeat_s, write=self.guard.write, publish=self.events.publish
        )
        self.started_at = time.time()
        self.stopping = False  # set by shutdown(): live sessions are not ending
        self._to_resume: dict[str, ResumePoint | None] = {}
        # session -> (CID, its DAG's blocks by CID) of the session's current model, which
        # SessionRun.model_bytes serves from memory: built once, streamed to every participant
        self._model_dags: dict[str, tuple[str, dict[str, bytes]]] = {}
        self._recover()
        # What the quality figures of this run are judged against, for reports made later.
        self.ledger.append_event(
            "sla", data={"sla": self.sla.to_dict(), "heartbeat_s": self.heartbeat_s}
        )

    def _recover(self) -> None:
        """Take up what the ledger says was live: a running or paused session continues
        from its last ended round once the node serves (``serve``); the round that was cut
        is recorded aborted and runs again (fednode.resume)."""
        self.ledger.mark_all_offline()
        for row in self.ledger.list_sessions():
            state = SessionState(row["status"])
            sid = row["session_id"]
            try:  # fields added since take their defaults
                row["spec"] = spec_mod.validate(row["spec"])
            except FednodeError as err:
                if state in (SessionState.RUNNING, SessionState.PAUSED):
                    self.ledger.update_session(
                        sid,
                        status=SessionState.FAILED.value,
                        ended_at=time.time(),
                        error=f"its stored spec is no longer valid: {err.message}",
                    )
                    state = SessionState.FAILED
            self.sessions[sid] = SessionRun(self, sid, row["spec"], state)
            if state in (SessionState.RUNNING, SessionState.PAUSED):
                info = self.ledger.restart_session(
                    sid,
                    reason="the coordinator stopped while the round ran; it runs again",
                    now=time.time(),
                )
                point = resume_point(self.ledger.rounds(sid), self.ledger.live_models(sid))
                self._to_resume[sid] = point
                log.warning(
                    "session %s was %s: resuming after round %s (restart %d%s)",
                    sid,
                    state.value,
                    point.rounds_done if point else 0,
                    info["restarts"],
                    f", round {info['aborted']} aborted" if info["aborted"] else "",
                )

    async def shutdown(self) -> None:
        """A clean stop (SIGTERM, Ctrl-C): the round in flight of each live session is
        recorded aborted, the sessions stay live in the ledger, and the next start of this
        node takes them up again."""
        self.stopping = True
        live = [r for r in self.sessions.values() if r._task is not None and not r._task.done()]
        for run in live:
            run._task.cancel()
        for run in live:
            with contextlib.suppress(asyncio.CancelledError):
                await run._task
            # Last in the session's chain: the next start reads it as a clean stop.
            self.guard.write(
                self.ledger.append_event,
                "coordinator_stopped",
                session_id=run.session_id,
                data={"round": run.round.number if run.round else 0},
            )

    # --- bookkeeping used by sessions and the admin API --------------------------------

    def record(
        self,
        kind: str,
        session_id: str | None,
        data: dict[str, Any],
        *,
        ledger: bool = True,
        entity_id: str | None = None,
    ) -> None:
        """Append an event to the ledger's chain (by default), then push it to subscribers:
        one road, in that order, also when storage is failing (fednode.storage_guard keeps
        the write, and the publication waits for it)."""
        if not ledger:
            self.events.publish(kind, data, session_id)
            return

        def write() -> None:
            self.ledger.append_event(kind, session_id=session_id, entity_id=entity_id, data=data)
            self.events.publish(kind, data, session_id)

        self.guard.write(write)

    def raise_alert(
        self, alert_type: str, entity_id: str, session_id: str | None, message: str
    ) -> None:
        """An alert for something that happened (fednode.quality.ALERT_SEVERITY gives the
        severity): in the ledger, then to subscribers."""
        now = time.time()

        def write() -> None:
            alert = self.ledger.raise_event_alert(
                alert_type, ALERT_SEVERITY[alert_type], entity_id, session_id, message, now
            )
            self.events.publish("alert", {"change": "raised", **alert}, session_id)

        self.guard.write(write)

    def apply(self, actions: list[Action]) -> None:
        """Carry out, in order, what the quality monitor decided (fednode.monitor.Action)."""
        for a in actions:
            if a.kind == "raise_alert" and a.alert_type and a.peer_id:
                self.raise_alert(a.alert_type, a.peer_id, a.session_id, a.reason)
            elif a.kind == "pause_session" and a.session_id in self.sessions:
                run = self.sessions[a.session_id]
                if run.state != SessionState.RUNNING:  # paused, stopped or ended meanwhile
                    continue
                run.act("pause")
                self.record(
                    "action",
                    a.session_id,
                    {"action": "pause", "reason": a.reason},
                    entity_id=a.peer_id,
                )
            elif a.kind == "exclude_peer":  # selection reads the open alert: nothing to do now
                log.warning(
                    "peer %s is left out of selection until alert %s is acknowledged: %s",
                    a.peer_id,
                    a.alert_id,
                    a.reason,
                )

    def registered_examples(self, peer_id: str) -> int:
        """The example count a connected participant registered (0 if it left)."""
        peer = self.peers.get(peer_id)
        return peer.num_examples if peer is not None else 0

    # --- storage faults (fednode.storage_guard decides when) ------------------------------

    def storage_alert(self) -> dict[str, Any] | None:
        """The outage's alert while storage is down: it cannot be in the ledger yet."""
        if self.guard.state != "down":
            return None
        info = self.guard.info()
        return {
            "id": -1,
            "alert_type": "storage_unavailable",
            "severity": ALERT_SEVERITY["storage_unavailable"],
            "entity_id": self.identity.peer_id,
            "session_id": None,
            "message": f"storage unavailable since {info['since']:.0f}: {info['error']}; "
            f"{info['queued']} writes kept in memory; running sessions paused",
            "status": "open",
            "created_at": info["since"],
            "updated_at": time.time(),
        }

    def _storage_down(self, info: dict[str, Any]) -> None:
        """Pause what is running; connections stay up; say so (in memory until it heals)."""
        alert = self.storage_alert()
        if alert is not None:
            self.events.publish("alert", {"change": "raised", **alert})
        for run in self.sessions.values():
            if run.state == SessionState.RUNNING:
                run.paused_for_storage = True
                run.act("pause")
                self.record(
                    "action",
                    run.session_id,
                    {"action": "pause", "reason": f"storage unavailable: {info['error']}"},
                )

    def _storage_up(self, info: dict[str, Any]) -> None:
        """Record the outage (raised and resolved, with its figures), resume what it paused."""
        since, until = info["since"] or info["until"], info["until"]
        self.events.publish("alert", {"change": "resolved", "id": -1})
        message = (
            f"storage was unavailable for {until - since:.1f} s ({info['error']}); "
            f"{info['replayed']} writes kept and replayed, {info['lost']} lost"
        )
        me = self.identity.peer_id

        def write() -> None:  # raised and resolved in the chain, with the figures
            severity = ALERT_SEVERITY["storage_unavailable"]
            self.ledger.raise_event_alert("storage_unavailable", severity, me, None, message, since)
            resolved = self.ledger.resolve_event_alerts("storage_unavailable", me, message, until)
            for alert in resolved:
                self.events.publish("alert", {"change": "resolved", **alert})

        self.guard.write(write)
        for run in self.sessions.values():
            if run.paused_for_storage:
                run.paused_for_storage = False
                if run.state == SessionState.PAUSED:
                    run.act("resume")
                    self.record(
                        "action",
                        run.session_id,
                        {"action": "resume", "reason": "storage is back"},
                    )

    def online_participants(self) -> list[str]:
        return sorted(self.peers)

    async def send_to(self, peer_id: str, msg: messages.Message, session_id: str = "") -> bool:
        peer = self.peers.get(peer_id)
        if peer is None:
            return False
        try:
            await peer.conn.send(msg, session_id)
        except ConnectionClosed:
            return False
        return True

    def _grant(self, grants: list[tuple[str, Ask]]) -> None:
        """Send each ``upload_grant`` (fednode.uploads), and take back, after its time to
        live, a grant whose update never came."""
        loop = asyncio.get_running_loop()
        for peer, ask in grants:
            grant = messages.UploadGrant(round=ask.round)
            task = loop.create_task(self.send_to(peer, grant, ask.session))
            self._grant_sends.add(task)  # kept until sent (the loop holds tasks weakly)
            task.add_done_callback(self._grant_sends.discard)
            loop.call_later(self.uploads.grant_ttl_s, self._expire_grants)

    def _expire_grants(self) -> None:
        self._grant(self.uploads.expire(time.time()))

    def uploads_closed(self, session_id: str, status: str) -> None:
        """A session's round stopped taking updates: its grants and asks lapse, and a
        participant whose update waited is told the round ended (``round_end`` with the
        round's status), so it stops waiting and is free for the next round."""
        grants, dropped = self.uploads.drop_session(session_id, time.time())
        self._grant(grants)
        loop = asyncio.get_running_loop()
        for peer, ask in dropped:
            end = messages.RoundEnd(round=ask.round, status=status, model_cid="")
            task = loop.create_task(self.send_to(peer, end, session_id))
            self._grant_sends.add(task)
            task.add_done_callback(self._grant_sends.discard)

    async def broadcast_session_end(self, run: SessionRun) -> None:
        end = messages.SessionEnd(status=run.state.value)
        for peer in list(self.peers):
            await self.send_to(peer, end, run.session_id)

    def create_session(self, spec: dict[str, Any]) -> str:
        session_id = "s-" + uuid.uuid4().hex[:12]
        self.ledger.create_session(
            session_id,
            name=spec["name"],
            spec=spec,
            strategy=spec["aggregation"]["strategy"],
            secure_aggregation=spec["aggregation"]["secure"],
            rounds=spec["rounds"],
            created_at=time.time(),
        )
        self.sessions[session_id] = SessionRun(self, session_id, spec)
        self.record("session", session_id, {"status": "created", "name": spec["name"]})
        return session_id

    def session(self, session_id: str) -> SessionRun:
        run = self.sessions.get(session_id)
        if run is None:
            raise NotFound(f"no session {session_id!r} on this coordinator")
        return run

    def wake_sessions(self, peer_id: str | None = None, reason: str = "") -> None:
        for run in self.sessions.values():
            if run.state not in TERMINAL:
                if peer_id:
                    run.on_peer_lost(peer_id, reason)
                else:
                    run.wake()

    # --- connections ---------------------------------------------------------------------

    async def serve(self, host: str, port: int, ssl: SSLContext | None = None) -> Any:
        self.monitor.start(self)
        server = await serve(self._handle, host, port, ssl=ssl, **ws_options())
        for sid, point in self._to_resume.items():  # participants reconnect by themselves
            self.sessions[sid].resume(point)
        self._to_resume.clear()
        return server

    async def _refused(self, conn: Connection | None, address: str, err: FednodeError) -> None:
        self.guard.write(
            self.ledger.append_event,
            "security",
            entity_id=conn.peer_id if conn else None,
            data={"address": address, "code": err.code, "message": err.message},
        )
        # A registered participant whose own signed stream broke the rules is a security
        # violation (strangers failing the handshake are not: they could pause any session).
        peer = self.peers.get(conn.peer_id) if conn is not None else None
        env = getattr(err, "envelope", None)
        if peer is not None and peer.conn is conn and env is not None and env.session:
            run = self.sessions.get(env.session)
            if run is not None and env.type in UPDATE_TYPES:  # the round stops waiting for it
                run.on_refused_update(conn.peer_id, env.type, err)
        if peer is not None and peer.conn is conn and is_untrustworthy(err):
            pid = conn.peer_id
            running = [
                r.session_id
                for r in self.sessions.values()
                if r.state == SessionState.RUNNING and self.names_of(pid) & self.allowed(r)
            ]
            self.apply(self.monitor.on_security_violation(pid, err.code, err.message, running))

    async def _handle(self, ws: ServerConnection) -> None:
        addr = ws.remote_address
        address = f"{addr[0]}:{addr[1]}" if addr else "?"
        if self._pending_handshakes >= self.max_pending_handshakes:
            # A flood of strangers must not starve the peers we know: refuse at once.
            err = FednodeError(
                f"more than {self.max_pending_handshakes} connections are authenticating",
                code="CONNECTION_LIMIT",
                hint="retry in a few seconds",
            )
            await self._refused(None, address, err)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(error_frame(err))
                await ws.close(1013, err.code)
            return
        self._pending_handshakes += 1
        try:
            conn = await accept(
                ws, self.identity, self.handshake_timeout_s, self.chain, self.rate_limit
            )
        except FednodeError as err:
            await self._refused(None, address, err)
            return
        except ConnectionClosed as closed:
            if closed.sent is not None and closed.sent.code == 1009:
                await self._refused(
                    None,
                    address,
                    FednodeError("handshake frame over the size limit", code="TOO_LARGE"),
                )
            return
        finally:
            self._pending_handshakes -= 1
        names = {conn.peer_id, *conn.aliases}  # a rotated key keeps its former standing
        if names & (self.operators | self.viewers):
            role = "operator" if names & self.operators else "viewer"
            await conn.send(
                messages.Welcome(
                    peer_id=self.identity.peer_id,
                    role=role,
                    heartbeat_s=self.heartbeat_s,
                    version=__version__,
                )
            )
            await self.admin.serve(conn, role)
            return
        await conn.send(
            messages.Welcome(
                peer_id=self.identity.peer_id,
                role="participant",
                heartbeat_s=self.heartbeat_s,
                version=__version__,
            )
        )
        try:
            _env, msg = await asyncio.wait_for(conn.recv(), REGISTER_TIMEOUT_S)
            if not isinstance(msg, messages.Register):
                raise NotAuthorized(
                    f"a participant must register first, sent {msg.TYPE!r}",
                    hint="only operators may send other messages first",
                )
            sessions = self.admit(conn.peer_id, msg.join_token, conn.aliases)
        except (FednodeError, TimeoutError) as err:
            if isinstance(err, TimeoutError):
                err = FednodeError(
                    f"no register message within {REGISTER_TIMEOUT_S:.0f} s",
                    code="REGISTER_TIMEOUT",
                )
            await self._refused(conn, conn.address, err)
            await conn.send_error(err)
            await conn.close(1008, err.code)
            return
        except ConnectionClosed:
            return
        await conn.send(messages.Admitted(sessions=sessions))
        await self._serve_participant(conn, msg)

    # --- admission -----------------------------------------------------------------------

    def _open_sessions(self) -> list[SessionRun]:
        return [r for r in self.sessions.values() if r.state not in TERMINAL]

    def allowed(self, run: SessionRun) -> set[str]:
        """Peers that may take part in a session: listed in its spec, or invited."""
        return set(run.spec["participants"]) | self.ledger.members(run.session_id)

    def names_of(self, peer_id: str) -> set[str]:
        """A connected peer's current ID and the former IDs its rotation chain proved."""
        peer = self.peers.get(peer_id)
        return {peer_id, *(peer.conn.aliases if peer else ())}

    def admit(self, peer_id: str, join_token: str, aliases: tuple[str, ...] = ()) -> list[str]:
        """The open sessions this peer may join; refuse a peer that has none.

        With a join token, the token must be this coordinator's, unexpired, for an open
        session, and not used up by other peers; a use is counted once per peer.
        """
        if join_token:
            tok = tokens.check(join_token, coordinator=self.identity, now=time.time())
            run = self.sessions.get(tok.session_id)
            if run is None or run.state in TERMINAL:
                state = "unknown" if run is None else run.state.value
                raise tokens.TokenError(
                    f"the join token is for session {tok.session_id}, which is {state}",
                    code="TOKEN_SESSION_CLOSED",
                )
            try:
                self.ledger.use_token(tok.token_id, tok.session_id, peer_id)
            except NotFound:
                raise tokens.TokenError(
                    f"join token {tok.token_id} is not in this coordinator's ledger"
                ) from None
            except Exception as exc:  # counting a use is a write: it may meet a storage fault
                if not is_storage_fault(exc):
                    raise
                self.guard.fault(exc)
                raise StorageUnavailable(
                    "this coordinator cannot record the invite's use now (storage unavailable)",
                    hint="the participant retries by itself",
                ) from None
        names = {peer_id, *aliases}
        sessions = [r.session_id for r in self._open_sessions() if names & self.allowed(r)]
        if not sessions:
            raise NotAuthorized(
                f"peer {peer_id} is not listed in any open session and has no join token",
                hint="list its peer ID in the spec's participants, or give it an invite "
                "(`fedctl invite --session ID`) to pass with --join-token",
            )
        return sessions

    async def _serve_participant(self, conn: Connection, reg: messages.Register) -> None:
        pid = conn.peer_id
        old = self.peers.get(pid)
        if old is not None:  # the same node reconnected: the newer connection wins
            await old.conn.close(1000, "replaced by a newer connection")
        now = time.time()
        self.peers[pid] = Peer(conn, reg.dataset, reg.num_examples, now, now)
        self.monitor.on_connect(pid, now, reg.data_report)
        self.guard.write(
            self.ledger.upsert_participant,
            pid,
            address=conn.address,
            dataset=reg.dataset,
            num_examples=reg.num_examples,
            online=1,
            last_seen=now,
        )
        self.record(
            "participant",
            None,
            {"peer_id": pid, "online": True, "dataset": reg.dataset},
            entity_id=pid,
        )
        self.wake_sessions()
        try:
            async for env, msg in conn.messages(self._refused):
                self.peers[pid].last_seen = time.time()
                try:
                    await self._on_participant_message(conn, env.session, env.size, msg)
                except FednodeError as err:
                    await conn.send_error(err)
        finally:
            if self.peers.get(pid) is not None and self.peers[pid].conn is conn:
                del self.peers[pid]
                self._grant(self.uploads.release(pid, time.time()))
                self.monitor.on_disconnect(pid, time.time())
                self.guard.write(
                    self.ledger.upsert_participant, pid, online=0, last_seen=time.time()
                )
                self.record("participant", None, {"peer_id": pid, "online": False}, entity_id=pid)
                self.wake_sessions(pid, "disconnected during the round")

    async def _send_blocks(self, conn: Connection, session_id: str, cid: str) -> int:
        """Send model ``cid`` as its DAG's blocks, one ``block`` message each, in the order
        the participant checks them (protocol.blockstream.DagWalk: the root, then depth
        first); returns the bytes sent. Each send is awaited, so no more than one block is
        in hand, and a participant that leaves ends the stream (ConnectionClosed)."""
        get_block = await self._block_source(session_id, cid)
        walk = DagWalk(cid)
        sent = 0
        while (block_cid := walk.expected()) is not None:
            data = await get_block(block_cid)
            walk.visit(data)
            sent += await conn.send(messages.Block(cid=block_cid, data=data), session_id)
        return sent

    async def _block_source(self, session_id: str, cid: str) -> Callable[[str], Awaitable[bytes]]:
        """Where the blocks of ``cid`` come from: the session's current model from memory
        (its DAG built once), anything else from the store, block by block, each re-hashed
        there (in a thread: with --ipfs-api every block is a daemon request)."""
        run = self.sessions.get(session_id)
        blob = run.model_bytes(cid) if run is not None else None
        key = normalize_cid(cid)
        cached = self._model_dags.get(session_id)
        if blob is not None and (cached is None or cached[0] != key):
            root, blocks = await asyncio.to_thread(build_dag, blob)
            self._model_dags = {s: v for s, v in self._model_dags.items() if s in self.sessions}
            self._model_dags[session_id] = cached = (root, {b.cid: b.data for b in blocks})
        if blob is not None and cached is not None and cached[0] == key:
            in_memory = cached[1]

            async def from_memory(block_cid: str) -> bytes:
                return in_memory[normalize_cid(block_cid)]

            return from_memory

        async def from_store(block_cid: str) -> bytes:
            return await asyncio.to_thread(self.store.get_block, block_cid)

        return from_store

    async def _on_participant_message(
        self, conn: Connection, session_id: str, size: int, msg: messages.Message
    ) -> None:
        if isinstance(msg, messages.Heartbeat):
            now = time.time()
            self.guard.write(self.ledger.upsert_participant, conn.peer_id, last_seen=now)
            self.monitor.on_heartbeat(conn.peer_id, now, msg.cpu_efficiency, msg.memory_efficiency)
        elif isinstance(msg, messages.Fetch):
            run = self.sessions.get(session_id)
            delta = await run.model_delta(msg.cid, msg.have) if run and msg.have else None
            if delta is not None:  # smaller than the model (docs/compression.md)
                sent = await conn.send(
                    messages.ModelDelta(
                        cid=msg.cid,
                        base=msg.have,
                        result=delta.result_cid,
                        encoding=delta.encoding,
                        data=delta.data,
                    ),
                    session_id,
                )
            else:
                sent = await self._send_blocks(conn, session_id, msg.cid)
            if run is not None:
                run.on_bytes_down(sent, conn.peer_id)
        elif isinstance(msg, messages.UploadReady):
            run = self.session(session_id)
            run.check_upload(conn.peer_id, msg.round)
            ask = Ask(session_id, msg.round, msg.bytes)
            grants = self.uploads.ask(conn.peer_id, ask, time.time())
            run.note_upload(conn.peer_id not in dict(grants), len(self.uploads.granted))
            self._grant(grants)
        elif isinstance(msg, messages.Update):
            run = self.session(session_id)
            try:
                if not self.uploads.holds(conn.peer_id, session_id, msg.round):
                    err = ValidationError(
                        f"an update of round {msg.round} sent without an upload_grant",
                        code="NOT_GRANTED",
                        hint="a participant sends upload_ready and waits for upload_grant",
                    )
                    run.on_refused_update(conn.peer_id, msg.TYPE, err)
                    raise err
                run.on_update(conn.peer_id, msg, size)
            finally:  # accepted or refused, the slot is free for the next in line
                self._grant(self.uploads.release(conn.peer_id, time.time()))
        elif isinstance(msg, messages.SECAGG_FROM_PARTICIPANT):
            self.session(session_id).on_secagg(conn.peer_id, msg, size)
        elif isinstance(msg, messages.TaskError):
            log.warning(
                "participant %s could not do round %d: %s %s",
                conn.peer_id,
                msg.round,
                msg.code,
                msg.message,
            )
            self.session(session_id).on_task_error(conn.peer_id, msg)
        else:
            raise ValidationError(
                f"a participant may not send {msg.TYPE!r}", code="UNEXPECTED_MESSAGE"
            )
