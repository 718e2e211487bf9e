"""The operator's side of the admin channel: an authenticated peer like any other.

fedctl and the dashboard dial the coordinator, prove their operator key in the same
handshake participants use, and send signed ``admin`` messages. Replies are matched to
requests by id; pushed ``event`` messages go to a queue for watchers.

A coordinator is no more trusted than a participant, and it relays participants' words
(alert messages, task errors, dataset names). Every reply and every event is therefore
cleaned here, at receipt, with protocol.text.clean_tree: fedctl and the dashboard
(tui/source.py wraps this client) see no control character and no string longer than
protocol.text.MAX_TEXT, whatever was sent. Bytes (models, blocks) pass untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed

from fednode.api import EVENT_STREAM_RATE, Connection, dial, private_dir
from protocol import messages, text
from protocol.errors import FednodeError
from protocol.identity import Identity, public_key_from_peer_id

CALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClientEvent:
    kind: str
    session_id: str  # "" for node-wide events (participants coming and going)
    ts: float
    data: dict[str, Any]


def default_key_path() -> Path:
    env = os.environ.get("FEDCTL_HOME")
    return (Path(env).expanduser() if env else Path.home() / ".fedctl") / "operator.key"


def operator_identity(key: Path | None) -> Identity:
    """The operator key, created (mode 0600) on first use."""
    path = key or default_key_path()
    private_dir(path.parent)  # ~/.fedctl holds the operator's key: 0700
    return Identity.load_or_create(path)


@dataclass
class Target:
    url: str
    coordinator_id: str
    key: Path | None

    def check(self) -> None:
        if not self.url:
            raise FednodeError(
                "no coordinator given",
                code="USAGE",
                hint="pass --coordinator ws://HOST:PORT or set FEDCTL_COORDINATOR",
            )
        if not self.coordinator_id:
            raise FednodeError(
                "no coordinator peer ID given",
                code="USAGE",
                hint="pass --coordinator-id 12D3KooW… (from `fednode id` on the "
                "coordinator) or set FEDCTL_COORDINATOR_ID",
            )
        public_key_from_peer_id(self.coordinator_id)


class AdminClient:
    def __init__(self, target: Target):
        target.check()
        self.target = target
        self.identity = operator_identity(target.key)
        self.conn: Connection | None = None
        self.role = ""
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: asyncio.Queue[ClientEvent | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AdminClient:
        try:
            self.conn = await dial(
                self.target.url,
                self.identity,
                self.target.coordinator_id,
                rate=EVENT_STREAM_RATE,  # a watch of a thousand participants' events
            )
        except FednodeError as err:  # a refusal in the handshake quotes the coordinator
            err.message = text.clean(err.message)
            err.hint = text.clean(err.hint)
            err.code = text.clean(err.code, 64)
            raise
        assert self.conn.welcome is not None
        self.role = self.conn.welcome.role
        if self.role not in ("operator", "viewer"):
            await self.conn.close()
            raise FednodeError(
                f"the coordinator does not know this key ({self.identity.peer_id}) as an operator",
                code="NOT_AUTHORIZED",
                hint=f"start the coordinator with --operator {self.identity.peer_id}",
            )
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()

    async def _read(self) -> None:
        assert self.conn is not None
        err: FednodeError = FednodeError(
            "the coordinator closed the connection",
            code="DISCONNECTED",
            hint="check that the coordinator is still running",
        )
        try:
            async for env, msg in self.conn.messages():
                if isinstance(msg, messages.AdminReply):
                    fut = self._pending.pop(msg.id, None)
                    if fut is None or fut.done():
                        continue
                    if msg.ok:
                        fut.set_result(text.clean_tree(msg.result))
                    else:
                        e = text.clean_tree(msg.error)
                        fut.set_exception(
                            FednodeError(
                                text.clean(str(e.get("message"))),
                                code=text.clean(str(e.get("code")), 64),
                                hint=text.clean(str(e.get("hint") or "")),
                            )
                        )
                elif isinstance(msg, messages.Event):
                    data = text.clean_tree(msg.data)
                    self.events.put_nowait(ClientEvent(msg.kind, env.session, msg.ts, data))
                elif isinstance(msg, messages.Error):
                    err = FednodeError(msg.message, code=msg.code, hint=msg.hint)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self.events.put_nowait(None)

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.conn is not None
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = fut
        try:
            await self.conn.send(messages.Admin(id=self._next_id, op=op, args=args))
        except ConnectionClosed:
            self._pending.pop(self._next_id, None)
            raise FednodeError(
                "the coordinator closed the connection", code="DISCONNECTED"
            ) from None
        try:
            return await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        except TimeoutError:
            raise FednodeError(
                f"no answer to {op!r} within {CALL_TIMEOUT_S:.0f} s", code="TIMEOUT"
            ) from None

    async def stream(self) -> AsyncIterator[ClientEvent]:
        """Pushed events until the connection closes (after a ``subscribe`` call)."""
        while True:
            ev = await self.events.get()
            if ev is None:
                return
            yield ev


def call(target: Target, op: str, **args: Any) -> dict[str, Any]:
    """One admin call from synchronous code."""

    async def go() -> dict[str, Any]:
        async with AdminClient(target) as client:
            return await client.call(op, **args)

    return asyncio.run(go())
