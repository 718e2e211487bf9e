"""The live dashboard: `fedctl dashboard`.

One data worker owns the connection. It dials the coordinator through the ``source``,
subscribes, builds a fresh ``DashboardState`` from the snapshot, then applies every pushed
event to it and posts a ``StateChanged`` message naming what moved; the screens redraw
exactly that. When the coordinator goes away the worker says so (the status bar turns
red, the last state stays on screen) and dials again with backoff (0.5 s doubling to 5 s);
a successful reconnect, or a ``lagged`` event, replaces the model with a new snapshot.
Nothing in the UI polls anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen

from protocol.errors import FednodeError
from protocol.lifecycle import TERMINAL
from protocol.operations import Op
from protocol.text import clean
from tui.messages import ConnectionChanged, SnapshotLoaded, StateChanged
from tui.screens import ConfirmScreen, DashScreen, HelpScreen, SessionScreen, SessionsScreen
from tui.source import Link, Source
from tui.state import Change, DashboardState

BACKOFF = (0.5, 5.0)  # first delay, longest delay (seconds)


def backoff_delays(first: float = BACKOFF[0], cap: float = BACKOFF[1]) -> Iterator[float]:
    """0.5, 1, 2, 4, 5, 5, …: quick after a blip, gentle on a coordinator that is down."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


def reason_of(err: BaseException) -> str:
    """One line for the status bar or a notification; a refusal may quote the coordinator."""
    if isinstance(err, FednodeError):
        return clean(err.message)
    return clean(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)


@dataclass
class ConnState:
    """What the status bar shows; tests also wait on these counters."""

    state: str = "connecting"  # connecting | live | down
    role: str = ""  # operator | viewer, from the last successful handshake
    reason: str = ""
    retry_in: float = 0.0
    attempts: int = 0  # connection attempts, failed or not
    snapshots: int = 0  # snapshots loaded
    events: int = 0  # events applied since the start


class DashboardApp(App[None]):
    TITLE = "fednode dashboard"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    .panel, EventsLog, MetricsPlot {
        border: round $primary-darken-2;
        border-title-color: $text;
        border-title-style: bold;
        background: $background;
    }
    .panel:focus, EventsLog:focus { border: round $accent; }
    Horizontal > .panel, Horizontal > EventsLog, Horizontal > MetricsPlot { height: 100%; }
    DataTable { scrollbar-size-vertical: 1; overflow-x: hidden; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("q", "quit", "quit", show=False),
        Binding("ctrl+r", "resync", "re-sync", show=False),
    ]

    def __init__(
        self,
        source: Source,
        *,
        session_id: str | None = None,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
        backoff: tuple[float, float] = BACKOFF,
    ) -> None:
        """``clock`` and ``tz`` are injectable so that a screenshot of a fixed snapshot is
        identical on every machine and every run."""
        super().__init__()
        self.source = source
        self.clock = clock
        self.tz = tz
        self.backoff = backoff
        self.model = DashboardState()
        self.conn = ConnState()
        self.link: Link | None = None
        self.initial_session = session_id
        self._resync = asyncio.Event()
        self._statuses: dict[str, str] = {}  # session statuses the footer was built for

    @property
    def is_operator(self) -> bool:
        return self.conn.role == "operator"

    def get_default_screen(self) -> Screen[Any]:
        return SessionsScreen()

    def on_mount(self) -> None:
        if self.initial_session:
            self.open_session(self.initial_session)
        self.run_worker(
            self._connection_loop(), name="connection", group="connection", exit_on_error=False
        )

    # --- the data worker ---------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delays: Iterator[float] | None = None
        while True:
            self.conn.attempts += 1
            try:
                link = await self.source.connect()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # whatever the dial raised: say it, wait, dial again
                delays = delays or backoff_delays(*self.backoff)
                delay = next(delays)
                self._set_conn("down", reason_of(err), delay)
                await asyncio.sleep(delay)
                continue
            delays = None
            reason = "the coordinator closed the connection"
            try:
                if await self._serve(link):
                    self._set_conn("connecting", "re-syncing")
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as err:
                reason = reason_of(err)
            finally:
                self.link = None
                with contextlib.suppress(Exception):
                    await link.close()
            self._set_conn("down", reason, 0.0)

    async def _serve(self, link: Link) -> bool:
        """Snapshot, then events until the stream ends; True means: re-snapshot now."""
        snap = (await link.call(Op.SUBSCRIBE, session_id=""))["snapshot"]
        model = DashboardState()
        model.apply_snapshot(snap)
        if "events" not in snap:  # a coordinator without it: ask, or start the log empty
            with contextlib.suppress(FednodeError, KeyError):
                model.apply_events_list((await link.call(Op.EVENTS_LIST, limit=50))["events"])
        for sid in self._wanted(model):
            with contextlib.suppress(FednodeError):
                await self._load(link, model, sid)
        self.model = model
        self.link = link
        self.conn.role = link.role
        self.conn.snapshots += 1
        self._resync.clear()
        self._set_conn("live")
        self.post_message(SnapshotLoaded())
        stream = aiter(link.stream())
        while True:
            ev = await self._next_event(stream)
            if ev is None:
                return self._resync.is_set()
            change = self.model.apply_event(ev.kind, ev.session_id, ev.ts, ev.data)
            self.conn.events += 1
            if change.resnapshot:
                return True
            for sid in sorted(change.fetch):
                with contextlib.suppress(FednodeError):
                    change.merge(await self._load(link, self.model, sid))
            self.post_message(StateChanged(change))

    @staticmethod
    async def _load(link: Link, model: DashboardState, session_id: str) -> Change:
        """One session's history and round in flight, and its health so far."""
        change = model.apply_status(await link.call(Op.SESSION_STATUS, session_id=session_id))
        with contextlib.suppress(FednodeError):  # quality is optional: show without it
            change.merge(
                model.apply_quality(
                    session_id, await link.call(Op.QUALITY_SESSION, session_id=session_id)
                )
            )
        return change

    async def _next_event(self, stream: Any) -> Any:
        """The next pushed event, or None when the stream ended or a re-sync was asked."""
        nxt = asyncio.ensure_future(anext(stream, None))
        resync = asyncio.ensure_future(self._resync.wait())
        try:
            done, _ = await asyncio.wait({nxt, resync}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            resync.cancel()
        if nxt in done:
            return nxt.result()
        nxt.cancel()
        return None

    def _wanted(self, model: DashboardState) -> list[str]:
        """Sessions whose history and round we load up front: live ones and open ones."""
        open_ = {s.session_id for s in self.screen_stack if isinstance(s, SessionScreen)}
        if self.initial_session:
            open_.add(self.initial_session)
        return sorted(
            sid for sid, s in model.sessions.items() if s.status not in TERMINAL or sid in open_
        ) + sorted(sid for sid in open_ if sid not in model.sessions)

    def _set_conn(self, state: str, reason: str = "", retry_in: float = 0.0) -> None:
        self.conn.state, self.conn.reason, self.conn.retry_in = state, reason, retry_in
        self.post_message(ConnectionChanged(state, reason, retry_in))

    # --- messages from the worker -------------------------------------------------------

    def _screens(self) -> list[DashScreen]:
        return [s for s in self.screen_stack if isinstance(s, DashScreen) and s.is_mounted]

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        for screen in self._screens():
            screen.show_connection()
        self.refresh_bindings()

    def on_snapshot_loaded(self, message: SnapshotLoaded) -> None:
        for screen in self._screens():
            screen.refresh_all()
        self._statuses = {sid: s.status for sid, s in self.model.sessions.items()}
        self.refresh_bindings()

    def on_state_changed(self, message: StateChanged) -> None:
        for screen in self._screens():
            screen.apply_change(message.change)
        moved = {
            sid: self.model.sessions[sid].status
            for sid in message.change.sessions
            if sid in self.model.sessions
        }
        if any(self._statuses.get(sid) != st for sid, st in moved.items()):
            self._statuses.update(moved)
            # which lifecycle keys apply changed; the footer's recompose costs a layout pass,
            # so not for every completed round
            self.refresh_bindings()

    # --- what screens ask for ----------------------------------------------------------

    def open_session(self, session_id: str) -> None:
        for screen in self.screen_stack:  # one session screen at a time
            if isinstance(screen, SessionScreen) and screen.session_id == session_id:
                return
        while isinstance(self.screen, SessionScreen | ConfirmScreen | HelpScreen):
            self.pop_screen()
        self.push_screen(SessionScreen(session_id))
        info = self.model.sessions.get(session_id)
        det = self.model.details.get(session_id)
        if self.link is not None and (det is None or (info and info.status in TERMINAL)):
            self.run_worker(self._load_session(session_id), group="calls", exit_on_error=False)

    def close_session(self, screen: SessionScreen) -> None:
        if self.screen is screen:
            self.pop_screen()

    async def _load_session(self, session_id: str) -> None:
        link = self.link
        if link is None:
            return
        model = self.model
        try:
            change = await self._load(link, model, session_id)
        except FednodeError as err:
            self.notify(reason_of(err), title=clean(err.code, 64), severity="error", markup=False)
            return
        if self.model is model:  # not a stale answer from before a reconnect
            self.post_message(StateChanged(change))

    def confirm(
        self, question: str, consequence: str, op: str, args: dict[str, Any], done: str
    ) -> None:
        """Ask first; on yes, send the call and report the outcome as a notification."""

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._call(op, args, done), group="calls", exit_on_error=False)

        self.push_screen(ConfirmScreen(question, consequence), answered)

    async def _call(self, op: str, args: dict[str, Any], done: str) -> None:
        link = self.link
        if link is None:
            self.notify(
                "not connected to the coordinator",
                title="DISCONNECTED",
                severity="error",
                markup=False,
            )
            return
        try:
            await link.call(op, **args)
        except FednodeError as err:
            hint = f"\n{clean(err.hint)}" if err.hint else ""
            self.notify(
                reason_of(err) + hint,
                title=clean(err.code, 64),
                severity="error",
                timeout=8,
                markup=False,
            )
            return
        except Exception as err:  # never let a failed call take the dashboard down
            self.notify(reason_of(err), title="ERROR", severity="error", timeout=8, markup=False)
            return
        self.notify(done, markup=False)

    # --- app keys ----------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.is_operator))

    def action_resync(self) -> None:
        """Drop the model and take a fresh snapshot (as after a `lagged` event)."""
        self._resync.set()
