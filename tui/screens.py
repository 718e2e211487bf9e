"""The screens: the sessions list, one session, the confirmation dialog and the help.

Screens turn a ``Change`` into calls on their widgets (one row, one panel) and turn keys
into requests to the app; they never talk to the coordinator themselves. Every key that
changes something asks for a confirmation first, and is hidden and refused for a viewer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import tzinfo
from typing import Any, ClassVar, Protocol, cast

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widget import Widget
from textual.widgets import Button, DataTable, Footer, Label, Static

from protocol.lifecycle import allowed_actions
from protocol.operations import Op, lifecycle_op
from tui.source import Source
from tui.state import Change, DashboardState, headline_label, short
from tui.widgets import (
    AlertsTable,
    EventsLog,
    MetricsPlot,
    ParticipantsTable,
    RoundProgress,
    SessionsTable,
    SessionTitle,
    StatusBar,
)
from tui.widgets.participants import participant_cells, participants_line


class ConnView(Protocol):
    """The connection as the status bar shows it (tui.app.ConnState)."""

    state: str
    role: str
    reason: str
    retry_in: float


class Dash(Protocol):
    """What the screens use of the app (tui.app.DashboardApp, which imports the screens):
    they read its model and ask it to act; they never import it."""

    model: DashboardState
    conn: ConnView
    source: Source
    clock: Callable[[], float]
    tz: tzinfo | None

    @property
    def is_operator(self) -> bool: ...
    def open_session(self, session_id: str) -> None: ...
    def close_session(self, screen: SessionScreen) -> None: ...
    def confirm(
        self, question: str, consequence: str, op: str, args: dict[str, Any], done: str
    ) -> None: ...


# Actions that change something on the coordinator: operator keys only.
OPERATOR_ACTIONS = frozenset({"start", "pause", "resume", "stop", "ack", "exclude", "readmit"})

LIFECYCLE: dict[str, tuple[str, str]] = {  # action: (verb, what happens)
    "start": ("Start", "Rounds begin as soon as enough participants are online."),
    "pause": ("Pause", "The round in flight completes; no new round starts until resumed."),
    "resume": ("Resume", "The next round starts as soon as enough participants are online."),
    "stop": ("Stop", "The round in flight is aborted. A stopped session cannot be restarted."),
}


def set_title(widget: Widget, title: str) -> None:
    """Only when it changed: setting a border title repaints the whole widget."""
    if widget.border_title != title:
        widget.border_title = title


class DashScreen(Screen[None]):
    """What both data screens share: the status bar, the footer, operator-only keys."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("question_mark", "app.help", "help", key_display="?"),
        Binding("s", "start", "start"),
        Binding("p", "pause", "pause"),
        Binding("r", "resume", "resume"),
        Binding("x", "stop", "stop"),
        Binding("a", "ack", "ack"),
    ]

    @property
    def dash(self) -> Dash:
        return cast("Dash", self.app)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """A viewer key gets no action keys at all: hidden from the footer and refused.
        Lifecycle keys that do not apply to the session's state are hidden too, which
        keeps the footer within 80 columns and says what can be done now."""
        if action in OPERATOR_ACTIONS and not self.dash.is_operator:
            return False
        if action in LIFECYCLE:
            sid = self.target_session()
            info = self.dash.model.sessions.get(sid) if sid else None
            return info is None or action in allowed_actions(info.status)
        return True

    def on_mount(self) -> None:
        self.show_connection()
        self.refresh_all()

    def show_connection(self) -> None:
        c = self.dash.conn
        bar = self.query_one(StatusBar)
        bar.show(self.dash.source.label, c.role, c.state, c.reason, c.retry_in)

    def refresh_all(self) -> None:
        """Redraw every panel from the model (after a snapshot)."""

    def apply_change(self, change: Change) -> None:
        """Redraw what one event changed."""

    def target_session(self) -> str | None:
        """The session the lifecycle keys act on."""
        return None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on an alert: its whole message, which a narrow table cuts. The message may
        quote a peer (a security violation): shown as plain text, never parsed as markup."""
        if event.data_table.id == "alerts" and event.row_key.value is not None:
            alert = self.dash.model.alerts.get(int(event.row_key.value))
            if alert is not None:
                self.notify(
                    alert.message, title=f"{alert.severity} {alert.alert_type}", markup=False
                )

    def _lifecycle(self, action: str) -> None:
        sid = self.target_session()
        if sid is None:
            self.notify("no session selected", severity="warning", markup=False)
            return
        info = self.dash.model.sessions.get(sid)
        verb, consequence = LIFECYCLE[action]
        name = f"{info.name} ({sid})" if info and info.name else sid
        self.dash.confirm(
            f"{verb} session {name}?",
            consequence,
            lifecycle_op(action),
            {"session_id": sid},
            f"{verb.lower()} sent to {sid}",
        )

    def action_start(self) -> None:
        self._lifecycle("start")

    def action_pause(self) -> None:
        self._lifecycle("pause")

    def action_resume(self) -> None:
        self._lifecycle("resume")

    def action_stop(self) -> None:
        self._lifecycle("stop")

    def action_ack(self) -> None:
        table = self.query_one(AlertsTable)
        alert_id = table.selected_alert()
        alert = self.dash.model.alerts.get(alert_id) if alert_id is not None else None
        if alert is None:
            self.notify(
                "no alert selected (Tab to the alerts panel)", severity="warning", markup=False
            )
            return
        if alert.status == "acknowledged":
            self.notify(f"alert {alert.id} is already acknowledged", markup=False)
            return
        who = short(alert.entity_id) if alert.entity_id else "the node"
        self.dash.confirm(
            f"Acknowledge alert {alert.id}: {alert.severity} {alert.alert_type} on {who}?",
            "An acknowledged critical alert no longer keeps its peer out of rounds.",
            Op.ALERTS_ACK,
            {"alert_id": alert.id},
            f"alert {alert.id} acknowledged",
        )


class SessionsScreen(DashScreen):
    """Every session of the coordinator; Enter opens one."""

    DEFAULT_CSS = """
    SessionsScreen #sessions { height: 1fr; min-height: 5; }
    SessionsScreen #bottom { height: 2fr; min-height: 7; }
    SessionsScreen #alerts { width: 3fr; }
    SessionsScreen #events { width: 2fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "open", "open")]

    def compose(self) -> ComposeResult:
        yield StatusBar()
        with Vertical():
            yield SessionsTable(id="sessions", classes="panel")
            with Horizontal(id="bottom"):
                yield AlertsTable(id="alerts", classes="panel")
                yield EventsLog(id="events", tz=self.dash.tz)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#sessions").border_title = "sessions · Enter opens"
        self.query_one("#alerts").border_title = "alerts"
        self.query_one("#events").border_title = "events"
        super().on_mount()
        self.query_one(SessionsTable).focus()

    def refresh_all(self) -> None:
        m = self.dash.model
        self.query_one(SessionsTable).show_all(list(m.sessions.values()))
        self._alerts()
        self.query_one(EventsLog).show_all(m.session_events())

    def _alerts(self) -> None:
        alerts = self.dash.model.alerts_sorted()
        table = self.query_one(AlertsTable)
        table.show_all(alerts)
        set_title(table, f"alerts ({len(alerts)})" if alerts else "alerts · none")

    def apply_change(self, change: Change) -> None:
        if change.full:
            self.refresh_all()
            return
        m = self.dash.model
        table = self.query_one(SessionsTable)
        for sid in sorted(change.sessions):
            if sid in m.sessions:
                table.show(m.sessions[sid])
        if change.alerts:
            self._alerts()
        if change.events:
            self.query_one(EventsLog).add(change.events)

    def target_session(self) -> str | None:
        return self.query_one(SessionsTable).selected_key()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "sessions" and event.row_key.value is not None:
            self.dash.open_session(str(event.row_key.value))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "sessions":  # the lifecycle keys follow the highlight
            self.refresh_bindings()

    def action_open(self) -> None:
        sid = self.target_session()
        if sid is not None:
            self.dash.open_session(sid)


class SessionScreen(DashScreen):
    """One session: its round in flight, the plot, participants, alerts, events."""

    DEFAULT_CSS = """
    SessionScreen #top { height: 4fr; min-height: 8; }
    SessionScreen #progress { width: 2fr; min-width: 36; max-width: 64; padding: 0 1; }
    SessionScreen #plot { width: 3fr; }
    SessionScreen #participants { height: 3fr; min-height: 5; }
    SessionScreen #bottom { height: 3fr; min-height: 6; }
    SessionScreen #alerts { width: 3fr; }
    SessionScreen #events { width: 2fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("e", "exclude", "exclude"),
        Binding("i", "readmit", "readmit"),
    ]

    def __init__(self, session_id: str) -> None:
        super().__init__()
        self.session_id = session_id

    def compose(self) -> ComposeResult:
        yield StatusBar()
        yield SessionTitle()
        with Horizontal(id="top"):
            yield RoundProgress(id="progress", classes="panel")
            yield MetricsPlot(id="plot")
        yield ParticipantsTable(id="participants", classes="panel")
        with Horizontal(id="bottom"):
            yield AlertsTable(id="alerts", classes="panel")
            yield EventsLog(id="events", tz=self.dash.tz)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#progress").border_title = "current round"
        self.query_one("#participants").border_title = "participants"
        self.query_one("#alerts").border_title = "alerts"
        self.query_one("#events").border_title = "events"
        super().on_mount()
        self.query_one(ParticipantsTable).focus()
        self.set_interval(1.0, self._tick)

    # -- drawing ------------------------------------------------------------------------

    def refresh_all(self) -> None:
        self._title()
        self._progress()
        self._plot()
        self._participants(None)
        self._alerts()
        self.query_one(EventsLog).show_all(self.dash.model.session_events(self.session_id))

    def apply_change(self, change: Change) -> None:
        if change.full:
            self.refresh_all()
            return
        sid = self.session_id
        if sid in change.sessions or sid in change.details:
            self._title()
        if sid in change.sessions or sid in change.rounds:
            self._progress()
        if sid in change.history:
            self._plot()
        peers = set(change.participants)
        if sid in change.rounds:
            det = self.dash.model.details.get(sid)
            if det is not None and det.current is not None:
                peers |= set(det.current.selected)
        if peers:
            self._participants(peers)
        if change.alerts:
            self._alerts()
        if change.events:
            mine = [e for e in change.events if e.session_id in ("", sid)]
            if mine:
                self.query_one(EventsLog).add(mine)

    def _title(self) -> None:
        m = self.dash.model
        self.query_one(SessionTitle).show(
            m.sessions.get(self.session_id), m.details.get(self.session_id), m.loaded
        )

    def _progress(self) -> None:
        m = self.dash.model
        det = m.details.get(self.session_id)
        self.query_one(RoundProgress).show(
            m.sessions.get(self.session_id), det.current if det else None, self.dash.clock()
        )

    def _plot(self) -> None:
        m = self.dash.model
        det = m.details.get(self.session_id)
        info = m.sessions.get(self.session_id)
        plot = self.query_one(MetricsPlot)
        plot.show(det.points() if det else [], info.rounds if info else 0)
        n = len(det.history) if det else 0
        label = headline_label(det.points() if det else [])
        set_title(plot, f"[green]{label}[/] · [orange]loss[/] (right) · {n} rounds")

    def _participants(self, peers: set[str] | None) -> None:
        """All rows (peers None) or just these, cell by cell."""
        m = self.dash.model
        table = self.query_one(ParticipantsTable)
        now = self.dash.clock()
        sid = self.session_id
        if peers is None:
            table.sync(
                {
                    pid: participant_cells(p, m.round_state(sid, pid), now)
                    for pid, p in m.participants.items()
                }
            )
        else:
            for pid in sorted(peers):
                p = m.participants.get(pid)
                if p is not None:
                    table.put(pid, participant_cells(p, m.round_state(sid, pid), now))
        set_title(table, f"participants · {participants_line(m.participants.values())}")

    def _alerts(self) -> None:
        alerts = self.dash.model.alerts_sorted(self.session_id)
        table = self.query_one(AlertsTable)
        table.show_all(alerts)
        set_title(table, f"alerts ({len(alerts)})" if alerts else "alerts · none")

    def _tick(self) -> None:
        """Elapsed times move on without events; redraw only what shows one."""
        det = self.dash.model.details.get(self.session_id)
        if det is not None and det.current is not None and det.current.phase == "training":
            self._progress()
        self._participants(None)

    # -- keys ---------------------------------------------------------------------------

    def target_session(self) -> str | None:
        return self.session_id

    def action_back(self) -> None:
        self.dash.close_session(self)

    def _peer_action(self, action: str) -> None:
        pid = self.query_one(ParticipantsTable).selected_key()
        if pid is None:
            self.notify("no participant selected", severity="warning", markup=False)
            return
        p = self.dash.model.participants.get(pid)
        if action == "exclude":
            if p is not None and p.excluded:
                self.notify(f"{short(pid)} is already excluded", markup=False)
                return
            self.dash.confirm(
                f"Exclude participant {short(pid)}?",
                "It is left out of every round of every session until readmitted.",
                Op.PARTICIPANTS_EXCLUDE,
                {"peer_id": pid, "reason": "excluded from the dashboard"},
                f"{short(pid)} excluded",
            )
        else:
            if p is not None and not p.excluded:
                self.notify(f"{short(pid)} is not excluded", markup=False)
                return
            self.dash.confirm(
                f"Readmit participant {short(pid)}?",
                "It can be selected again from the next round on.",
                Op.PARTICIPANTS_READMIT,
                {"peer_id": pid},
                f"{short(pid)} readmitted",
            )

    def action_exclude(self) -> None:
        self._peer_action("exclude")

    def action_readmit(self) -> None:
        self._peer_action("readmit")


class ConfirmScreen(ModalScreen[bool]):
    """Yes or no before anything changes; No is the default."""

    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen #dialog {
        width: 64; max-width: 96%; height: auto; max-height: 90%;
        border: thick $warning; background: $surface; padding: 1 2;
    }
    ConfirmScreen #question { text-style: bold; width: 100%; }
    ConfirmScreen #consequence { color: $text-muted; margin: 1 0; width: 100%; }
    ConfirmScreen #buttons { height: auto; align-horizontal: right; }
    ConfirmScreen Button { margin-left: 2; min-width: 10; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n", "answer(False)", "no"),
        Binding("escape", "answer(False)", "cancel", show=False),
    ]

    def __init__(self, question: str, consequence: str) -> None:
        super().__init__()
        self.question = question
        self.consequence = consequence

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            # the question names a session and an alert: coordinator text, never markup
            yield Label(self.question, id="question", markup=False)
            yield Label(self.consequence, id="consequence", markup=False)
            with Horizontal(id="buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


# --- help ------------------------------------------------------------------------------

# (keys, what it does, where, operator only). tests/test_tui_snapshots.py checks that
# every key bound on an app screen is listed here.
KEYS: list[tuple[str, str, str, bool]] = [
    ("Enter", "open the highlighted session", "sessions", False),
    ("Enter", "on an alert: show its whole message", "both", False),
    ("Esc", "back to the sessions list", "session", False),
    ("s", "start the session", "both", True),
    ("p", "pause it after the round in flight", "both", True),
    ("r", "resume a paused session", "both", True),
    ("x", "stop it (aborts the round in flight)", "both", True),
    ("a", "acknowledge the highlighted alert", "both", True),
    ("e", "exclude the highlighted participant", "session", True),
    ("i", "readmit the highlighted participant", "session", True),
    ("Tab / Shift+Tab", "focus the next / previous panel", "all", False),
    ("↑↓ PgUp/Dn Home/End", "move in a table; scroll the events panel", "panels", False),
    ("Ctrl+R", "re-sync: take a fresh snapshot", "all", False),
    ("?", "this help (Esc closes it)", "all", False),
    ("q, Ctrl+Q", "quit", "all", False),
    ("y / n, Esc", "confirm / cancel a dialog", "dialog", False),
]


class HelpScreen(ModalScreen[None]):
    """Every key, where it works, and which ones a viewer key does not get."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen #help {
        width: 90; max-width: 100%; height: auto; max-height: 100%;
        border: thick $primary; background: $surface; padding: 0 1;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss_help", "close", key_display="Esc"),
    ]

    def __init__(self, operator: bool) -> None:
        super().__init__()
        self.operator = operator

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(self._table())

    def on_mount(self) -> None:
        box = self.query_one("#help")
        box.border_title = "fednode dashboard · keys"
        box.border_subtitle = "Esc closes"

    def _table(self) -> Table:
        t = Table(box=None, expand=True, padding=(0, 1), show_edge=False, header_style="bold")
        t.add_column("key", style="bold cyan", no_wrap=True, min_width=10)
        t.add_column("does", ratio=3)
        t.add_column("where", style="dim", no_wrap=True, width=8)
        for keys, what, where, op in KEYS:
            desc = Text(what)
            if op:
                desc.append(" *", style="bold yellow")
                if not self.operator:
                    desc.stylize("dim")
            t.add_row(keys, desc, where)
        note = (
            "* operator keys, each confirmed first"
            if self.operator
            else "* operator keys: off for a viewer key"
        )
        t.add_row("", Text(note, style="italic yellow"), "")
        return t

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
