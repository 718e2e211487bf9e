"""Participants: online state, quality score, latency, their part in this round, last
contribution. Rows are updated in place, one per event."""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from tui.fmt import ago, num
from tui.state import Participant, short
from tui.widgets.table import Cell, KeyedTable

STATUS_STYLE = {"active": "", "excluded": "bold red", "alerted": "bold dark_orange"}
ROUND_STYLE = {"trained": "green", "late": "bold yellow", "failed": "red", "": "dim"}


def participant_cells(p: Participant, round_state: str, now: float) -> tuple[Cell, ...]:
    status = "excluded" if p.excluded else p.status
    score, score_style = p.quality_score, ""
    if score is not None:
        score_style = "green" if score >= 80 else "yellow" if score >= 60 else "red"
    last = "–"
    if p.last_round is not None:
        when = "" if p.last_round.at is None else f" · {ago(now - p.last_round.at)} ago"
        last = f"r{p.last_round.round}{when}"
    if p.epsilon is not None:  # local DP: the privacy it has spent, as it reported it
        last += f" · ε {p.epsilon:.2f}"
    return (
        (short(p.peer_id), "bold"),
        ("● online", "green") if p.online else ("○ offline", "red"),
        (status, STATUS_STYLE.get(status, "yellow")),
        (num(p.quality_score, "{:.1f}"), score_style),
        (num(p.latency_ms, "{:.1f} ms"), ""),
        (round_state or "–", ROUND_STYLE.get(round_state, "")),
        (last, "" if p.last_round else "dim"),
    )


def participants_line(peers: Iterable[Participant]) -> str:
    """The panel's title: '998/1,000 online · 8 alerted · 2 excluded · median score 82.1',
    the whole federation at a glance when its rows do not fit the screen."""
    peers = list(peers)
    online = sum(p.online for p in peers)
    parts = [f"{online:,}/{len(peers):,} online"]
    for status in ("alerted", "excluded"):
        n = sum(("excluded" if p.excluded else p.status) == status for p in peers)
        if n:
            parts.append(f"{n:,} {status}")
    scores = [p.quality_score for p in peers if p.quality_score is not None]
    if scores:
        parts.append(f"median score {statistics.median(scores):.1f}")
    return " · ".join(parts)


class ParticipantsTable(KeyedTable):
    COLUMNS = (
        ("peer", "peer", 9),
        ("online", "online", 9),
        ("status", "status", 8),
        ("score", "score", 5),
        ("latency", "latency", 9),
        ("round", "round", 7),
        ("last", "last update", 14),
    )
