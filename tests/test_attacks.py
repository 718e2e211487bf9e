"""One test per attack, each against a real coordinator process over a real websocket.

The coordinator runs with a 1 s handshake timeout, at most 4 connections authenticating at
once and 50 messages/s per connection, so the slow attacks stay fast. Every refusal must
come with its stable code, close the connection when the peer cannot be trusted any more,
and leave the node serving: the last test runs a legitimate session to completion on the
same coordinator.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from fedctl.client import AdminClient, Target
from fednode.transport import ws_options
from protocol import tokens
from protocol.envelope import BULK_MAGIC, Envelope, decode, encode, open_frame, seal
from protocol.errors import FednodeError
from protocol.handshake import ClientHandshake, HandshakeResult
from protocol.identity import Identity
from tests.conftest import Cluster, cli, cli_json, start_cluster

pytestmark = pytest.mark.timeout(120)
VIEWER = Identity.generate()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(
        tmp_path_factory.mktemp("attacks"),
        0,
        "--handshake-timeout",
        "1",
        "--max-pending",
        "4",
        "--viewer",
        VIEWER.peer_id,
        "--rate-limit",
        "50",
    )
    try:
        yield c
    finally:
        c.procs.stop_all()


def security_codes(c: Cluster) -> list[str]:
    db = sqlite3.connect(c.coordinator_home.ledger_path)
    return [
        json.loads(d)["code"]
        for (d,) in db.execute("SELECT data FROM events WHERE kind = 'security'")
    ]


async def operator(c: Cluster) -> AdminClient:
    return AdminClient(Target(c.url, c.peer_id, c.operator_key))


async def assert_still_serving(c: Cluster) -> None:
    async with await operator(c) as client:
        assert (await client.call("node.info"))["peer_id"] == c.peer_id


class Raw:
    """A hand-driven peer: real websocket, real handshake, envelopes built by hand."""

    def __init__(self, c: Cluster, ident: Identity | None = None):
        self.c = c
        self.ident = ident or Identity.generate()
        self.ws: ClientConnection
        self.result: HandshakeResult
        self.seq = 0

    async def open(self) -> Raw:
        self.ws = await connect(self.c.url, **ws_options())
        return self

    async def handshake(self) -> Envelope:
        hs = ClientHandshake(self.ident, self.c.peer_id)
        await self.ws.send(hs.hello())
        await self.ws.send(hs.on_challenge(await self.ws.recv()))
        assert hs.result is not None
        self.result = hs.result
        return await self.recv()  # the welcome

    def frame(
        self,
        type_: str,
        payload: dict[str, Any],
        session: str = "",
        seq: int | None = None,
        ts: float | None = None,
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return seal(
            self.ident,
            channel=self.result.channel,
            type=type_,
            seq=seq,
            payload=payload,
            ts=time.time() if ts is None else ts,
            session=session,
        )

    async def send(self, type_: str, payload: dict[str, Any], session: str = "") -> bytes:
        frame = self.frame(type_, payload, session)
        await self.ws.send(frame)
        return frame

    async def recv(self) -> Envelope:
        return open_frame(
            await asyncio.wait_for(self.ws.recv(), 10),
            channel=self.result.channel,
            sender_peer_id=self.c.peer_id,
            sender_public_key=self.result.public_key,
        )

    async def expect_error(self, code: str, *, closed: bool) -> None:
        env = await self.recv()
        assert env.type == "error" and env.payload["code"] == code, env.payload
        if closed:
            await self.expect_closed()

    async def expect_closed(self) -> None:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(self.ws.recv(), 10)

    async def register(self, token: str = "") -> Envelope:
        await self.send(
            "register",
            {"dataset": "digits:0/1", "num_examples": 10, "version": "test", "join_token": token},
        )
        return await self.recv()


async def raw_hs_error(c: Cluster, first: bytes) -> dict[str, Any]:
    async with connect(c.url, **ws_options()) as ws:
        await ws.send(first)
        reply = decode(await asyncio.wait_for(ws.recv(), 10))
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    return reply


# --- before authentication ---------------------------------------------------------------


async def test_garbage_bytes(node: Cluster) -> None:
    reply = await raw_hs_error(node, b"\xff\x00garbage")
    assert reply == {
        "hs": "error",
        "code": "BAD_FRAME",
        "message": reply["message"],
        "hint": reply["hint"],
    }
    await assert_still_serving(node)


async def test_truncated_frame(node: Cluster) -> None:
    hello = ClientHandshake(Identity.generate(), node.peer_id).hello()
    assert (await raw_hs_error(node, hello[: len(hello) // 2]))["code"] == "BAD_FRAME"


async def test_valid_cbor_of_the_wrong_shape(node: Cluster) -> None:
    assert (await raw_hs_error(node, encode([1, 2, 3])))["code"] == "HANDSHAKE_FAILED"
    assert (await raw_hs_error(node, encode({"hs": "hello", "proto": "fednode/1"})))[
        "code"
    ] == "HANDSHAKE_FAILED"


async def test_impostor_claiming_someone_elses_peer_id(node: Cluster) -> None:
    victim, mallory = Identity.generate(), Identity.generate()

    class Liar:  # presents the victim's public key, can only sign with mallory's
        public_key = victim.public_key
        peer_id = victim.peer_id
        sign = staticmethod(mallory.sign)

    async with connect(node.url, **ws_options()) as ws:
        hs = ClientHandshake(Liar(), node.peer_id)  # type: ignore[arg-type]
        await ws.send(hs.hello())
        await ws.send(hs.on_challenge(await ws.recv()))
        reply = decode(await asyncio.wait_for(ws.recv(), 10))
        assert reply["hs"] == "error" and reply["code"] == "HANDSHAKE_FAILED"
    assert "HANDSHAKE_FAILED" in security_codes(node)


async def test_oversize_frame_before_authentication(node: Cluster) -> None:
    async with connect(node.url, **ws_options()) as ws:
        await ws.send(b"\x00" * 20_000)  # over the 16 KiB handshake cap
        with pytest.raises(ConnectionClosed) as exc:
            await asyncio.wait_for(ws.recv(), 10)
        assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009
    await assert_still_serving(node)


async def test_silent_connection_is_dropped(node: Cluster) -> None:
    async with connect(node.url, **ws_options()) as ws:
        reply = decode(await asyncio.wait_for(ws.recv(), 10))  # after the 1 s timeout
        assert reply["code"] == "HANDSHAKE_TIMEOUT"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)


async def test_connection_flood_beyond_the_limit(node: Cluster) -> None:
    silent = [await connect(node.url, **ws_options()) for _ in range(4)]
    try:
        async with connect(node.url, **ws_options()) as fifth:
            reply = decode(await asyncio.wait_for(fifth.recv(), 10))
            assert reply["code"] == "CONNECTION_LIMIT"
    finally:
        for ws in silent:  # each is dropped by the handshake timeout; wait for that
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
    await assert_still_serving(node)
    assert "CONNECTION_LIMIT" in security_codes(node)


# --- after authentication: envelopes ----------------------------------------------------


async def test_bad_signature(node: Cluster) -> None:
    raw = Raw(node)
    await (await raw.open()).handshake()
    frame = bytearray(raw.frame("heartbeat", {"status": "idle", "ts": time.time()}))
    frame[-5] ^= 0x40  # a bit inside the signature
    await raw.ws.send(bytes(frame))
    await raw.expect_error("BAD_SIGNATURE", closed=True)
    assert "BAD_SIGNATURE" in security_codes(node)


async def test_flipped_payload_bit(node: Cluster) -> None:
    raw = Raw(node)
    await (await raw.open()).handshake()
    frame = raw.frame(
        "register", {"dataset": "digits:0/1", "num_examples": 10, "version": "x", "join_token": ""}
    )
    at = frame.index(b"digits")
    tampered = frame[:at] + b"eigits" + frame[at + 6 :]
    await raw.ws.send(tampered)
    await raw.expect_error("BAD_SIGNATURE", closed=True)


async def test_envelope_of_the_wrong_shape(node: Cluster) -> None:
    raw = Raw(node)
    await (await raw.open()).handshake()
    await raw.ws.send(encode({"v": 1, "t": "heartbeat"}))
    await raw.expect_error("BAD_FRAME", closed=True)


async def test_replayed_envelope(node: Cluster) -> None:
    raw = Raw(node, Identity.load(node.operator_key))
    await (await raw.open()).handshake()
    frame = await raw.send("admin", {"id": 1, "op": "node.info", "args": {}})
    assert (await raw.recv()).type == "admin_reply"
    await raw.ws.send(frame)  # the very same bytes again
    await raw.expect_error("REPLAY", closed=True)
    assert "REPLAY" in security_codes(node)


async def test_stale_envelope(node: Cluster) -> None:
    raw = Raw(node, Identity.load(node.operator_key))
    await (await raw.open()).handshake()
    await raw.ws.send(
        raw.frame("admin", {"id": 1, "op": "node.info", "args": {}}, ts=time.time() - 3600)
    )
    await raw.expect_error("REPLAY", closed=True)


async def test_unknown_message_type_keeps_the_connection(node: Cluster) -> None:
    raw = Raw(node, Identity.load(node.operator_key))
    await (await raw.open()).handshake()
    await raw.send("launch_missiles", {"target": "x"})
    await raw.expect_error("UNKNOWN_TYPE", closed=False)
    await raw.send("admin", {"id": 7, "op": "session.list", "args": {}})
    reply = await raw.recv()
    assert reply.type == "admin_reply" and reply.payload["ok"]


async def test_per_type_size_cap_and_frame_cap(node: Cluster) -> None:
    raw = Raw(node, Identity.load(node.operator_key))
    await (await raw.open()).handshake()
    await raw.send("heartbeat", {"status": "x" * 100_000, "ts": time.time()})
    await raw.expect_error("TOO_LARGE", closed=False)
    # the same in a bulk frame (raw bytes after a signed header): the cap counts every byte
    bulk = await raw.send("heartbeat", {"status": "idle", "ts": time.time(), "x": b"x" * 100_000})
    assert bulk.startswith(BULK_MAGIC)
    await raw.expect_error("TOO_LARGE", closed=False)
    await raw.ws.send(b"\x00" * (64 * 1024 * 1024 + 1))  # over the websocket frame cap
    with pytest.raises(ConnectionClosed) as exc:
        await asyncio.wait_for(raw.ws.recv(), 30)
    assert exc.value.rcvd is not None and exc.value.rcvd.code == 1009
    await assert_still_serving(node)


async def test_rate_limit(node: Cluster) -> None:
    raw = Raw(node, Identity.load(node.operator_key))
    await (await raw.open()).handshake()
    for _ in range(400):  # the bucket holds 100 and refills at 50/s
        try:
            await raw.ws.send(raw.frame("heartbeat", {"status": "idle", "ts": time.time()}))
        except ConnectionClosed:
            break
    codes = []
    try:
        while True:
            env = await raw.recv()
            codes.append(env.payload.get("code"))
    except ConnectionClosed:
        pass
    except TimeoutError:
        raise AssertionError(f"no close; got {len(codes)} replies, last {codes[-3:]}") from None
    assert "RATE_LIMITED" in codes


# --- roles and admission ----------------------------------------------------------------


async def test_viewer_reads_but_cannot_write(node: Cluster) -> None:
    key = node.root / "viewer.key"
    if not key.exists():
        VIEWER.save(key)
    async with AdminClient(Target(node.url, node.peer_id, key)) as viewer:
        assert viewer.role == "viewer"
        assert "sessions" in await viewer.call("session.list")
        with pytest.raises(FednodeError) as exc:
            await viewer.call("session.create", spec={})
        assert exc.value.code == "NOT_AUTHORIZED"


async def test_unknown_peer_is_not_admitted(node: Cluster) -> None:
    raw = Raw(node)
    await (await raw.open()).handshake()
    reply = await raw.register()
    assert reply.type == "error" and reply.payload["code"] == "NOT_AUTHORIZED"
    await raw.expect_closed()


async def _session(node: Cluster, **spec: Any) -> str:
    async with await operator(node) as client:
        return (await client.call("session.create", spec={"rounds": 1, **spec}))["session_id"]


async def _invite(node: Cluster, sid: str, **kw: Any) -> str:
    async with await operator(node) as client:
        return (await client.call("invite.create", session_id=sid, **kw))["token"]


async def _register_code(node: Cluster, token: str) -> str:
    raw = Raw(node)
    await (await raw.open()).handshake()
    reply = await raw.register(token)
    return reply.type if reply.type == "admitted" else reply.payload["code"]


async def test_join_tokens(node: Cluster) -> None:
    sid = await _session(node)
    once = await _invite(node, sid, uses=1)
    assert await _register_code(node, once) == "admitted"
    assert await _register_code(node, once) == "TOKEN_USED_UP"  # a second peer
    expired = await _invite(node, sid, expires_s=0.001)
    assert await _register_code(node, expired) == "TOKEN_EXPIRED"
    other_coordinator = Identity.generate()
    forged, _ = tokens.issue(other_coordinator, sid, expires_at=time.time() + 60, uses=5)
    assert await _register_code(node, forged) == "TOKEN_FORGED"
    bad_sig = once[:-4] + ("AAAA" if not once.endswith("AAAA") else "BBBB")
    assert await _register_code(node, bad_sig) == "TOKEN_FORGED"
    reusable = await _invite(node, sid, uses=5)
    async with await operator(node) as client:
        await client.call("session.stop", session_id=sid)
        with pytest.raises(FednodeError) as exc:  # no new invites to a closed session...
            await client.call("invite.create", session_id=sid)
        assert exc.value.code == "BAD_STATE"
    # ...and an old one no longer admits anybody
    assert await _register_code(node, reusable) == "TOKEN_SESSION_CLOSED"
    assert {"TOKEN_USED_UP", "TOKEN_EXPIRED", "TOKEN_FORGED"} <= set(security_codes(node))


async def test_update_for_another_session(node: Cluster) -> None:
    raw = Raw(node)
    sid = await _session(node, participants=[raw.ident.peer_id])
    await (await raw.open()).handshake()
    assert (await raw.register()).type == "admitted"
    update = {
        "round": 1,
        "base_cid": "b",
        "num_examples": 1,
        "loss": 0.0,
        "train_s": 0.0,
        "update_cid": "u",
        "data": b"",
    }
    await raw.send("update", update, session="s-not-mine")
    await raw.expect_error("NOT_FOUND", closed=False)
    await raw.send("update", update, session=sid)  # its session, but not granted a slot
    await raw.expect_error("NOT_GRANTED", closed=False)
    # asking for a slot is checked as the update would be: no round is running
    await raw.send("upload_ready", {"round": 1, "bytes": 10}, session=sid)
    await raw.expect_error("STALE_UPDATE", closed=False)


# --- and after all of that --------------------------------------------------------------


def test_a_legitimate_session_still_completes(node: Cluster, tmp_path) -> None:
    for k in range(3):
        node.start_participant(k, 3)
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"rounds": 2, "participants": node.peer_ids}))
    sid = cli_json("session", "create", str(spec), target=node)["session_id"]
    cli_json("session", "start", sid, target=node)
    cli("session", "watch", sid, "--json", check=True, target=node)
    status = cli_json("session", "status", sid, target=node)
    assert status["status"] == "completed" and status["rounds_completed"] == 2
    assert status["final_accuracy"] > 0.8
