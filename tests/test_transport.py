"""Bad input over a real websocket to a real coordinator process: refused, node serving."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fedctl.client import AdminClient, Target
from fednode.transport import dial, ws_options
from protocol import messages
from protocol.envelope import decode, open_frame, seal
from protocol.errors import FednodeError, PeerMismatch
from protocol.handshake import ClientHandshake
from protocol.identity import Identity
from tests.conftest import Cluster, start_cluster


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("wire"), 0)
    try:
        yield c
    finally:
        c.procs.stop_all()


async def _still_serving(c: Cluster) -> None:
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        assert (await client.call("node.info"))["peer_id"] == c.peer_id


async def _raw_handshake(c: Cluster, ident: Identity):
    ws = await connect(c.url, **ws_options())
    hs = ClientHandshake(ident, c.peer_id)
    await ws.send(hs.hello())
    await ws.send(hs.on_challenge(await ws.recv()))
    welcome = await ws.recv()
    return ws, hs.result, welcome


async def test_garbage_before_handshake_is_refused(coordinator: Cluster) -> None:
    async with connect(coordinator.url, **ws_options()) as ws:
        await ws.send(b"\xff\x00garbage")
        reply = decode(await ws.recv())
        assert reply["hs"] == "error" and reply["code"] == "BAD_FRAME"
        with pytest.raises(ConnectionClosed):
            await ws.recv()
    await _still_serving(coordinator)


async def test_impostor_server_id_is_refused_by_the_client(coordinator: Cluster) -> None:
    with pytest.raises(FednodeError) as exc:
        await dial(coordinator.url, Identity.generate(), Identity.generate().peer_id)
    assert exc.value.code == PeerMismatch.code
    await _still_serving(coordinator)


async def test_tampered_envelope_closes_the_connection(coordinator: Cluster) -> None:
    me = Identity.generate()
    ws, result, _welcome = await _raw_handshake(coordinator, me)
    frame = bytearray(
        seal(
            me,
            channel=result.channel,
            type="register",
            seq=1,
            ts=time.time(),
            payload={"dataset": "digits:0/1", "num_examples": 10, "version": "x"},
        )
    )
    frame[-5] ^= 0x40  # flip one bit inside the signature
    await ws.send(bytes(frame))
    err = open_frame(
        await ws.recv(),
        channel=result.channel,
        sender_peer_id=coordinator.peer_id,
        sender_public_key=result.public_key,
    )
    assert err.type == "error" and err.payload["code"] == "BAD_SIGNATURE"
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    await _still_serving(coordinator)
    db = sqlite3.connect(Path(coordinator.coordinator_home.ledger_path))
    codes = [row[0] for row in db.execute("select data from events where kind='security'")]
    assert any("BAD_SIGNATURE" in c for c in codes)


async def test_unknown_message_type_gets_an_error_and_connection_stays(
    coordinator: Cluster,
) -> None:
    async with AdminClient(
        Target(coordinator.url, coordinator.peer_id, coordinator.operator_key)
    ) as client:
        assert client.conn is not None
        await client.conn.send(messages.Heartbeat(status="idle", ts=time.time()))
        with pytest.raises(FednodeError) as exc:
            await client.call("no.such.op")
        assert exc.value.code == "UNKNOWN_OP"
        assert (await client.call("session.list"))["sessions"] == []
