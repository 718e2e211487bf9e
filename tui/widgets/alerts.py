"""Active alerts, most severe first, coloured by severity (critical red, high orange,
medium yellow, low dim); the highlighted one is what `a` acknowledges."""

from __future__ import annotations

from tui.fmt import SEVERITY_SHORT, SEVERITY_STYLE
from tui.state import Alert, short
from tui.widgets.table import Cell, KeyedTable


def alert_cells(a: Alert) -> tuple[Cell, ...]:
    style = SEVERITY_STYLE.get(a.severity, "")
    acked = a.status == "acknowledged"
    return (
        (SEVERITY_SHORT.get(a.severity, a.severity.upper()), style + (" dim" if acked else "")),
        (("✓ " if acked else "") + a.alert_type, "dim" if acked else style),
        (short(a.entity_id) if a.entity_id.startswith("12D3") else a.entity_id or "–", ""),
        (a.message, "dim" if acked else ""),
    )


class AlertsTable(KeyedTable):
    COLUMNS = (
        ("severity", "sev", 4),
        ("type", "alert", 13),
        ("entity", "peer", 9),
        ("message", "message", 10),
    )

    def show_all(self, alerts: list[Alert]) -> None:
        self.sync({str(a.id): alert_cells(a) for a in alerts})

    def selected_alert(self) -> int | None:
        key = self.selected_key()
        return None if key is None else int(key)
