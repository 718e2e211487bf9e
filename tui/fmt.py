"""Wording and colours shared by the widgets, so one figure reads the same everywhere.

Everything takes ``now`` and a time zone from the caller (the app's injectable clock),
never the wall clock, so a screenshot of a fixed snapshot is the same on every run.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

from rich.text import Text

SEVERITY_STYLE = {
    "critical": "bold red",
    "high": "bold dark_orange",
    "medium": "yellow",
    "low": "dim",
}
SEVERITY_SHORT = {"critical": "CRIT", "high": "HIGH", "medium": "MED", "low": "LOW"}
STATUS_STYLE = {
    "created": "",
    "running": "bold cyan",
    "paused": "bold yellow",
    "completed": "green",
    "failed": "bold red",
    "stopped": "magenta",
}
LEVEL_STYLE = {"": "", "good": "green", "warn": "yellow", "bad": "red"}


def num(v: float | None, pattern: str = "{:.4f}") -> str:
    """A figure that was not measured is shown as a dash, never as 0."""
    return "–" if v is None else pattern.format(v)


def ago(seconds: float | None) -> str:
    """Elapsed time at the precision a person reads it with."""
    if seconds is None:
        return "–"
    s = max(0.0, seconds)
    if s < 120:  # whole seconds: the panels tick once a second
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


def clock(ts: float | None, tz: tzinfo | None) -> str:
    """HH:MM:SS of a unix time in the app's zone (local unless one was given)."""
    if ts is None:
        return "--:--:--"
    return datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S")


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def severity_text(severity: str, *, short: bool = True) -> Text:
    label = SEVERITY_SHORT.get(severity, severity.upper()) if short else severity
    return Text(label, style=SEVERITY_STYLE.get(severity, ""))


def bar(fraction: float, width: int, style: str = "green") -> Text:
    """A plain progress bar: partial cells would not survive every terminal font."""
    width = max(1, width)
    filled = round(max(0.0, min(1.0, fraction)) * width)
    out = Text("█" * filled, style=style)
    out.append("░" * (width - filled), style="dim")
    return out
