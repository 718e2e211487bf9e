"""A participant's own limits, end to end, with real `fednode run` processes.

1. The probe, reproduced: a coordinator (here a scripted one, speaking the real protocol
   over a real socket) sends a spec with ``hidden = [65536, 65536]``. The participant
   process declines it (counted, not built: SPEC_INVALID, since no such model fits a frame)
   instead of allocating 17 GB, its RSS does not move,
   it keeps serving (a normal round next), and a model whose safetensors header lies about
   its size is refused without allocating.
2. A real coordinator and three participants: one started with ``--max-params 1000``
   declines a session's model (both ledgers record it) while the others complete the
   session; one started with ``--max-train-seconds 1`` gives up on a long training with
   TRAIN_DEADLINE and the round ends long before its round_timeout_s; both still take part
   in a normal session afterwards.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from websockets.asyncio.server import ServerConnection, serve

from fedctl.demo import Processes
from fednode import __version__, training, weights
from fednode.home import NodeHome
from fednode.transport import Connection, accept, ws_options
from protocol import messages, spec
from protocol.cid import file_cid
from protocol.identity import Identity
from tests.conftest import Cluster, cli, cli_json, start_cluster

MIB = 2**20
SESSION = "s-probe"
PROBE_MODEL = {"kind": "mlp", "inputs": 64, "hidden": [65536, 65536], "classes": 10}
SMALL_MODEL = {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10}
# What the participant's RSS may grow by from before the probe's round_start to after its
# decline: the decline allocates nothing, and the old code tried to allocate 17 GB.
PROBE_RSS_BOUND = 100 * MIB


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# --- 1. the probe, against a scripted coordinator ------------------------------------------


class ScriptedCoordinator:
    """A coordinator that speaks the real protocol (handshake, signed envelopes) and does
    only what the test tells it to."""

    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.conns: asyncio.Queue[Connection] = asyncio.Queue()
        self.done = asyncio.Event()
        self.url = ""

    async def handle(self, ws: ServerConnection) -> None:
        conn = await accept(ws, self.identity)
        await conn.send(
            messages.Welcome(
                peer_id=self.identity.peer_id,
                role="participant",
                heartbeat_s=60.0,
                version=__version__,
            )
        )
        await self.conns.put(conn)
        await self.done.wait()  # the connection lives as long as the test needs it


async def next_of(conn: Connection, *types: type[messages.Message]) -> messages.Message:
    """The next message of one of ``types`` (heartbeats and the like are skipped; an
    ``upload_ready`` is granted at once, as a coordinator with free upload slots does)."""
    while True:
        env, msg = await asyncio.wait_for(conn.recv(), 120)
        if isinstance(msg, types):
            return msg
        if isinstance(msg, messages.UploadReady):
            await conn.send(messages.UploadGrant(round=msg.round), env.session)


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedCoordinator]:
    coord = ScriptedCoordinator()
    async with serve(coord.handle, "127.0.0.1", 0, **ws_options()) as server:
        host, port = server.sockets[0].getsockname()[:2]
        coord.url = f"ws://{host}:{port}"
        try:
            yield coord
        finally:
            coord.done.set()


def _task_rows(ledger: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(ledger)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute("SELECT * FROM participant_tasks ORDER BY id")]
    finally:
        db.close()


async def test_the_probe_spec_is_declined_and_the_participant_keeps_serving(
    scripted: ScriptedCoordinator, tmp_path: Path
) -> None:
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs")
    home = NodeHome(tmp_path / "participant")
    home.init()
    extra: list[str] = []
    if psutil.virtual_memory().total > 200 * 2**30:  # the probe's model fits half this RAM
        extra = ["--max-memory", "64G"]  # so that the default limits still decline it
    procs.start_participant(
        "participant",
        home,
        {"url": scripted.url, "peer_id": scripted.identity.peer_id},
        "digits:0/3",
        *extra,
    )
    try:
        conn = await asyncio.wait_for(scripted.conns.get(), 120)
        reg = await next_of(conn, messages.Register)
        assert isinstance(reg, messages.Register) and reg.num_examples == 479
        await conn.send(messages.Admitted(sessions=[SESSION]))
        pid = procs.procs["participant"].pid

        # Round 1, the probe: a spec whose model is 4.3e9 parameters (17 GB). An honest
        # coordinator refuses it now (it cannot fit a frame); a hostile one sends it anyway,
        # every field within its own range, so it is built here without validating it.
        probe = spec.validate({"min_participants": 1})
        probe["model"]["hidden"] = [65536, 65536]
        before = rss(pid)
        await conn.send(
            messages.RoundStart(round=1, model_cid="bafkreinever", spec=probe, deadline_s=60.0),
            SESSION,
        )
        declined = await next_of(conn, messages.TaskError, messages.Fetch, messages.Update)
        after = rss(pid)
        assert isinstance(declined, messages.TaskError), declined  # no fetch: declined first
        assert declined.round == 1 and declined.code == "SPEC_INVALID"
        assert "4,299,948,042 parameters" in declined.message
        grown = after - before
        print(
            f"participant RSS before the probe {before / MIB:.1f} MiB, after its decline "
            f"{after / MIB:.1f} MiB (+{grown / MIB:.1f} MiB; bound {PROBE_RSS_BOUND / MIB:.0f})"
        )
        assert grown < PROBE_RSS_BOUND, (before, after)
        assert psutil.Process(pid).is_running()

        # Round 2, a normal round: the same process fetches, trains and uploads.
        small = spec.validate({"min_participants": 1, "model": {"hidden": [16]}})
        model = weights.to_bytes(training.init_weights(SMALL_MODEL, 0))
        cid = file_cid(model)
        await conn.send(
            messages.RoundStart(round=2, model_cid=cid, spec=small, deadline_s=60.0), SESSION
        )
        fetch = await next_of(conn, messages.Fetch, messages.TaskError)
        assert isinstance(fetch, messages.Fetch) and fetch.cid == cid, fetch
        await conn.send(messages.Block(cid=cid, data=model), SESSION)
        update = await next_of(conn, messages.Update, messages.TaskError)
        assert isinstance(update, messages.Update) and update.round == 2, update
        trained = weights.from_bytes(update.data, expect=training.expected_shapes(SMALL_MODEL))
        assert set(trained) == {"0.weight", "0.bias", "2.weight", "2.bias"}

        # Round 3: model bytes (with a matching CID) whose header claims a 65536 x 65536
        # tensor in 16 bytes: refused from the header, nothing allocated.
        header = json.dumps(
            {"0.weight": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}
        ).encode()
        liar = len(header).to_bytes(8, "little") + header + b"\0" * 16
        liar_cid = file_cid(liar)
        before = rss(pid)
        await conn.send(
            messages.RoundStart(round=3, model_cid=liar_cid, spec=small, deadline_s=60.0), SESSION
        )
        fetch = await next_of(conn, messages.Fetch, messages.TaskError)
        assert isinstance(fetch, messages.Fetch) and fetch.cid == liar_cid, fetch
        await conn.send(messages.Block(cid=liar_cid, data=liar), SESSION)
        refused = await next_of(conn, messages.TaskError, messages.Update)
        assert isinstance(refused, messages.TaskError) and refused.round == 3, refused
        assert refused.code == "INVALID_MESSAGE" and "'0.weight'" in refused.message
        assert rss(pid) - before < PROBE_RSS_BOUND
        await conn.close()
    finally:
        procs.stop_all()

    # The participant's own ledger: every task ended, the decline with its reason.
    rows = _task_rows(home.ledger_path)
    assert [(r["round"], r["status"]) for r in rows] == [
        (1, "declined"),
        (2, "done"),
        (3, "failed"),
    ]
    assert rows[0]["error"].startswith("SPEC_INVALID: the model (kind mlp")
    assert "4,299,948,042 parameters" in rows[0]["error"]
    assert rows[2]["error"].startswith("INVALID_MESSAGE: ")


# --- 2. a real coordinator and three participants ------------------------------------------


def write_spec(path: Path, participants: list[str], **sections: Any) -> Path:
    """A TOML spec: top-level fields, then [section] tables given as dicts."""
    top = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    top["participants"] = participants
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_session(cluster: Cluster, path: Path) -> tuple[str, dict[str, Any]]:
    sid = cli_json("session", "create", str(path), target=cluster)["session_id"]
    assert cli_json("session", "start", sid, target=cluster)["status"] == "running"
    cli("session", "watch", sid, "--json", target=cluster, check=True, timeout=300)
    return sid, cli_json("session", "status", sid, target=cluster)


def coordinator_events(cluster: Cluster, sid: str, kind: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(cluster.coordinator_home.ledger_path)
    try:
        rows = db.execute(
            "SELECT data FROM events WHERE session_id = ? AND kind = ? ORDER BY id", (sid, kind)
        ).fetchall()
    finally:
        db.close()
    return [json.loads(r[0]) for r in rows]


def rounds(cluster: Cluster, sid: str) -> list[dict[str, Any]]:
    db = sqlite3.connect(cluster.coordinator_home.ledger_path)
    db.row_factory = sqlite3.Row
    try:
        return [
            dict(r)
            for r in db.execute(
                "SELECT * FROM training_rounds WHERE session_id = ? ORDER BY round", (sid,)
            )
        ]
    finally:
        db.close()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """participant-0: --max-params 1000; participant-1: --max-train-seconds 1;
    participant-2: the defaults. A first normal session (logreg, 650 parameters, every
    participant required) makes sure all three have joined."""
    root = tmp_path_factory.mktemp("limits")
    c = start_cluster(root, 0)
    try:
        c.start_participant(0, 3, "--max-params", "1000")
        c.start_participant(1, 3, "--max-train-seconds", "1")
        c.start_participant(2, 3)
        path = write_spec(
            root / "warm.toml",
            c.peer_ids,
            rounds=1,
            min_participants=3,
            model={"kind": "logreg"},
        )
        _sid, status = run_session(c, path)
        assert status["status"] == "completed", status
        yield c
    finally:
        c.procs.stop_all()


def test_a_limited_participant_declines_and_the_session_goes_on(
    limited: Cluster, tmp_path: Path
) -> None:
    small = limited.peer_ids[0]
    pid = limited.procs.procs["participant-0"].pid
    before = rss(pid)
    # hidden [64]: 4,810 parameters, over participant-0's --max-params 1000
    path = write_spec(
        tmp_path / "spec.toml",
        limited.peer_ids,
        rounds=2,
        min_participants=2,
        model={"hidden": [64]},
    )
    sid, status = run_session(limited, path)
    after = rss(pid)
    assert status["status"] == "completed" and status["rounds_completed"] == 2, status

    # The coordinator's ledger: participant-0's task_error in round 1, with its reason. In
    # round 2 it is declined again, or (today) left out: the coordinator's quality monitor
    # counts the decline as a failed task and raises a critical alert, which excludes it.
    errors = coordinator_events(limited, sid, "task_error")
    assert [(e["round"], e["peer_id"], e["code"]) for e in errors][:1] == [
        (1, small, "LIMIT_PARAMS")
    ]
    assert all(e["peer_id"] == small and e["code"] == "LIMIT_PARAMS" for e in errors)
    assert "4,810 parameters" in errors[0]["message"]
    assert "limit of 1,000 (--max-params)" in errors[0]["message"]
    left_out = [
        a["round"]
        for a in coordinator_events(limited, sid, "action")
        if a["action"] == "excluded_from_selection" and a["peer_id"] == small
    ]
    assert sorted([e["round"] for e in errors] + left_out) == [1, 2]
    # both rounds completed with the two others
    for r in rounds(limited, sid):
        assert r["status"] == "completed" and r["participants"] == 2, r

    # participant-0's own ledger: both tasks declined, with the same reason
    rows = [
        r for r in _task_rows(limited.participant_homes[0].ledger_path) if r["session_id"] == sid
    ]
    assert [(r["round"], r["status"]) for r in rows] == [(e["round"], "declined") for e in errors]
    assert all(r["error"].startswith("LIMIT_PARAMS: the model has 4,810 parameters") for r in rows)
    print(
        f"participant-0 RSS {before / MIB:.1f} MiB before the session, {after / MIB:.1f} MiB "
        f"after its declines (+{(after - before) / MIB:.1f} MiB)"
    )
    assert after - before < PROBE_RSS_BOUND


def test_training_past_max_train_seconds_ends_the_task_early(
    limited: Cluster, tmp_path: Path
) -> None:
    """participant-1 alone, 1000 local epochs (minutes of training), --max-train-seconds 1:
    it sends TRAIN_DEADLINE after about a second, and the round ends at once instead of
    waiting out its round_timeout_s of 120 s."""
    trainer = limited.peer_ids[1]
    timeout_s = 120.0
    path = write_spec(
        tmp_path / "spec.toml",
        [trainer],
        rounds=1,
        min_participants=1,
        round_timeout_s=timeout_s,
        model={"hidden": [128, 128]},
        training={"local_epochs": 1000},
    )
    sid, status = run_session(limited, path)
    assert status["status"] == "failed", status  # its only participant had no update
    errors = coordinator_events(limited, sid, "task_error")
    assert [(e["round"], e["peer_id"], e["code"]) for e in errors] == [
        (1, trainer, "TRAIN_DEADLINE")
    ]
    assert "of 1000 epochs" in errors[0]["message"]
    assert "--max-train-seconds 1" in errors[0]["message"]
    (r,) = rounds(limited, sid)
    took = r["ended_at"] - r["started_at"]
    print(f"round with TRAIN_DEADLINE took {took:.2f} s of round_timeout_s {timeout_s:.0f}")
    assert r["status"] != "completed" and took < timeout_s / 4, r
    rows = [
        r for r in _task_rows(limited.participant_homes[1].ledger_path) if r["session_id"] == sid
    ]
    assert [(r["round"], r["status"]) for r in rows] == [(1, "failed")]
    assert rows[0]["error"].startswith("TRAIN_DEADLINE: ")


def test_limited_participants_still_take_part_in_a_normal_session(
    limited: Cluster, tmp_path: Path
) -> None:
    """Both limited participants are alive and train. The coordinator's critical alerts
    about their failed tasks (which exclude them from selection) are acknowledged first, as
    the alert's own hint says."""
    for alert in cli_json("alerts", "list", "--severity", "critical", target=limited)["alerts"]:
        if alert["status"] == "open":
            assert cli_json("alerts", "ack", str(alert["id"]), target=limited)["ok"]
    path = write_spec(
        tmp_path / "spec.toml",
        limited.peer_ids,
        rounds=2,
        min_participants=3,
        model={"kind": "logreg"},  # 650 parameters: under participant-0's limit
    )
    sid, status = run_session(limited, path)
    assert status["status"] == "completed" and status["participants"] == 3, status
    assert coordinator_events(limited, sid, "task_error") == []
    for k in range(3):
        assert limited.procs.procs[f"participant-{k}"].poll() is None
