"""Storage faults, handled in one place: the coordinator keeps serving while it cannot write.

The ledger (SQLite) and the content store live on the node's disk. A disk can fill up, and
another process (a backup, `sqlite3` opened by hand) can hold the ledger's write lock for a
while. Neither may drop connections or fail a session, so every write the coordinator makes
goes through one ``StorageGuard``:

* ``write(fn, ...)``: a write nobody waits for (an event, a heartbeat's last-seen time, an
  update's audit copy). Done at once while storage is healthy; while it is failing, queued
  in order (bounded) and replayed when storage is back. The hash chain keeps its order
  because nothing overtakes the queue.
* ``await run(fn, ...)``: a write the caller needs done before it goes on (a round's commit,
  a model version). It waits out an outage, then runs; writes are transactions, so a failed
  attempt left nothing and a retry is safe.

A fault is first retried a few times within about 1.5 s (a blip pauses nothing). If storage
is still failing the outage is declared: ``on_down`` runs (the coordinator pauses its running
sessions and raises a critical alert), and a probe runs every second, in a thread, until a
write lock and a file write succeed and the queue has been replayed; then ``on_up`` runs (the
alert is resolved, the sessions it paused resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from fednode.ledger import probe_writable
from protocol.errors import StorageUnavailable

log = logging.getLogger("fednode.storage")

T = TypeVar("T")
RETRIES_S = (0.1, 0.2, 0.4, 0.8)  # the short retries before an outage is declared
PROBE_S = 1.0
MAX_QUEUED = 20_000  # writes kept while storage is down; beyond, the oldest are counted lost
_FAULT_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EROFS, errno.EDQUOT, errno.ENOMEM}
_SQLITE_FAULTS = ("locked", "busy", "full", "disk i/o", "readonly", "unable to open")


def is_storage_fault(exc: BaseException) -> bool:
    """Whether an exception means the disk or the ledger cannot be written now (as opposed
    to a bug or bad input, which must not be retried forever)."""
    if isinstance(exc, StorageUnavailable):
        return True
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        text = str(exc).lower()
        return any(word in text for word in _SQLITE_FAULTS)
    return isinstance(exc, OSError) and exc.errno in _FAULT_ERRNOS


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {exc}"


def probe_paths(ledger_path: Path, dirs: list[Path], lock_timeout_s: float = 0.2) -> None:
    """Raise if the ledger cannot take a write lock or a directory cannot take a file.

    Runs in a worker thread with its own SQLite connection, so a held lock never blocks the
    event loop. The file write (64 KiB, fsynced) finds a full disk that a lock test cannot.
    """
    probe_writable(ledger_path, lock_timeout_s)
    for d in dirs:
        path = d / f".probe-{os.getpid()}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"\0" * 65536)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class StorageGuard:
    def __init__(
        self,
        probe: Callable[[], None],
        *,
        on_down: Callable[[dict[str, Any]], None],
        on_up: Callable[[dict[str, Any]], None],
        retries_s: tuple[float, ...] = RETRIES_S,
        probe_s: float = PROBE_S,
        max_queued: int = MAX_QUEUED,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._probe = probe
        self._on_down = on_down
        self._on_up = on_up
        self.retries_s = retries_s
        self.probe_s = probe_s
        self.clock = clock
        self.state = "ok"  # ok | retrying | down
        self._ok = asyncio.Event()
        self._ok.set()
        self._queue: deque[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = deque(
            maxlen=max_queued
        )
        self.lost = 0  # queued writes dropped because the queue was full (logged, reported)
        self.replayed = 0  # queued writes written once storage was back, this outage
        self.since: float | None = None
        self.error = ""
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "ok"

    def info(self) -> dict[str, Any]:
        """What the outage looks like now (for alerts, events and `session status`)."""
        return {
            "state": self.state,
            "since": self.since,
            "error": self.error,
            "queued": len(self._queue),
            "replayed": self.replayed,
            "lost": self.lost,
        }

    # --- the two ways to write ------------------------------------------------------------

    def write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Do it now, or keep it (in order) for when storage is back."""
        if self.state == "ok":
            try:
                fn(*args, **kwargs)
                return
            except Exception as exc:
                if not is_storage_fault(exc):
                    raise
                self.fault(exc)
        if len(self._queue) == self._queue.maxlen:
            self.lost += 1
        self._queue.append((fn, args, kwargs))

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Do it once storage is healthy and everything queued before it is written."""
        while True:
            await self._ok.wait()
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_storage_fault(exc):
                    raise
                self.fault(exc)

    async def call(self, fn: Callable[..., Awaitable[T]]) -> T:
        """Like ``run`` for a coroutine function (a step that awaits between writes)."""
        while True:
            await self._ok.wait()
            try:
                return await fn()
            except Exception as exc:
                if not is_storage_fault(exc):
                    raise
                self.fault(exc)

    # --- faults and recovery ----------------------------------------------------------------

    def fault(self, exc: BaseException) -> None:
        """A write failed because of storage: start retrying (once per outage)."""
        if self.state != "ok":
            return
        self.state = "retrying"
        self._ok.clear()
        self.since = self.clock()
        self.error = describe(exc)
        log.warning("storage failed (%s); retrying", self.error)
        self._task = asyncio.get_running_loop().create_task(self._recover(), name="storage")

    async def _recover(self) -> None:
        for delay in self.retries_s:
            await asyncio.sleep(delay)
            if await self._heal():
                return
        self.state = "down"
        took = self.clock() - (self.since or 0)
        log.error("storage unavailable for %.1f s: %s; pausing", took, self.error)
        self._callback(self._on_down)
        while not await self._heal():
            await asyncio.sleep(self.probe_s)

    async def _heal(self) -> bool:
        """Probe, then replay the queue in order; True when both worked."""
        try:
            await asyncio.to_thread(self._probe)
        except Exception as exc:
            if not is_storage_fault(exc):
                log.exception("storage probe failed")
            else:
                self.error = describe(exc)
            return False
        while self._queue:
            fn, args, kwargs = self._queue[0]
            try:
                fn(*args, **kwargs)
            except Exception as exc:
                if is_storage_fault(exc):
                    self.error = describe(exc)
                    return False
                log.exception("a write kept during the outage failed; it was dropped")
            else:
                self.replayed += 1
            self._queue.popleft()
        was_down = self.state == "down"
        info = {**self.info(), "state": "ok", "until": self.clock()}
        self.state = "ok"
        self._ok.set()
        if self.lost:
            log.error("%d writes were lost while storage was down (queue full)", self.lost)
        if was_down:
            log.warning("storage is back after %.1f s", info["until"] - (self.since or 0))
            self._callback(self._on_up, info)
        self.since, self.lost, self.replayed = None, 0, 0
        return True

    def _callback(self, fn: Callable[[dict[str, Any]], None], info: dict | None = None) -> None:
        try:
            fn(info or self.info())
        except Exception:  # the node's reaction must not stop the recovery loop
            log.exception("storage callback failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
