"""Websocket transport: runs the handshake, then checks every envelope.

This is the only module that touches sockets. It drives protocol.handshake and
protocol.envelope, and owns the policy for bad input: a frame that cannot be authenticated
(garbage, bad signature, replay, impostor) gets a signed error frame and the connection is
closed; a well-authenticated message with invalid fields gets an error frame and the
connection stays open. Either way the node goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, WebSocketException

from fednode.tls import client_context, ssl_object_of, verified_peer_id
from protocol import messages
from protocol.envelope import Envelope, ReplayGuard, open_frame, seal
from protocol.errors import (
    DecodeError,
    FednodeError,
    HandshakeError,
    PeerMismatch,
    ReplayError,
    SignatureError,
    ValidationError,
)
from protocol.handshake import (
    ClientHandshake,
    HandshakeResult,
    ServerHandshake,
    error_frame,
    raise_if_refusal,
)
from protocol.identity import Identity
from protocol.limits import HANDSHAKE_MAX_BYTES, RateLimited, TokenBucket, check_size
from protocol.rotation import Rotation

log = logging.getLogger("fednode.transport")

MAX_FRAME_BYTES = 64 * 1024 * 1024  # a 16M-parameter float32 model fits; larger is refused
HANDSHAKE_TIMEOUT_S = 10.0
DEFAULT_RATE = 200.0  # messages/s per connection, bursts of twice that
# What an operator's or viewer's client takes from the coordinator it dialled: the event
# stream of a round of 1,000 participants is 1,000 update_received events within a second
# or two. Each frame is still capped in size (protocol.limits); only the rate is higher.
EVENT_STREAM_RATE = 10_000.0
# Errors after which the peer's stream cannot be trusted any more: close the connection.
_FATAL = (DecodeError, SignatureError, ReplayError, RateLimited)

Websocket = ServerConnection | ClientConnection


def is_untrustworthy(err: FednodeError) -> bool:
    """Whether a refusal means the peer's stream cannot be trusted (and is closed)."""
    return isinstance(err, _FATAL)


# A peer closed for misbehaving may have flooded this node: its close reply can sit behind
# frames that are no longer read (reading pauses when the queue is full), so the closing
# handshake gets one second instead of websockets' default ten before the socket is dropped.
POLICY_CLOSE_TIMEOUT_S = 1.0


async def close_for_policy(ws: Websocket, reason: str) -> None:
    """Close with 1008 (policy violation) without waiting long for a hostile peer's reply."""
    ws.close_timeout = POLICY_CLOSE_TIMEOUT_S
    with contextlib.suppress(ConnectionClosed):
        await ws.close(1008, reason[:120])


RefusalHook = Callable[["Connection | None", str, FednodeError], Awaitable[None] | None]


def ws_options() -> dict[str, Any]:
    # Compression off: models are incompressible floats and deflate costs CPU on both ends.
    return {
        "max_size": MAX_FRAME_BYTES,
        "compression": None,
        "ping_interval": 20,
        "ping_timeout": 20,
    }


def _address(ws: Websocket) -> str:
    addr = ws.remote_address
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)


async def _recv_bytes(ws: Websocket, timeout: float, what: str) -> bytes:
    try:
        frame = await asyncio.wait_for(ws.recv(), timeout)
    except TimeoutError:
        raise HandshakeError(
            f"peer sent no {what} within {timeout:.0f} s", code="HANDSHAKE_TIMEOUT"
        ) from None
    if not isinstance(frame, bytes):
        raise DecodeError(f"{what} must be a binary frame, got text")
    return frame


class Connection:
    """An authenticated connection: signed envelopes out, verified envelopes in."""

    def __init__(
        self,
        ws: Websocket,
        identity: Identity,
        result: HandshakeResult,
        clock: Callable[[], float] = time.time,
        rate: float = DEFAULT_RATE,
    ):
        self.ws = ws
        self.identity = identity
        self.peer_id = result.peer_id
        self.public_key = result.public_key
        self.aliases = result.aliases  # former peer IDs, proven by a key-rotation chain
        self.channel = result.channel
        self.address = _address(ws)
        self.clock = clock
        self._seq = 0
        self._guard = ReplayGuard()
        self._bucket = TokenBucket(rate=rate, burst=2 * rate)
        self._send_lock = asyncio.Lock()
        self.welcome: messages.Welcome | None = None

    async def send(self, msg: messages.Message, session: str = "") -> int:
        """Sign and send one message; returns the frame size in bytes."""
        async with self._send_lock:  # sequence numbers must hit the wire in order
            self._seq += 1
            frame = seal(
                self.identity,
                channel=self.channel,
                type=msg.TYPE,
                seq=self._seq,
                payload=messages.payload(msg),
                ts=self.clock(),
                session=session,
            )
            await self.ws.send(frame)
        return len(frame)

    async def send_error(self, err: FednodeError) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.send(messages.Error(code=err.code, message=err.message, hint=err.hint))

    async def recv(self) -> tuple[Envelope, messages.Message]:
        """One verified, typed message. Raises FednodeError or ConnectionClosed."""
        frame = await self.ws.recv()
        now = self.clock()
        self._bucket.take(now)
        if not isinstance(frame, bytes):
            raise DecodeError("fednode frames are binary; got a text frame")
        env = open_frame(
            frame,
            channel=self.channel,
            sender_peer_id=self.peer_id,
            sender_public_key=self.public_key,
        )
        self._guard.check(env, now)
        try:
            check_size(env.type, env.size)
            return env, messages.parse(env.type, env.payload)
        except ValidationError as err:
            # A well-signed but invalid message: who handles the refusal may need to know
            # what it was (an update the round is waiting for, say).
            err.envelope = env  # type: ignore[attr-defined]
            raise

    async def messages(
        self, on_refusal: RefusalHook | None = None
    ) -> AsyncIterator[tuple[Envelope, messages.Message]]:
        """Yield messages until the peer leaves; apply the bad-input policy on the way."""
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return
            except FednodeError as err:
                log.warning(
                    "refused frame from %s (%s): %s: %s",
                    self.peer_id,
                    self.address,
                    err.code,
                    err.message,
                )
                if on_refusal is not None:
                    res = on_refusal(self, self.address, err)
                    if asyncio.iscoroutine(res):
                        await res
                await self.send_error(err)
                if isinstance(err, _FATAL):
                    await self.close(1008, err.code)
                    return
                if not isinstance(err, ValidationError):
                    raise

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if code == 1008:
            await close_for_policy(self.ws, reason)
        else:
            await self.ws.close(code, reason[:120])


async def accept(
    ws: ServerConnection,
    identity: Identity,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    chain: list[Rotation] | None = None,
    rate: float = DEFAULT_RATE,
) -> Connection:
    """Server side of the handshake. On failure: an error frame, the socket closed, raise."""
    hs = ServerHandshake(identity, chain=chain)
    # Until the peer is authenticated it may send only small frames: a stranger must not make
    # this node buffer megabytes. websockets reads this limit afresh for every frame.
    ws.protocol.max_message_size = HANDSHAKE_MAX_BYTES
    try:
        await ws.send(hs.on_hello(await _recv_bytes(ws, timeout, "hello")))
        result = hs.on_auth(await _recv_bytes(ws, timeout, "auth"))
        ws.protocol.max_message_size = MAX_FRAME_BYTES
    except FednodeError as err:
        try:
            await ws.send(error_frame(err))
            await close_for_policy(ws, err.code)
        except ConnectionClosed:
            pass
        raise
    return Connection(ws, identity, result, rate=rate)


async def dial(
    url: str,
    identity: Identity,
    expected_peer_id: str,
    timeout: float = HANDSHAKE_TIMEOUT_S,
    chain: list[Rotation] | None = None,
    rate: float = DEFAULT_RATE,
) -> Connection:
    """Client side: connect and authenticate the server as ``expected_peer_id``; ``rate``
    bounds the messages a second it accepts from it.

    With a ``wss://`` URL the server's certificate must be bound to an Ed25519 identity
    (fednode.tls) and that identity must be the very key the fednode handshake then
    authenticates: TLS is checked against the peer ID, never against a CA.
    """
    tls = url.startswith("wss://")
    try:
        ws = await asyncio.wait_for(
            connect(url, ssl=client_context() if tls else None, **ws_options()), timeout
        )
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise FednodeError(
            f"cannot reach {url}: {exc or 'timed out'}",
            code="UNREACHABLE",
            hint="check that the node runs, the address is right, and ws:// vs wss://",
        ) from None
    hs = ClientHandshake(identity, expected_peer_id, chain=chain)
    try:
        tls_peer = verified_peer_id(ssl_object_of(ws)) if tls else None
        await ws.send(hs.hello())
        await ws.send(hs.on_challenge(await _recv_bytes(ws, timeout, "challenge")))
        assert hs.result is not None
        if tls_peer is not None and tls_peer != hs.result.peer_id:
            # The certificate's identity must be the key we just authenticated (which is
            # the expected peer ID, or its successor by a verified rotation chain).
            raise PeerMismatch(
                f"the TLS certificate belongs to {tls_peer}, the handshake to {hs.result.peer_id}"
            )
        conn = Connection(ws, identity, hs.result, rate=rate)
        # The server speaks first after auth: a Welcome, or a refusal with its reason.
        first = await _recv_bytes(ws, timeout, "welcome")
        raise_if_refusal(first)
        env = open_frame(
            first,
            channel=conn.channel,
            sender_peer_id=conn.peer_id,
            sender_public_key=conn.public_key,
        )
        conn._guard.check(env, conn.clock())
        msg = messages.parse(env.type, env.payload)
    except FednodeError as err:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(error_frame(err))
        await close_for_policy(ws, err.code)
        raise
    except ConnectionClosed:
        raise HandshakeError(f"{url} closed the connection during the handshake") from None
    if isinstance(msg, messages.Error):
        await ws.close()
        raise FednodeError(msg.message, code=msg.code, hint=msg.hint)
    if not isinstance(msg, messages.Welcome):
        await close_for_policy(ws, "EXPECTED_WELCOME")
        raise HandshakeError(f"expected a welcome from {url}, got {msg.TYPE!r}")
    conn.welcome = msg
    return conn
