"""The dashboard against a real coordinator and real participants on loopback.

One cluster for the module (four torch processes cost seconds on two cores), with a fast
heartbeat and a viewer key; its participants train with a short delay so that a round
lasts long enough to watch. The tests run in order on one long session: it advances and
is paused and resumed from the keys; a viewer cannot touch it; a killed participant
raises an uptime alert on screen; the session is stopped from the keys.
Waiting is on the app's state (which the coordinator's pushed events drive), with
timeouts, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from textual.widgets._footer import FooterKey

from fedctl.client import AdminClient, Target
from fednode.home import NodeHome
from protocol.identity import Identity
from tests.conftest import Cluster, cli_json, start_cluster
from tui.app import DashboardApp
from tui.fake import until
from tui.screens import OPERATOR_ACTIONS, ConfirmScreen, SessionScreen
from tui.source import AdminSource
from tui.widgets import AlertsTable, MetricsPlot, RoundProgress

pytestmark = pytest.mark.timeout(180)
STEP = 0.05  # how often a wait re-checks the app's state while the nodes work


@dataclass
class Live:
    cluster: Cluster
    session_id: str
    viewer_key: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    keys = tmp_path_factory.mktemp("keys")
    viewer = Identity.generate()
    viewer.save(keys / "viewer.key")
    root = tmp_path_factory.mktemp("fed")
    c = start_cluster(root / "nodes", 0, "--heartbeat", "0.3", "--viewer", viewer.peer_id)
    try:
        # the peer IDs the participants will have: a peer no open session lists is refused
        peer_ids = [NodeHome(c.root / f"participant-{k}").init()[0].peer_id for k in range(3)]
        spec = root / "long.json"
        spec.write_text(
            json.dumps(
                {"name": "dash-e2e", "rounds": 500, "participants": peer_ids,
                 "min_participants": 2}
            )
        )  # fmt: skip
        sid = cli_json("session", "create", str(spec), target=c)["session_id"]
        for k in range(3):
            c.start_participant(k, 3, "--train-delay", "0.3")
        yield Live(c, sid, keys / "viewer.key")
    finally:
        c.procs.stop_all()


def dashboard(live: Live, key: Path | None = None) -> DashboardApp:
    c = live.cluster
    target = Target(c.url, c.peer_id, key or c.operator_key)
    return DashboardApp(AdminSource(target), session_id=live.session_id)


async def status(live: Live) -> str:
    c = live.cluster
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        return (await client.call("session.status", session_id=live.session_id))["status"]


async def running(live: Live) -> None:
    """The session running with its participants online, whichever test runs first (the
    tests are written to run in order, but each can run alone)."""
    c = live.cluster
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        await client.call("subscribe")
        async with asyncio.timeout(90):
            while True:
                ps = (await client.call("participants.list"))["participants"]
                st = (await client.call("session.status", session_id=live.session_id))["status"]
                if st == "created" and sum(p["online"] for p in ps) >= 2:
                    await client.call("session.start", session_id=live.session_id)
                elif st == "paused":
                    await client.call("session.resume", session_id=live.session_id)
                elif st == "running":
                    return
                async for _ev in client.stream():  # re-check on the next pushed event
                    break


async def confirm(pilot: Any, key: str) -> None:
    app = pilot.app
    await pilot.press(key)
    await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
    await pilot.press("y")
    await until(pilot, lambda: isinstance(app.screen, SessionScreen))


async def test_rounds_advance_on_screen_and_pause_resume_from_the_keys(live: Live) -> None:
    app = dashboard(live)
    sid = live.session_id
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.conn.state == "live" and app.is_operator, 30, STEP)
        online = lambda: sum(p.online for p in app.model.participants.values())  # noqa: E731
        await until(pilot, lambda: online() == 3, 90, STEP)
        await confirm(pilot, "s")  # start, from the dashboard
        info = app.model.sessions[sid]
        await until(pilot, lambda: info.status == "running" and info.round >= 2, 60, STEP)
        plot = app.screen.query_one(MetricsPlot)
        det = app.model.details[sid]
        # one point per completed round, on the plot the screen shows
        await until(pilot, lambda: len(plot._points) == info.round, 10, STEP)
        assert [p.round for p in det.points()] == list(range(1, info.round + 1))
        assert all(p.accuracy is not None for p in det.points())
        # the round in flight: when it started and its deadline (the spec's round_timeout_s)
        await until(pilot, lambda: det.current is not None and det.current.deadline_s == 300.0)
        assert det.current is not None and det.current.started_at is not None
        assert any(p.last_round is not None for p in app.model.participants.values())
        assert f"/{500}" in str(app.screen.query_one(RoundProgress).content)

        await confirm(pilot, "p")
        await until(pilot, lambda: info.status == "paused", 30, STEP)
        assert (await asyncio.to_thread(cli_json, "session", "status", sid, target=live.cluster))[
            "status"
        ] == "paused"
        await confirm(pilot, "r")
        await until(pilot, lambda: info.status == "running", 30, STEP)
        resumed_at = info.round
        await until(pilot, lambda: info.round > resumed_at + 1, 60, STEP)
        assert await status(live) == "running"


async def test_a_viewer_sees_no_action_keys_and_cannot_pause(live: Live) -> None:
    await running(live)
    app = dashboard(live, live.viewer_key)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.conn.state == "live", 30, STEP)
        assert app.conn.role == "viewer" and not app.is_operator
        await until(pilot, lambda: isinstance(app.screen, SessionScreen), 10, STEP)
        await pilot.pause()
        assert {k.key for k in app.screen.query(FooterKey)} == {"question_mark", "escape"}
        assert all(app.screen.check_action(a, ()) is False for a in OPERATOR_ACTIONS)
        before = app.model.sessions[live.session_id].round
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, SessionScreen)  # no confirmation, nothing sent
        await until(pilot, lambda: app.model.sessions[live.session_id].round > before, 60, STEP)
        assert await status(live) == "running"


async def test_killed_participant_raises_an_uptime_alert_on_screen(live: Live) -> None:
    await running(live)
    c = live.cluster
    victim = c.peer_ids[2]
    app = dashboard(live)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.conn.state == "live", 30, STEP)
        await until(pilot, lambda: isinstance(app.screen, SessionScreen), 10, STEP)
        c.procs.kill("participant-2")
        table = app.screen.query_one(AlertsTable)

        def alert_on_screen() -> bool:
            for a in app.model.alerts.values():
                if (a.alert_type, a.entity_id, a.severity) == ("uptime", victim, "critical"):
                    return (
                        str(a.id) in table._cells
                        and str(table.get_cell(str(a.id), "severity")) == "CRIT"
                    )
            return False

        await until(pilot, alert_on_screen, 60, STEP)
        assert not app.model.participants[victim].online
        # rounds go on with the two others; then the operator stops the session
        n = app.model.sessions[live.session_id].round
        await until(pilot, lambda: app.model.sessions[live.session_id].round > n, 60, STEP)
        await confirm(pilot, "x")
        await until(pilot, lambda: app.model.sessions[live.session_id].status == "stopped", 30)
        assert await status(live) == "stopped"
