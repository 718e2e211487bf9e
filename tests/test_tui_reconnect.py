"""The coordinator goes away and comes back: the dashboard says so, keeps the last state
on screen, dials again with backoff, and replaces its state with the new snapshot."""

from __future__ import annotations

import asyncio
import copy

from textual.message import Message

from protocol.errors import FednodeError
from tui.app import DashboardApp
from tui.fake import NOW, SESSION, TZ, FakeLink, FakeSource, sample_link, until
from tui.messages import ConnectionChanged
from tui.widgets import SessionsTable, StatusBar


def banner(app: DashboardApp) -> str:
    return str(app.screen.query_one(StatusBar).content)


def sessions_shown(app: DashboardApp) -> list[str]:
    table = app.screen.query_one(SessionsTable)
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


async def test_stream_ends_two_failed_dials_then_a_new_snapshot() -> None:
    old = sample_link()
    snap = copy.deepcopy(old.snapshot)
    snap["sessions"] = [{**snap["sessions"][0], "session_id": "s-after0000000", "name": "after"}]
    new = FakeLink(snap, {})
    gate = asyncio.Event()
    source = FakeSource(
        old,
        FednodeError("cannot reach ws://127.0.0.1:7700: refused", code="UNREACHABLE"),
        OSError("connection refused"),
        gate,  # the fourth dial waits here until the test lets it through
        new,
    )
    delays: list[float] = []

    def hook(msg: Message) -> None:
        if isinstance(msg, ConnectionChanged) and msg.state == "down" and msg.retry_in:
            delays.append(msg.retry_in)

    app = DashboardApp(source, clock=lambda: NOW, tz=TZ, backoff=(0.05, 0.08))
    async with app.run_test(size=(80, 24), message_hook=hook) as pilot:
        await until(pilot, lambda: app.conn.snapshots == 1)
        await pilot.pause()
        before = sessions_shown(app)
        assert before[0] == SESSION and "live" in banner(app)

        old.end()  # the coordinator goes away
        await until(pilot, lambda: source.attempts == 4)  # two refusals, then the gate
        await pilot.pause()
        assert app.conn.state == "down"
        assert "disconnected" in banner(app)
        assert app.screen.query_one(StatusBar).has_class("-down")
        assert sessions_shown(app) == before  # the last state stays on screen
        assert delays[:2] == [0.05, 0.08]  # doubling, capped

        gate.set()
        await until(pilot, lambda: app.conn.snapshots == 2)
        await pilot.pause()
        assert sessions_shown(app) == ["s-after0000000"]  # replaced, not merged
        assert "live" in banner(app) and "disconnected" not in banner(app)
        assert not app.screen.query_one(StatusBar).has_class("-down")
        assert ("subscribe", {"session_id": ""}) in new.calls  # re-subscribed


async def test_lagged_event_takes_a_fresh_snapshot() -> None:
    first, second = sample_link(), sample_link()
    second.snapshot["sessions"] = second.snapshot["sessions"][:1]
    app = DashboardApp(FakeSource(first, second), clock=lambda: NOW, tz=TZ)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn.snapshots == 1)
        assert len(app.model.sessions) == 3
        first.push("lagged", {"dropped": 40})
        await until(pilot, lambda: app.conn.snapshots == 2)
        await pilot.pause()
        assert first.closed
        assert len(app.model.sessions) == 1 and sessions_shown(app) == [SESSION]


async def test_first_dial_fails_the_dashboard_still_opens() -> None:
    gate = asyncio.Event()
    source = FakeSource(FednodeError("cannot reach", code="UNREACHABLE"), gate, sample_link())
    app = DashboardApp(source, clock=lambda: NOW, tz=TZ, backoff=(0.01, 0.01))
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: source.attempts == 2)
        await pilot.pause()
        assert "disconnected: cannot reach" in banner(app)
        assert sessions_shown(app) == []
        gate.set()
        await until(pilot, lambda: app.conn.snapshots == 1)
        await pilot.pause()
        assert len(sessions_shown(app)) == 3
