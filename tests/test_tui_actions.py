"""Keys that change things, against a scripted coordinator: each asks first, sends one
call, and the coordinator's answer (an event, or an error) is what the screen shows."""

from __future__ import annotations

from typing import Any

from textual.widgets._footer import FooterKey
from typer.testing import CliRunner

from fedctl.cli import app as fedctl_app
from protocol.errors import FednodeError
from tui.app import DashboardApp
from tui.fake import NOW, PEERS, SESSION, TZ, FakeLink, FakeSource, sample_link, until
from tui.screens import ConfirmScreen, HelpScreen, SessionScreen
from tui.widgets import AlertsTable, EventsLog, ParticipantsTable


class Notes:
    """Records the app's notifications (they are how errors reach the user)."""

    def __init__(self, app: DashboardApp) -> None:
        self.seen: list[tuple[str, str, str]] = []
        real = app.notify

        def notify(message: str, *, title: str = "", severity: str = "information", **kw: Any):
            self.seen.append((message, title, severity))
            return real(message, title=title, severity=severity, **kw)  # type: ignore[arg-type]

        app.notify = notify  # type: ignore[method-assign]


def dashboard(link: FakeLink, session_id: str | None = SESSION) -> DashboardApp:
    return DashboardApp(FakeSource(link), session_id=session_id, clock=lambda: NOW, tz=TZ)


def footer_keys(app: DashboardApp) -> set[str]:
    return {k.key for k in app.screen.query(FooterKey)}


async def ready(pilot: Any) -> None:
    app = pilot.app
    await until(pilot, lambda: app.conn.snapshots == 1 and isinstance(app.screen, SessionScreen))
    await pilot.pause()


async def test_pause_asks_first_then_sends_one_call() -> None:
    link = sample_link()
    app = dashboard(link)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert {"p", "x"} <= footer_keys(app) and not {"s", "r"} & footer_keys(app)
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("n")  # No: nothing is sent
        await until(pilot, lambda: isinstance(app.screen, SessionScreen))
        assert not [c for c in link.calls if c[0] == "session.pause"]

        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await until(pilot, lambda: app.model.sessions[SESSION].status == "paused")
        assert ("session.pause", {"session_id": SESSION}) in link.calls
        await pilot.pause()
        assert "r" in footer_keys(app) and "p" not in footer_keys(app)  # resume now applies

        await pilot.press("r", "y")
        await until(pilot, lambda: app.model.sessions[SESSION].status == "running")
        assert ("session.resume", {"session_id": SESSION}) in link.calls


async def test_ack_alert_and_exclude_readmit_participant() -> None:
    link = sample_link()
    app = dashboard(link)
    async with app.run_test(size=(120, 40)) as pilot:
        await ready(pilot)
        alerts = app.screen.query_one(AlertsTable)
        alerts.focus()
        await pilot.pause()
        assert alerts.selected_alert() == 7  # the critical one is first
        await pilot.press("a", "y")
        await until(pilot, lambda: app.model.alerts[7].status == "acknowledged")
        assert ("alerts.ack", {"alert_id": 7}) in link.calls
        await pilot.pause()
        assert "✓" in str(alerts.get_cell("7", "type"))

        table = app.screen.query_one(ParticipantsTable)
        table.focus()
        await pilot.pause()
        assert table.selected_key() == PEERS[0]
        await pilot.press("e", "y")
        await until(pilot, lambda: app.model.participants[PEERS[0]].excluded)
        await pilot.pause()
        assert str(table.get_cell(PEERS[0], "status")) == "excluded"
        await pilot.press("i", "y")
        await until(pilot, lambda: not app.model.participants[PEERS[0]].excluded)
        assert [c[0] for c in link.calls if c[0].startswith("participants.")] == [
            "participants.exclude",
            "participants.readmit",
        ]


async def test_coordinator_errors_become_notifications() -> None:
    def refuse(args: dict[str, Any]) -> dict[str, Any]:
        raise FednodeError("session s-… is completed", code="INVALID_STATE", hint="create one")

    link = sample_link()
    link.handlers["session.stop"] = refuse
    app = dashboard(link)
    notes = Notes(app)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        await pilot.press("x", "y")
        await until(pilot, lambda: any(t == "INVALID_STATE" for _, t, _ in notes.seen))
        msg, _, severity = next(n for n in notes.seen if n[1] == "INVALID_STATE")
        assert severity == "error" and "create one" in msg
        assert app.is_running and isinstance(app.screen, SessionScreen)
        # a call while the coordinator is gone: a notification too, never a crash
        link.end()
        await until(pilot, lambda: app.conn.state == "down")
        await pilot.press("x", "y")
        await until(pilot, lambda: any(t == "DISCONNECTED" for _, t, _ in notes.seen))
        assert app.is_running


async def test_viewer_gets_no_action_keys() -> None:
    link = sample_link(role="viewer")
    app = dashboard(link)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot)
        assert footer_keys(app) == {"question_mark", "escape"}
        app.screen.query_one(AlertsTable).focus()
        for key in "psrxaei":
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, SessionScreen), f"{key} opened a dialog"
        assert {op for op, _ in link.calls} == {"subscribe", "session.status", "quality.session"}
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.press("escape")
        await until(pilot, lambda: isinstance(app.screen, SessionScreen))


async def test_sessions_list_enter_opens_and_escape_returns() -> None:
    link = sample_link()
    app = dashboard(link, session_id=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn.snapshots == 1)
        await pilot.press("down", "enter")  # the completed session: loaded on demand
        await until(pilot, lambda: isinstance(app.screen, SessionScreen))
        assert app.screen.session_id == "s-91c04e7a2b10"
        await until(pilot, lambda: len(app.model.details["s-91c04e7a2b10"].history) == 10)
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, SessionScreen))
        link.push("session", {"status": "created", "name": "fresh"}, "s-fresh0000000")
        link.statuses["s-fresh0000000"] = {
            "session_id": "s-fresh0000000", "name": "fresh", "status": "created",
            "rounds_completed": 0, "rounds": 7, "participants": 0, "history": [],
        }  # fmt: skip
        await until(pilot, lambda: app.model.sessions.get("s-fresh0000000") is not None)
        await until(pilot, lambda: app.model.sessions["s-fresh0000000"].rounds == 7)


def test_fedctl_dashboard_needs_a_coordinator() -> None:
    result = CliRunner().invoke(fedctl_app, ["dashboard"], env={"FEDCTL_COORDINATOR": ""})
    assert result.exit_code == 2, result.output
    helped = CliRunner().invoke(fedctl_app, ["dashboard", "--help"])
    assert helped.exit_code == 0 and "--session" in helped.output


async def test_events_panel_scrolls_back_when_focused() -> None:
    link = sample_link()
    app = dashboard(link, session_id=None)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn.snapshots == 1)
        log = app.screen.query_one(EventsLog)
        await pilot.pause()
        newest = str(log.render())
        assert "round 6/10 started" in newest and "session running" not in newest
        log.focus()
        await pilot.press("home")
        await pilot.pause()
        assert "session running" in str(log.render()).splitlines()[0]  # the oldest kept
        link.push("participant", {"peer_id": PEERS[1], "online": False})
        await until(pilot, lambda: app.conn.events == 1)
        await pilot.pause()
        assert "session running" in str(log.render())  # scrolled back: the view stays
        await pilot.press("end")
        await pilot.pause()
        assert str(log.render()).splitlines()[-1].endswith("offline")
