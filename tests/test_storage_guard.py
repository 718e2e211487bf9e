"""fednode.storage_guard: one place where storage faults are retried, waited out and
replayed. The disk here is a stand-in that fails on demand (a failing disk is what we do
not ship); the real lock and the real full filesystem are in tests/test_storage_e2e.py."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fednode.storage_guard import StorageGuard, describe, is_storage_fault, probe_paths


class Disk:
    """Writes that fail with ``error`` while ``broken``; a log of what was written."""

    def __init__(self) -> None:
        self.broken: BaseException | None = None
        self.written: list[Any] = []

    def write(self, item: Any) -> str:
        if self.broken is not None:
            raise self.broken
        self.written.append(item)
        return f"wrote {item}"

    def probe(self) -> None:
        if self.broken is not None:
            raise self.broken


def guard_for(disk: Disk, events: list[str], up: asyncio.Event, down: asyncio.Event):
    def on_down(info: dict[str, Any]) -> None:
        events.append(f"down {info['state']} queued={info['queued']}")
        down.set()

    def on_up(info: dict[str, Any]) -> None:
        events.append(f"up queued={info['queued']} replayed={info['replayed']}")
        up.set()

    return StorageGuard(
        disk.probe, on_down=on_down, on_up=on_up, retries_s=(0.001, 0.001), probe_s=0.005
    )


def test_what_counts_as_a_storage_fault() -> None:
    assert is_storage_fault(sqlite3.OperationalError("database is locked"))
    assert is_storage_fault(sqlite3.OperationalError("database or disk is full"))
    assert is_storage_fault(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_storage_fault(sqlite3.IntegrityError("UNIQUE constraint failed"))
    assert not is_storage_fault(OSError(errno.ENOENT, "No such file"))
    assert not is_storage_fault(ValueError("a bug"))
    assert describe(OSError(errno.ENOSPC, "No space left on device")).startswith("ENOSPC")


async def test_an_outage_queues_writes_in_order_and_replays_them() -> None:
    disk, events = Disk(), []
    up, down = asyncio.Event(), asyncio.Event()
    guard = guard_for(disk, events, up, down)
    guard.write(disk.write, 1)
    disk.broken = OSError(errno.ENOSPC, "No space left on device")
    guard.write(disk.write, 2)  # fails: kept, the outage begins
    guard.write(disk.write, 3)  # not even tried: kept behind 2
    assert guard.state == "retrying" and guard.info()["queued"] == 2
    waiting = asyncio.create_task(guard.run(disk.write, 4))  # a commit waits it out
    await asyncio.wait_for(down.wait(), 5)
    assert guard.state == "down" and "ENOSPC" in guard.error
    assert not waiting.done() and disk.written == [1]
    disk.broken = None
    await asyncio.wait_for(up.wait(), 5)
    assert await asyncio.wait_for(waiting, 5) == "wrote 4"
    assert disk.written == [1, 2, 3, 4]  # order kept: nothing overtook the queue
    assert events == ["down down queued=2", "up queued=0 replayed=2"]
    assert guard.healthy
    await guard.stop()


async def test_a_blip_is_retried_without_declaring_an_outage() -> None:
    disk, events = Disk(), []
    up, down = asyncio.Event(), asyncio.Event()
    guard = guard_for(disk, events, up, down)
    guard.retries_s = (0.05, 0.05, 0.05)
    disk.broken = sqlite3.OperationalError("database is locked")
    guard.write(disk.write, "a")
    disk.broken = None  # the lock is released before the first retry
    assert await asyncio.wait_for(guard.run(disk.write, "b"), 5) == "wrote b"
    assert disk.written == ["a", "b"] and events == []  # no on_down, no on_up
    await guard.stop()


async def test_a_bug_is_raised_not_retried() -> None:
    disk, events = Disk(), []
    guard = guard_for(disk, events, asyncio.Event(), asyncio.Event())
    disk.broken = sqlite3.IntegrityError("UNIQUE constraint failed")
    with pytest.raises(sqlite3.IntegrityError):
        guard.write(disk.write, 1)
    with pytest.raises(sqlite3.IntegrityError):
        await guard.run(disk.write, 2)
    assert guard.healthy and guard.info()["queued"] == 0


async def test_a_full_queue_counts_what_it_lost() -> None:
    disk, events = Disk(), []
    up, down = asyncio.Event(), asyncio.Event()
    guard = StorageGuard(
        disk.probe,
        on_down=lambda i: down.set(),
        on_up=lambda i: (events.append(f"lost={i['lost']}"), up.set()),
        retries_s=(0.001,),
        probe_s=0.005,
        max_queued=3,
    )
    disk.broken = OSError(errno.ENOSPC, "full")
    for i in range(5):
        guard.write(disk.write, i)
    await asyncio.wait_for(down.wait(), 5)
    disk.broken = None
    await asyncio.wait_for(up.wait(), 5)
    assert disk.written == [2, 3, 4] and events == ["lost=2"]  # the oldest went first
    await guard.stop()


def test_the_probe_finds_a_held_lock(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    holder = sqlite3.connect(str(db))
    holder.execute("CREATE TABLE t (x)")
    holder.commit()
    probe_paths(db, [tmp_path])  # free: passes, and leaves no probe file behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.db"]
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        probe_paths(db, [tmp_path], lock_timeout_s=0.05)
    holder.rollback()
    holder.close()
