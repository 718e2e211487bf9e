"""The round in flight: who has trained, who is late, time spent against the deadline."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.fmt import ago, bar
from tui.state import CurrentRound, SessionInfo, short

PHASE_STYLE = {
    "training": "bold cyan",
    "selecting": "cyan",
    "aggregating": "bold magenta",
    "evaluating": "bold magenta",
    "done": "green",
    "failed": "bold red",
    "aborted": "bold red",
}


def progress_text(
    info: SessionInfo | None, cur: CurrentRound | None, now: float, width: int
) -> Text:
    """Plain Rich text, so the wording is tested without a running app."""
    width = max(20, width)
    if info is None:
        return Text("unknown session", style="dim")
    total = f"/{info.rounds}" if info.rounds else ""
    if cur is None:
        out = Text(f"no round yet · {info.round}{total} done\n", style="bold")
        out.append(f"session {info.status}", style="dim")
        return out
    out = Text(f"round {cur.round}{total} · ", style="bold")
    out.append(cur.phase, style=PHASE_STYLE.get(cur.phase, ""))
    out.append("\n")
    n_sel, n_got = len(cur.selected), len(cur.received)
    label = f"trained {n_got}/{n_sel} "
    out.append(label)
    out.append_text(bar(n_got / n_sel if n_sel else 0.0, width - len(label)))
    out.append("\n")
    elapsed = cur.elapsed(now)
    live = cur.phase in ("selecting", "training")
    if elapsed is not None and live:
        line = ago(elapsed)
        if cur.deadline_s:
            line += f" of {ago(cur.deadline_s)} deadline"
        frac = elapsed / cur.deadline_s if cur.deadline_s else 0.0
        style = "red" if frac > 0.8 else "yellow" if frac > 0.5 else ""
        out.append(f"elapsed {line}\n", style=style)
    elif cur.deadline_s:
        out.append(f"deadline {ago(cur.deadline_s)}\n", style="dim")
    late = cur.late()
    if late:
        out.append(f"late ({len(late)}): ", style="bold yellow")
        out.append(_peers(late, width - 10), style="yellow")
        out.append("\n")
    elif live:
        out.append("late: none\n", style="dim")
    if cur.received and width >= 40:
        out.append("trained: ", style="green")
        out.append(_peers(cur.received, width - 10))
        out.append("\n")
    if cur.failed:
        out.append(f"failed ({len(cur.failed)}): ", style="bold red")
        out.append(_peers(list(cur.failed), width - 12), style="red")
    return out


def _peers(peers: list[str], room: int) -> str:
    """As many short IDs as fit on the line, then how many more."""
    shown: list[str] = []
    used = 0
    for i, p in enumerate(peers):
        s = short(p)
        more = len(peers) - i - 1
        tail = len(f" +{more}") if more else 0
        if used + len(s) + 1 + tail > room and shown:
            shown.append(f"+{len(peers) - i}")
            break
        shown.append(s)
        used += len(s) + 1
    return " ".join(shown)


class RoundProgress(Static):
    def show(self, info: SessionInfo | None, cur: CurrentRound | None, now: float) -> None:
        # a fixed-size panel: no layout pass, which would re-render the whole screen
        self.update(progress_text(info, cur, now, self.content_size.width or 36), layout=False)
