"""participants.list for a thousand peers: a page, sorted and filtered, a total and a
summary of every peer (fednode.admin.page_participants; `fedctl participants list`)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
from rich.console import Console

from fedctl.cli import participants_summary
from fednode.admin import page_participants
from protocol.errors import ValidationError


def _rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "peer_id": f"p{k:04d}",
            "online": k % 10 != 0,  # every tenth is offline
            "status": "excluded" if k == 7 else ("alerted" if k % 100 == 1 else "active"),
            "quality_score": None if k % 50 == 0 else float(k % 97),
            "last_seen": 1000.0 + k,
            "rounds_completed": k % 13,
            "latency_ms": None,
            "uptime": 99.0,
        }
        for k in range(n)
    ]


def test_a_page_of_a_thousand_sorted_with_the_unscored_last() -> None:
    rows = _rows(1000)
    got = page_participants(rows, {"sort": "score", "desc": True, "limit": 25, "offset": 0})
    assert got["total"] == 1000 and got["offset"] == 0 and len(got["participants"]) == 25
    scores = [p["quality_score"] for p in got["participants"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == 96.0
    last = page_participants(rows, {"sort": "score", "offset": 990, "limit": 25})
    assert len(last["participants"]) == 10  # the end of the list
    assert all(p["quality_score"] is None for p in last["participants"])  # 20 unscored, last
    s = got["summary"]
    assert s["seen"] == 1000 and s["online"] == 900
    assert s["status"] == {"active": 989, "alerted": 10, "excluded": 1}
    scored = [r["quality_score"] for r in rows if r["quality_score"] is not None]
    assert s["score"] == {"min": 0.0, "median": statistics.median_high(scored), "max": 96.0}
    assert s["score"]["median"] == 47.0


def test_filters_and_the_default_page_of_every_row() -> None:
    rows = _rows(300)
    assert len(page_participants(rows, {})["participants"]) == 300  # the API's default
    online = page_participants(rows, {"online": True, "status": "alerted"})
    assert [p["peer_id"] for p in online["participants"]] == ["p0001", "p0101", "p0201"]
    assert online["total"] == 3 and online["summary"]["seen"] == 300
    by_id = page_participants(rows, {"sort": "peer_id", "desc": True, "limit": 2})
    assert [p["peer_id"] for p in by_id["participants"]] == ["p0299", "p0298"]


@pytest.mark.parametrize(
    "args",
    [{"sort": "name"}, {"limit": 0}, {"offset": -1}, {"limit": True}, {"status": "gone"}],
)
def test_bad_arguments_are_named(args: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as err:
        page_participants(_rows(3), args)
    assert err.value.code == "USAGE" and next(iter(args)) in err.value.message


def test_the_summary_line_reads_the_page_and_the_whole() -> None:
    got = page_participants(_rows(1000), {"sort": "score", "limit": 100, "offset": 100})
    console = Console(width=300, record=True)
    console.print(participants_summary(got))
    text = console.export_text()
    assert "rows 101-200 of 1,000" in text and "seen 1,000, online 900" in text
    assert "active 989, alerted 10, excluded 1" in text and "median 47.0" in text


def test_a_report_of_a_thousand_keeps_to_the_weakest() -> None:
    from fedctl.report import REPORT_PEERS, render_html, render_text

    peers = [
        {"peer_id": f"p{k:04d}", "overall_score": float(k % 97), "online": True}
        for k in range(1000)
    ]
    report = {"name": "big", "rounds": 1, "session": {"session_id": "s1"}, "participants": peers}
    text = render_text(report)
    title = f"Participants (the {REPORT_PEERS} lowest scores of 1,000;"
    assert title in text
    rows = [ln for ln in text.splitlines() if ln.startswith("p0")]
    # scores k % 97 of 1,000 peers: eleven each of 0, 1, 2, then 3: the 40 lowest are <= 3
    assert len(rows) == REPORT_PEERS and all(float(r.split()[1]) <= 3.0 for r in rows)
    html = render_html(report)
    assert title in html and html.count('<tr><td class="l mono">p0') <= REPORT_PEERS


def test_the_dashboards_participants_title_sums_up_a_thousand() -> None:
    from tui.state import Participant
    from tui.widgets.participants import participants_line

    peers = [
        Participant(
            f"p{k}",
            online=k % 10 != 0,
            status="alerted" if k % 100 == 1 else "active",
            quality_score=float(k % 2) * 100,  # half 0, half 100: the median is 50
            excluded=k == 7,
        )
        for k in range(1000)
    ]
    assert (
        participants_line(peers) == "900/1,000 online · 10 alerted · 1 excluded · median score 50.0"
    )


def test_an_operator_client_takes_a_thousand_participants_events_at_once() -> None:
    """A round of 1,000 participants sends `session watch` 1,000 update_received events
    within a second: the rate a node accepts from a peer would cut the operator off
    (measured: `session watch` closed RATE_LIMITED at 1,000), the client's does not."""
    from fednode.transport import DEFAULT_RATE, EVENT_STREAM_RATE
    from protocol.limits import RateLimited, TokenBucket

    def burst(rate: float) -> int:
        bucket, taken = TokenBucket(rate=rate, burst=2 * rate), 0
        try:
            for k in range(1200):
                bucket.take(100.0 + k / 1200)  # 1,200 events in one second
                taken += 1
        except RateLimited:
            pass
        return taken

    assert burst(DEFAULT_RATE) < 1000 and burst(EVENT_STREAM_RATE) == 1200
