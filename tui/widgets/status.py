"""The connection banner and the session's title line."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.fmt import STATUS_STYLE, num
from tui.state import SessionDetail, SessionInfo


class StatusBar(Static):
    """Top line: which coordinator, as whom, and whether the picture is live.

    When the coordinator goes away the bar turns red and says so: what is on screen is
    then the last state received, kept until the reconnect brings a fresh snapshot.
    """

    DEFAULT_CSS = """
    StatusBar { dock: top; height: 1; background: $panel; color: $text; padding: 0 1; }
    StatusBar.-down { background: $error; color: $text; text-style: bold; }
    StatusBar.-connecting { background: $warning 60%; }
    """

    def show(self, label: str, role: str, state: str, reason: str, retry_in: float) -> None:
        self.set_class(state == "down", "-down")
        self.set_class(state == "connecting", "-connecting")
        out = Text("fednode ", style="bold")
        out.append(label)
        if role:
            out.append(f" · {role}", style="bold" if role == "operator" else "italic")
        if state == "live":
            out.append("  ● live", style="bold green")
        elif state == "connecting":
            out.append("  connecting…")
        else:
            retry = f", retry in {retry_in:.1f} s" if retry_in > 0 else ", reconnecting"
            out.append(f"  ⚠ disconnected: {reason}{retry} (showing last state)")
        self.update(out, layout=False)  # one line, always: no layout pass


class SessionTitle(Static):
    DEFAULT_CSS = """
    SessionTitle { height: 1; padding: 0 1; background: $boost; }
    """

    def show(
        self, info: SessionInfo | None, detail: SessionDetail | None, loaded: bool = True
    ) -> None:
        if info is None:
            text = ("session not found", "bold red") if loaded else ("waiting for data…", "dim")
            self.update(Text(*text), layout=False)
            return
        # most important first: a narrow terminal cuts the end of the line
        out = Text(info.name or info.session_id, style="bold")
        out.append(f" {info.session_id} ", style="dim")
        out.append(info.status, style=STATUS_STYLE.get(info.status, ""))
        if info.rounds:
            out.append(f" · round {info.round}/{info.rounds}")
        if info.accuracy is not None:
            out.append(" · acc ")
            out.append(num(info.accuracy), style="green")
        if detail is not None and detail.health_score is not None:
            out.append(f" · health {num(detail.health_score, '{:.0f}')}")
        if detail is not None and detail.strategy:
            out.append(f" · {detail.strategy}" + (" + secagg" if detail.secure_aggregation else ""))
        if detail is not None and detail.codec and detail.codec != "identity":
            up = f" ↑{detail.up_ratio:.0f}x" if detail.up_ratio else ""
            down = f" ↓{detail.down_ratio:.1f}x" if detail.down_ratio else ""
            out.append(f" · {detail.codec}{up}{down}")
        if info.error:
            out.append(f" · {info.error}", style="red")
        self.update(out, layout=False)  # one line, always: no layout pass
