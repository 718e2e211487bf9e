"""Where compression shows: each update's sizes in the coordinator's real SQLite ledger
(raw float32 and on the wire, up and down), summed per round and per participant in the
session summary that `session status` prints, in the report (text and HTML) and in the
dashboard's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fedctl.render import summary_lines
from fedctl.report import render_html, render_text
from fednode.ledger import Ledger
from tui.state import DashboardState

RAW = 40_000  # a 10,000-value model as float32
SPEC = {"name": "c", "rounds": 2, "compression": {"codec": "topk", "downlink": "delta"}}


@pytest.fixture
def summary(tmp_path: Path) -> dict[str, Any]:
    with Ledger(tmp_path / "ledger.db") as led:
        led.create_session(
            "s1", name="c", spec=SPEC, strategy="fedavg", secure_aggregation=False, rounds=2,
            created_at=100.0,
        )  # fmt: skip
        led.update_session("s1", status="running", started_at=100.0)
        for n, up in ((1, 1000), (2, 500)):
            led.start_round(
                "s1", n, selected=["pA", "pB"], model_cid_in=f"c{n - 1}", started_at=100.0 + n
            )
            for peer in ("pA", "pB"):
                led.record_update(
                    "s1", n, participant=peer, samples=10, loss=0.5, bytes=up, duration_s=0.1,
                    arrival_s=0.1, update_cid="u", received_at=100.0 + n, bytes_raw=RAW,
                    # round 1: the whole model; round 2: a delta of a quarter of it
                    down_bytes=RAW if n == 1 else RAW // 4, down_raw=RAW,
                )  # fmt: skip
            led.complete_round(
                "s1", n, ended_at=101.0 + n, model_cid=f"c{n}", size=10, participants=2,
                accuracy=0.9, loss=0.3,
                bytes_up=2 * up, bytes_down=0,
            )  # fmt: skip
        # a rejected update's bytes are not what the session's codec achieved
        led.record_update(
            "s1", 2, participant="pC", samples=1, loss=None, bytes=RAW, duration_s=None,
            arrival_s=None, update_cid=None, status="rejected", received_at=103.0, bytes_raw=RAW,
        )  # fmt: skip
        return led.summary("s1")


def test_the_summary_sums_sizes_per_round_and_participant(summary: dict[str, Any]) -> None:
    comp = summary["compression"]
    assert comp["codec"] == "topk" and comp["downlink"] == "delta"
    assert (comp["up_bytes"], comp["up_raw"]) == (3000, 4 * RAW)
    assert comp["up_ratio"] == pytest.approx(4 * RAW / 3000)
    assert (comp["down_bytes"], comp["down_raw"]) == (2 * RAW + 2 * (RAW // 4), 4 * RAW)
    assert comp["down_ratio"] == pytest.approx(1.6)
    assert [h["up_ratio"] for h in summary["history"]] == [40.0, 80.0]
    assert [t["participant"] for t in summary["traffic"]] == ["pA", "pB", "pA", "pB"]
    by_peer = {t["participant"]: t for t in summary["traffic_by_participant"]}
    assert set(by_peer) == {"pA", "pB"} and by_peer["pA"]["updates"] == 2
    assert by_peer["pA"]["up_ratio"] == pytest.approx(2 * RAW / 1500)


def test_status_report_and_dashboard_show_them(summary: dict[str, Any]) -> None:
    console = Console(width=200, record=True)
    for r in summary_lines(summary):
        console.print(r)
    text = console.export_text()
    assert "compression topk  uplink 3,000 B of 160,000 B raw (53.3x fewer)" in text
    assert "downlink (delta) 100,000 B of 160,000 B (1.6x fewer)" in text
    assert "53.3x" in text and "80.0x" in text  # a participant's total, round 2's ratio

    report = {"name": "c", "rounds": 2, "session": summary}
    plain = render_text(report)
    assert "uplink              3,000 B (3.0 kB) of 160,000 B (160.0 kB) raw (53.3x fewer)" in plain
    assert "Traffic (bytes of each participant's updates and downloads)" in plain
    html = render_html(report)
    assert "<h2>Traffic</h2>" in html and "53.3x" in html

    state = DashboardState()
    state.apply_status({**summary, "session_id": "s1"})
    det = state.details["s1"]
    assert det.codec == "topk" and det.up_ratio == pytest.approx(53.33, abs=0.01)
    assert det.down_ratio == pytest.approx(1.6)
