"""How fast the dashboard follows a big session: 100 participants, 1,000 rounds of history.

The figure measured is the time from one pushed event to the screen having re-rendered
it (the app processed the message and repainted, pilot.pause()). An update_received must
cost a few table cells and one small panel, never a re-plot of the 1,000-point history
nor a rebuilt table; a round_completed re-plots once.
"""

from __future__ import annotations

import statistics
import time

from tui.app import DashboardApp
from tui.fake import NOW, TZ, FakeSource, synthetic, until
from tui.widgets import MetricsPlot, ParticipantsTable, RoundProgress

BOUND_S = 0.5  # generous: a 2-core machine, under a loaded test suite


async def test_one_update_renders_fast_with_100_peers_and_1000_rounds() -> None:
    link = synthetic(100, 1000)
    sid = link.snapshot["sessions"][0]["session_id"]
    peers = [p["peer_id"] for p in link.snapshot["participants"]]
    app = DashboardApp(FakeSource(link), session_id=sid, clock=lambda: NOW, tz=TZ)
    async with app.run_test(size=(120, 40)) as pilot:
        t0 = time.perf_counter()
        await until(pilot, lambda: app.conn.snapshots == 1, timeout=30)
        await pilot.pause()
        load_s = time.perf_counter() - t0
        table = app.screen.query_one(ParticipantsTable)
        plot = app.screen.query_one(MetricsPlot)
        progress = app.screen.query_one(RoundProgress)
        assert table.row_count == 100
        builds, rebuilds = plot.builds, table.rebuilds
        assert builds >= 1

        times = []
        for k, peer in enumerate(peers[:30]):
            t = time.perf_counter()
            link.push(
                "update_received",
                {"round": 1001, "participant": peer, "samples": 100, "loss": 0.1,
                 "train_s": 0.2, "bytes": 1000, "received": k + 1, "selected": 100},
                sid,
            )  # fmt: skip
            await until(pilot, lambda p=peer: str(table.get_cell(p, "round")) == "trained")
            await pilot.pause()
            times.append(time.perf_counter() - t)
            assert f"trained {k + 1}/100" in str(progress.render())
        assert plot.builds == builds, "an update_received re-plotted the history"
        assert table.rebuilds == rebuilds, "an update_received rebuilt the participants table"

        t = time.perf_counter()
        link.push(
            "round_completed",
            {"round": 1001, "accuracy": 0.95, "loss": 0.1, "participants": peers[:30],
             "dropped": [], "duration_s": 1.0, "model_cid": "bafk2"},
            sid,
        )  # fmt: skip
        det = app.model.details[sid]
        await until(pilot, lambda: len(det.history) == 1001 and plot.builds == builds + 1)
        await pilot.pause()
        round_s = time.perf_counter() - t
        assert plot.builds == builds + 1  # exactly one re-plot for a completed round
        assert table.rebuilds == rebuilds

    worst, median = max(times), statistics.median(times)
    print(
        f"\n100 peers, 1000 rounds: snapshot to screen {load_s * 1000:.0f} ms; "
        f"update_received to screen median {median * 1000:.1f} ms, worst {worst * 1000:.1f} ms; "
        f"round_completed (re-plot) {round_s * 1000:.1f} ms"
    )
    assert median < BOUND_S  # the typical update; a single one may meet a busy moment
    assert worst < 2 * BOUND_S
    assert round_s < BOUND_S
