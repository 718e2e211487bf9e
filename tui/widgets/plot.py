"""The task's headline metric (accuracy; R² or MAE for regression) and loss per round
(textual-plotext), re-plotted only when a round completes.

PlotextPlot rebuilds its whole figure on every render; a busy table elsewhere on the
screen must not cost a thousand-point re-plot, so the built figure is cached until the
points, the size or the theme change.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import RenderResult
from textual_plotext import PlotextPlot

from protocol.messages import EVAL_METRICS
from tui.state import RoundPoint, headline


class MetricsPlot(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._points: list[RoundPoint] = []
        self._rounds = 0
        self._version = 0
        self._cache: tuple[object, RenderResult] | None = None
        self.builds = 0  # how often the figure was re-plotted (the perf test reads it)

    def show(self, points: list[RoundPoint], rounds: int) -> None:
        if points == self._points and rounds == self._rounds:
            return
        self._points = list(points)
        self._rounds = rounds
        self._version += 1
        self.refresh()

    def render(self) -> RenderResult:
        key = (self.size, self._version, self.app.theme)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self.builds += 1
        result = self._build()
        self._cache = (key, result)
        return result

    def _build(self) -> RenderResult:
        name = headline(self._points)
        pts = [p for p in self._points if p.value(name) is not None or p.loss is not None]
        if not pts:
            return Text("no completed round yet", style="dim")
        step = max(1, len(pts) // max(1, 2 * self.size.width))  # no more points than dots
        pts = pts[::step] if pts[-1] in pts[::step] else [*pts[::step], pts[-1]]
        plt = self.plt
        plt.clear_figure()
        xs = [p.round for p in pts]
        acc = [(p.round, v) for p in pts if (v := p.value(name)) is not None]
        loss = [(p.round, p.loss) for p in pts if p.loss is not None]
        if acc:
            plt.plot([x for x, _ in acc], [y for _, y in acc], color="green", marker="braille")
            if EVAL_METRICS[name] == (0.0, 1.0):  # accuracy, ROC AUC: the whole scale
                plt.ylim(0, 1, yside="left")
        if loss:
            plt.plot([x for x, _ in loss], [y for _, y in loss], color="orange", marker="braille",
                     yside="right")  # fmt: skip
        lo, hi = min(xs), max(max(xs), self._rounds or 0, min(xs) + 1)
        plt.xlim(lo, hi)
        plt.xticks(_ticks(lo, hi, max(2, self.size.width // 10)))
        return super().render()


def _ticks(lo: int, hi: int, n: int) -> list[int]:
    """At most ``n`` whole round numbers from lo to hi: a round is never 3.2."""
    step = max(1, -(-(hi - lo) // max(1, n - 1)))
    out = list(range(lo, hi + 1, step))
    if out[-1] != hi:
        if hi - out[-1] >= step / 2:
            out.append(hi)
        else:
            out[-1] = hi
    return out
