"""A DataTable whose rows are keyed by an id and updated cell by cell.

With a hundred participants, rebuilding the table for every update would redraw and
re-measure every row; here an event changes exactly the cells whose text changed, and a
full sync only rebuilds when the order of rows itself changed.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable

Cell = tuple[str, str]  # (text, rich style): comparable, unlike rendered Text objects


class KeyedTable(DataTable[Text]):
    """Fixed-width columns but the last, which takes the room left (at least its width),
    so a table never needs a horizontal scrollbar at 80 columns and uses the space at 200."""

    COLUMNS: tuple[tuple[str, str, int], ...] = ()  # (key, label, width)

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._order: list[str] = []
        self._flex = self.COLUMNS[-1][2] if self.COLUMNS else 0
        self._add_columns()
        self.rebuilds = 0  # how often the whole table was rebuilt (the perf test reads it)

    def _add_columns(self) -> None:
        for i, (key, label, width) in enumerate(self.COLUMNS):
            last = i == len(self.COLUMNS) - 1
            self.add_column(label, width=self._flex if last else width, key=key)

    def on_resize(self) -> None:
        """Give the last column what the others leave (one cell kept for the scrollbar)."""
        fixed = sum(w + 2 * self.cell_padding for _k, _l, w in self.COLUMNS[:-1])
        room = self.content_size.width - 1 - fixed - 2 * self.cell_padding
        flex = max(self.COLUMNS[-1][2], room)
        if flex != self._flex:
            self._flex = flex
            rows = {k: self._cells[k] for k in self._order}
            self.clear(columns=True)
            self._add_columns()
            self._cells.clear()
            self._order.clear()
            for key, cells in rows.items():
                self.put(key, cells)

    def put(self, key: str, cells: Sequence[Cell]) -> None:
        """Add the row, or change only those of its cells whose text or style changed."""
        new = tuple(cells)
        old = self._cells.get(key)
        if old is None:
            self.add_row(*(Text(t, style=s) for t, s in new), key=key)
            self._order.append(key)
        elif old != new:
            for (col, _label, _w), a, b in zip(self.COLUMNS, old, new, strict=True):
                if a != b:
                    self.update_cell(key, col, Text(b[0], style=b[1]))
        self._cells[key] = new

    def sync(self, rows: dict[str, Sequence[Cell]]) -> None:
        """Make the table show exactly these rows in this order, in place when possible."""
        keys = list(rows)
        if keys[: len(self._order)] != self._order:
            self._rebuild(rows)
            return
        for key in keys:
            self.put(key, rows[key])

    def _rebuild(self, rows: dict[str, Sequence[Cell]]) -> None:
        selected = self.selected_key()
        self.rebuilds += 1
        self.clear()
        self._cells.clear()
        self._order.clear()
        for key, cells in rows.items():
            self.put(key, cells)
        if selected in self._cells:
            self.move_cursor(row=self._order.index(selected), animate=False)

    def selected_key(self) -> str | None:
        """The key of the row under the cursor (what an action acts on)."""
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]
