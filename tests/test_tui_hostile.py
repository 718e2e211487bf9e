"""The dashboard shows hostile text as text: an alert message and a task error carrying
rich/Textual markup and terminal escapes are shown literally, in the tables, the events
panel and the alert notification (Enter), and nothing crashes."""

from __future__ import annotations

from typing import Any

from textual.widgets._toast import Toast

from tui.app import DashboardApp
from tui.fake import NOW, PEERS, SESSION, TZ, FakeSource, sample_link, until
from tui.screens import SessionScreen
from tui.widgets import AlertsTable, EventsLog

MARKUP = "[/] [bold red]x[/] [link=http://evil]click[/link]"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\here\x1b]8;;\x1b\\\x9b1m"
HOSTILE_ALERT = {
    "id": 99,
    "severity": "critical",
    "alert_type": "security_violation",
    "entity_id": PEERS[1],
    "session_id": "",
    "message": f"security violation: {MARKUP} {ESCAPES}\u202eend",
    "status": "open",
    "created_at": NOW - 1,  # the newest critical alert: the first row
    "updated_at": NOW - 1,
}
SHOWN_ALERT = f"security violation: {MARKUP} [2J]0;pwned]8;;http://evil\\here]8;;\\1mend"


async def test_hostile_alert_and_task_error_are_shown_literally() -> None:
    link = sample_link()
    link.snapshot["alerts"].append(HOSTILE_ALERT)
    app = DashboardApp(FakeSource(link), session_id=SESSION, clock=lambda: NOW, tz=TZ)
    async with app.run_test(size=(160, 48), notifications=True) as pilot:
        await until(
            pilot, lambda: app.conn.snapshots == 1 and isinstance(app.screen, SessionScreen)
        )
        assert app.model.alerts[99].message == SHOWN_ALERT  # cleaned on the way in

        error = {"round": 6, "peer_id": PEERS[2], "code": "E[/]", "message": MARKUP + ESCAPES}
        link.push("task_error", error, SESSION)
        await until(pilot, lambda: any(e.kind == "task_error" for e in app.model.events))
        await pilot.pause()
        entry = next(e for e in app.model.events if e.kind == "task_error")
        assert entry.level == "bad"
        assert entry.text == (
            f"…{PEERS[2][-8:]} could not do round 6: E[/]: {MARKUP}"
            "[2J]0;pwned]8;;http://evil\\here]8;;\\1m"
        )
        log = app.screen.query_one(EventsLog)
        assert "could not do round 6" in log.render().plain

        alerts = app.screen.query_one(AlertsTable)
        assert alerts.get_cell("99", "message").plain == SHOWN_ALERT
        alerts.focus()
        await pilot.pause()
        assert alerts.selected_alert() == 99
        await pilot.press("enter")
        await until(pilot, lambda: bool(app.screen.query(Toast)))
        await pilot.pause()
        toast: Any = app.screen.query(Toast).first()
        shown = toast.render().plain
        assert SHOWN_ALERT in shown  # the markup is in the text, not interpreted
        assert "critical security_violation" in shown
        assert app.is_running

        screenshot = app.export_screenshot()
        assert "\x1b" not in screenshot and "\x07" not in screenshot
        assert "pwned" in screenshot  # the words are there, the escapes are not
