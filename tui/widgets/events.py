"""The recent ledger events, newest at the bottom.

Not a RichLog: a RichLog grows its scrollable size with every line, and each growth is a
layout pass over the whole screen (tens of milliseconds with a hundred-row table beside
it). This panel has a fixed size: a new event re-renders this panel only. Focused, the
arrow and page keys scroll back through the kept events.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import tzinfo
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widget import Widget

from tui.fmt import LEVEL_STYLE, clock
from tui.state import EVENTS_KEPT, LogEntry


class EventsLog(Widget, can_focus=True):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "scroll_by(1)", "older", show=False),
        Binding("down", "scroll_by(-1)", "newer", show=False),
        Binding("pageup", "scroll_by(10)", "older", show=False),
        Binding("pagedown", "scroll_by(-10)", "newer", show=False),
        Binding("home", "scroll_by(100000)", "oldest", show=False),
        Binding("end", "scroll_by(-100000)", "newest", show=False),
    ]

    def __init__(self, *, id: str | None = None, tz: tzinfo | None = None) -> None:
        super().__init__(id=id)
        self.tz = tz
        self._entries: deque[tuple[LogEntry, list[Text]]] = deque(maxlen=EVENTS_KEPT)
        self._width = 0  # the width the kept lines were wrapped for
        self._back = 0  # lines scrolled back from the newest

    def line(self, e: LogEntry) -> Text:
        out = Text(clock(e.ts, self.tz) + " ", style="dim")
        out.append(e.text, style=LEVEL_STYLE.get(e.level, ""))
        return out

    def _wrap(self, e: LogEntry) -> list[Text]:
        if self._width <= 0:
            return []
        return list(self.line(e).wrap(self.app.console, self._width))

    def show_all(self, entries: Iterable[LogEntry]) -> None:
        self._entries.clear()
        self._back = 0
        self.add(entries)

    def add(self, entries: Iterable[LogEntry]) -> None:
        added = 0
        for e in entries:
            lines = self._wrap(e)
            self._entries.append((e, lines))
            added += len(lines)
        if self._back:  # scrolled back: keep the same lines in view
            self._back += added
        self.refresh()

    def _lines(self) -> list[Text]:
        width = self.content_size.width
        if width != self._width:
            self._width = width
            self._entries = deque(((e, self._wrap(e)) for e, _ in self._entries), EVENTS_KEPT)
        return [line for _, lines in self._entries for line in lines]

    def render(self) -> Text:
        lines = self._lines()
        height = max(1, self.content_size.height)
        self._back = max(0, min(self._back, len(lines) - height))
        end = len(lines) - self._back
        shown = lines[max(0, end - height) : end]
        if not shown:
            return Text("no events yet", style="dim")
        return Text("\n").join(shown)

    def action_scroll_by(self, lines: int) -> None:
        self._back = max(0, self._back + lines)
        self.refresh()

    def on_resize(self) -> None:
        self.refresh()
