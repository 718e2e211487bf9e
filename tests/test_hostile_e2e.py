"""Peer text is data, never markup, end to end: a real coordinator process, hand-driven
participants that write markup and terminal escapes into what they send (their dataset
name, a frame's type, a task error), and the real `fedctl` as subprocesses reading it back.

Every command must exit 0, print no escape byte, and show the peer's words literally.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from fedctl.client import AdminClient, Target
from tests.conftest import Cluster, cli, start_cluster
from tests.test_attacks import Raw

pytestmark = pytest.mark.timeout(180)

MARKUP = "[/] [bold red]x[/]"
ESCAPES = "\x1b[2J\x1b]0;pwned\x07\x1b]8;;http://evil\x1b\\link\x1b]8;;\x1b\\\x1b[31m"
DATASET = f"{MARKUP} {ESCAPES} tail:" + "A" * 3000  # under the 4096-character field limit
SHOWN_DATASET = f"{MARKUP} [2J]0;pwned]8;;http://evil\\link]8;;\\[31m tail:"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("hostile"), 0)
    try:
        yield c
    finally:
        c.procs.stop_all()


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide terminal for the subprocesses, so that a table does not wrap the long text
    (the literal markup is then on one line, where the assertions can find it)."""
    monkeypatch.setenv("COLUMNS", "8000")


async def run_cli(c: Cluster, *args: str) -> Any:
    """The real fedctl, human output; in a thread, so the raw peers' sockets stay served."""
    proc = await asyncio.to_thread(cli, *args, target=c)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    for stream in (proc.stdout, proc.stderr):
        assert "\x1b" not in stream and "\x07" not in stream, (args, stream[:500])
    return proc


async def create_session(c: Cluster, **spec: Any) -> str:
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        return (await client.call("session.create", spec={"rounds": 1, **spec}))["session_id"]


async def register(raw: Raw, dataset: str) -> Any:
    await (await raw.open()).handshake()
    await raw.send("register", {"dataset": dataset, "num_examples": 10, "version": "test"})
    return await raw.recv()


async def test_hostile_dataset_and_frame_type_are_shown_literally(
    node: Cluster, wide: None
) -> None:
    mallory = Raw(node)
    await create_session(node, name="hostile-a", participants=[mallory.ident.peer_id])

    # Over the field limit: refused where it enters, with a short error, before anything else.
    too_long = await register(Raw(node, mallory.ident), DATASET + "B" * 5000)
    assert too_long.type == "error" and too_long.payload["code"] == "INVALID_MESSAGE"
    assert len(too_long.payload["message"]) < 300

    assert (await register(mallory, DATASET)).type == "admitted"
    # A signed frame whose type is markup, escapes and 200,000 characters: not a frame.
    await mallory.send(f"[/]\x1b[2J\x1b]0;pwned\x07{'x' * 200_000}", {})
    await mallory.expect_error("BAD_FRAME", closed=True)

    proc = await run_cli(node, "participants", "list")
    assert SHOWN_DATASET in proc.stdout  # the dataset column, as the peer wrote it

    proc = await run_cli(node, "alerts", "list")
    assert "security violation" in proc.stdout and "BAD_FRAME" in proc.stdout
    assert "'[/]\\x1b[2J" in proc.stdout  # the refused type, quoted as a bounded repr
    alerts = json.loads(
        (await asyncio.to_thread(cli, "alerts", "list", "--json", target=node)).stdout
    )
    messages = [a["message"] for a in alerts["alerts"] if a["alert_type"] == "security_violation"]
    assert messages and all(len(m) < 500 for m in messages)

    await run_cli(node, "session", "list")

    db = sqlite3.connect(node.coordinator_home.ledger_path)
    rows = [json.loads(d) for (d,) in db.execute("SELECT data FROM events WHERE kind = 'security'")]
    assert any(r["code"] == "BAD_FRAME" for r in rows)
    assert all(len(json.dumps(r)) < 1000 for r in rows)  # nothing quoted the 200,000 characters


async def test_watch_shows_a_hostile_task_error_literally(node: Cluster, wide: None) -> None:
    peer = Raw(node)
    sid = await create_session(
        node,
        name="hostile-b",
        participants=[peer.ident.peer_id],
        min_participants=1,
        on_round_failure="stop",
        round_timeout_s=120,
    )
    assert (await register(peer, "digits:0/1")).type == "admitted"
    await run_cli(node, "session", "start", sid)

    watch = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fedctl",
        "--coordinator",
        node.url,
        "--coordinator-id",
        node.peer_id,
        "--key",
        str(node.operator_key),
        "session",
        "watch",
        sid,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert watch.stderr is not None
    first = await asyncio.wait_for(watch.stderr.readline(), 60)  # subscribed: it is watching
    assert first.startswith(b"watching " + sid.encode()), first

    while (env := await peer.recv()).type != "round_start":
        pass
    rnd = env.payload["round"]
    await peer.send(
        "task_error",
        {"round": rnd, "code": "E[/]\x1b[2J", "message": f"{MARKUP} {ESCAPES}"},
        session=sid,
    )
    out, err = await asyncio.wait_for(watch.communicate(), 60)
    stdout, stderr = out.decode(), first.decode() + err.decode()
    assert watch.returncode == 0, (stdout, stderr)
    assert b"\x1b" not in out + err and b"\x07" not in out + err
    expected = (
        f"…{peer.ident.peer_id[-6:]} could not do round {rnd}: E[/][2J: "
        f"{MARKUP} [2J]0;pwned]8;;http://evil\\link]8;;\\[31m"
    )
    assert expected in stdout, stdout
    assert "session failed" in stdout
