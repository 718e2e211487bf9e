"""What the data worker tells the app. The worker is the only code that touches the
connection; screens learn about the coordinator only through these messages."""

from __future__ import annotations

from textual.message import Message

from tui.state import Change


class ConnectionChanged(Message):
    """The link went up, down, or is being dialled (the status bar shows it)."""

    def __init__(self, state: str, reason: str = "", retry_in: float = 0.0) -> None:
        super().__init__()
        self.state = state  # "connecting" | "live" | "down"
        self.reason = reason
        self.retry_in = retry_in


class SnapshotLoaded(Message):
    """A fresh snapshot replaced the whole model: every panel redraws."""


class StateChanged(Message):
    """One event (or a loaded session) changed these parts of the model."""

    def __init__(self, change: Change) -> None:
        super().__init__()
        self.change = change
