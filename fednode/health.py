"""Liveness and readiness over HTTP: ``fednode run --health HOST:PORT`` (docs/monitoring.md).

``GET /livez`` answers 200 while the node's event loop runs. ``GET /readyz`` answers 200 when
the node is ready and 503 when it is not, with the reasons as a small JSON body::

    {"ready": false, "stopping": false, "checks": {"accepting": true, "ledger_writable": false}}

A coordinator is ready when its websocket server accepts handshakes, its storage is not in an
outage (fednode.storage_guard) and its ledger takes a write lock; a participant when it is
connected, handshaken and admitted by its coordinator and its ledger takes a write lock. On
SIGTERM the node marks itself ``stopping`` first, so readiness answers 503 while it winds
down, and the server closes last.

Why asyncio in the node's own event loop, not ``http.server`` in a thread: the answer to
``/livez`` is made by the event loop itself, so a loop that is stuck (a blocking call, a
deadlock) fails the probe, which is what a liveness probe is for; a thread would go on
answering 200. The readiness checks read the node's state in the loop's thread, without
locks. Only the standard library: asyncio's streams, ``http.HTTPStatus``.

Bounded, since anyone who can reach the address may call it: GET and HEAD on the two paths
only (405, 404 otherwise), one request per connection, the request's head at most
``MAX_HEAD`` bytes read within ``READ_TIMEOUT_S``, at most ``MAX_CONNECTIONS`` at once (more
are closed at once), answers of a few hundred bytes. No peer of the federation speaks to it.
The ledger check is a real write lock (``fednode.ledger.probe_writable``: BEGIN IMMEDIATE,
then ROLLBACK) on its own connection in a worker thread, at most once per ``PROBE_EVERY_S``
(answers in between reuse the last result), so probes can neither stall the loop nor load
the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from fednode.ledger import probe_writable

log = logging.getLogger("fednode.health")

MAX_HEAD = 8192
READ_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 32
PROBE_EVERY_S = 1.0
LOCK_WAIT_S = 0.5  # within a probe's usual 1 s timeout; a node's own write lasts far less

Checks = Callable[[], dict[str, bool]]


class LedgerProbe:
    """Whether the ledger at ``path`` takes a write lock now, probed at most once per
    ``every_s``; one probe in flight at a time."""

    def __init__(
        self, path: Path, every_s: float = PROBE_EVERY_S, lock_wait_s: float = LOCK_WAIT_S
    ) -> None:
        self.path = path
        self.every_s = every_s
        self.lock_wait_s = lock_wait_s
        self._ok = False
        self._at: float | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._at is not None and time.monotonic() - self._at < self.every_s

    async def writable(self) -> bool:
        if self._fresh():
            return self._ok
        async with self._lock:
            if not self._fresh():
                self._ok = await self._probe()
                self._at = time.monotonic()
        return self._ok

    async def _probe(self) -> bool:
        if not self.path.exists():  # not created yet: a probe must not be what creates it
            return False
        try:
            await asyncio.to_thread(probe_writable, self.path, self.lock_wait_s)
        except (sqlite3.Error, OSError) as exc:
            log.warning("readiness: ledger %s not writable: %s", self.path, exc)
            return False
        return True


class Health:
    """The probe server. ``checks`` gives the role's checks (name -> passes); the ledger's
    write check is added as ``ledger_writable``. Replace ``checks`` as the node comes up."""

    def __init__(self, ledger: Path, checks: Checks) -> None:
        self.checks = checks
        self.ledger = LedgerProbe(ledger)
        self.stopping = False
        self.url = ""
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: a free port); the base URL."""
        self._server = await asyncio.start_server(self._client, host, port, limit=MAX_HEAD)
        bound = self._server.sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        checks = dict(self.checks())
        checks["ledger_writable"] = await self.ledger.writable()
        ready = all(checks.values()) and not self.stopping
        return ready, {"ready": ready, "stopping": self.stopping, "checks": checks}

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            answer = await self._answer(reader)
            if answer is not None:
                status, body, head_only = answer
                writer.write(_response(status, body, head_only))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader
    ) -> tuple[HTTPStatus, dict[str, object], bool] | None:
        """The status and body for one request; None: nothing to answer (closed, too slow)."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, {"error": "request too large"}, False
        except (asyncio.IncompleteReadError, TimeoutError):
            return None
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return HTTPStatus.BAD_REQUEST, {"error": "not an HTTP/1 request"}, False
        method, path = parts[0], parts[1].split("?", 1)[0]
        if path not in ("/livez", "/readyz"):
            return HTTPStatus.NOT_FOUND, {"error": "GET /livez or /readyz"}, False
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": "GET only"}, False
        if path == "/livez":
            return HTTPStatus.OK, {"live": True}, method == "HEAD"
        ready, body = await self.readiness()
        status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
        return status, body, method == "HEAD"


def _response(status: HTTPStatus, body: dict[str, object], head_only: bool) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode() + b"\n"
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == HTTPStatus.METHOD_NOT_ALLOWED:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else data)
