"""Screenshots of the dashboard from a fixed, realistic snapshot, compared with the
accepted SVGs in __snapshots__/ (update them with `pytest --snapshot-update` and look at
them). The clock and the time zone are fixed, so the images are the same on every run.
"""

from __future__ import annotations

from typing import Any

import pytest
from textual.binding import Binding
from textual.pilot import Pilot

from tui.app import DashboardApp
from tui.fake import NOW, SESSION, TZ, FakeSource, sample_link, until
from tui.screens import KEYS, ConfirmScreen, HelpScreen, SessionScreen, SessionsScreen

SIZES = [(80, 24), (120, 40)]


def dashboard(session_id: str | None = None, role: str = "operator") -> DashboardApp:
    return DashboardApp(
        FakeSource(sample_link(role)), session_id=session_id, clock=lambda: NOW, tz=TZ
    )


async def loaded(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, DashboardApp)
    await until(pilot, lambda: app.conn.snapshots >= 1 and app.conn.state == "live")
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_sessions_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(dashboard(), terminal_size=size, run_before=loaded)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_session_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(dashboard(SESSION), terminal_size=size, run_before=loaded)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_help_screen(snap_compare: Any, size: tuple[int, int]) -> None:
    assert snap_compare(
        dashboard(SESSION), terminal_size=size, run_before=loaded, press=["question_mark"]
    )


def test_viewer_session_screen(snap_compare: Any) -> None:
    """A viewer key: the same panels, no action keys in the footer."""
    assert snap_compare(dashboard(SESSION, "viewer"), terminal_size=(80, 24), run_before=loaded)


def test_help_lists_every_bound_key() -> None:
    listed = " ".join(k for k, *_ in KEYS).lower()
    names = {"question_mark": "?", "escape": "esc", "enter": "enter", "ctrl+r": "ctrl+r"}
    for cls in (DashboardApp, SessionsScreen, SessionScreen, ConfirmScreen, HelpScreen):
        for b in cls.BINDINGS:
            assert isinstance(b, Binding)
            if b.system:
                continue
            for key in b.key.split(","):
                assert names.get(key, key) in listed, f"{cls.__name__}: {key} not in help"
