"""The sessions table: one row per session, Enter opens it."""

from __future__ import annotations

from tui.fmt import STATUS_STYLE, num
from tui.state import SessionInfo
from tui.widgets.table import Cell, KeyedTable


def session_cells(s: SessionInfo) -> tuple[Cell, ...]:
    return (
        (s.session_id, "bold"),
        (s.name, ""),
        (s.status, STATUS_STYLE.get(s.status, "")),
        (f"{s.round}/{s.rounds}" if s.rounds else str(s.round), ""),
        (str(s.participants), ""),
        (num(s.accuracy), "green" if s.accuracy is not None else "dim"),
    )


class SessionsTable(KeyedTable):
    COLUMNS = (
        ("session", "session", 15),
        ("name", "name", 16),
        ("status", "status", 9),
        ("round", "round", 9),
        ("peers", "peers", 5),
        ("accuracy", "accuracy", 8),
    )

    def show_all(self, sessions: list[SessionInfo]) -> None:
        self.sync({s.session_id: session_cells(s) for s in sessions})

    def show(self, s: SessionInfo) -> None:
        self.put(s.session_id, session_cells(s))
