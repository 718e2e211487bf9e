"""Handshake, envelopes and messages, without sockets (protocol/ is pure)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import messages
from protocol.envelope import ReplayGuard, decode, encode, open_frame, seal
from protocol.errors import (
    DecodeError,
    FednodeError,
    HandshakeError,
    PeerMismatch,
    ReplayError,
    SignatureError,
    ValidationError,
)
from protocol.handshake import ClientHandshake, ServerHandshake, raise_if_refusal
from protocol.identity import Identity

NOW = 1_800_000_000.0


def handshake(client: Identity, server: Identity, expected: str | None = None):
    c = ClientHandshake(client, expected or server.peer_id)
    s = ServerHandshake(server)
    challenge = s.on_hello(c.hello())
    auth = c.on_challenge(challenge)
    return c.result, s.on_auth(auth)


def test_handshake_authenticates_both_sides() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    c_res, s_res = handshake(alice, bob)
    assert c_res.peer_id == bob.peer_id
    assert s_res.peer_id == alice.peer_id
    assert c_res.channel == s_res.channel and len(c_res.channel) == 32


def test_wrong_key_refused_by_client() -> None:
    """A server whose key is not the expected peer ID's is refused before anything else."""
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()
    c = ClientHandshake(alice, bob.peer_id)
    s = ServerHandshake(mallory)  # mallory answers at bob's address
    with pytest.raises(PeerMismatch):
        s.on_hello(c.hello())  # mallory sees the hello is not for her...
    s2 = ServerHandshake(mallory)
    hello = decode(c.hello())
    hello["to"] = mallory.peer_id  # ...so she rewrites it; the client still checks her key
    challenge = s2.on_hello(encode(hello))
    with pytest.raises(PeerMismatch):
        c.on_challenge(challenge)


def test_client_that_does_not_hold_its_key_refused() -> None:
    alice, bob, mallory = Identity.generate(), Identity.generate(), Identity.generate()

    class Liar:  # presents alice's public key, can only sign with mallory's
        public_key = alice.public_key
        peer_id = alice.peer_id
        sign = staticmethod(mallory.sign)

    c = ClientHandshake(Liar(), bob.peer_id)  # type: ignore[arg-type]
    s = ServerHandshake(bob)
    auth = c.on_challenge(s.on_hello(c.hello()))
    with pytest.raises(HandshakeError, match="does not hold the key"):
        s.on_auth(auth)


def test_signature_from_another_handshake_is_useless() -> None:
    alice, bob = Identity.generate(), Identity.generate()
    c1, s1 = ClientHandshake(alice, bob.peer_id), ServerHandshake(bob)
    auth1 = c1.on_challenge(s1.on_hello(c1.hello()))
    c2, s2 = ClientHandshake(alice, bob.peer_id), ServerHandshake(bob)
    s2.on_hello(c2.hello())
    with pytest.raises(HandshakeError):
        s2.on_auth(auth1)  # fresh nonces: an old auth does not verify


def test_refusal_frame_carries_reason() -> None:
    from protocol.handshake import error_frame

    frame = error_frame(FednodeError("no", code="NOT_AUTHORIZED", hint="ask"))
    with pytest.raises(HandshakeError) as exc:
        raise_if_refusal(frame)
    assert exc.value.code == "NOT_AUTHORIZED"


def _pair():
    alice, bob = Identity.generate(), Identity.generate()
    c_res, _ = handshake(alice, bob)
    return alice, c_res.channel


def test_garbage_cbor_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode(b"\xff\xff")


def test_envelope_roundtrip() -> None:
    alice, channel = _pair()
    frame = seal(
        alice,
        channel=channel,
        type="heartbeat",
        seq=1,
        payload={"status": "idle", "ts": NOW},
        ts=NOW,
        session="s-1",
    )
    env = open_frame(
        frame, channel=channel, sender_peer_id=alice.peer_id, sender_public_key=alice.public_key
    )
    assert (env.type, env.session, env.seq, env.payload["status"]) == (
        "heartbeat",
        "s-1",
        1,
        "idle",
    )
    assert encode({"b": 1, "a": 2}) == encode({"a": 2, "b": 1})  # canonical


def test_every_tampered_byte_is_refused() -> None:
    alice, channel = _pair()
    frame = seal(alice, channel=channel, type="fetch", seq=1, payload={"cid": "bafk"}, ts=NOW)
    for i in range(len(frame)):
        bad = bytearray(frame)
        bad[i] ^= 0x01
        with pytest.raises(FednodeError):
            open_frame(
                bytes(bad),
                channel=channel,
                sender_peer_id=alice.peer_id,
                sender_public_key=alice.public_key,
            )


def test_envelope_from_another_channel_refused() -> None:
    alice, channel = _pair()
    _, other = _pair()
    frame = seal(alice, channel=channel, type="fetch", seq=1, payload={"cid": "x"}, ts=NOW)
    with pytest.raises(SignatureError):
        open_frame(
            frame, channel=other, sender_peer_id=alice.peer_id, sender_public_key=alice.public_key
        )


def test_impostor_sender_refused() -> None:
    alice, channel = _pair()
    mallory = Identity.generate()
    frame = seal(mallory, channel=channel, type="fetch", seq=1, payload={"cid": "x"}, ts=NOW)
    with pytest.raises(SignatureError, match="claims sender"):
        open_frame(
            frame, channel=channel, sender_peer_id=alice.peer_id, sender_public_key=alice.public_key
        )


def test_replay_guard() -> None:
    alice, channel = _pair()
    guard = ReplayGuard()

    def env(seq: int, ts: float = NOW):
        return open_frame(
            seal(alice, channel=channel, type="fetch", seq=seq, payload={"cid": "x"}, ts=ts),
            channel=channel,
            sender_peer_id=alice.peer_id,
            sender_public_key=alice.public_key,
        )

    guard.check(env(1), NOW)
    guard.check(env(2), NOW)
    with pytest.raises(ReplayError, match="replayed"):
        guard.check(env(2), NOW)
    with pytest.raises(ReplayError, match="out of order"):
        guard.check(env(4), NOW)
    with pytest.raises(ReplayError, match="clock"):
        guard.check(env(3, NOW - 3600), NOW)


def test_message_validation_names_the_field() -> None:
    ok = messages.parse(
        "update",
        {
            "round": 1,
            "base_cid": "b",
            "num_examples": 3,
            "loss": 0.5,
            "train_s": 0.1,
            "update_cid": "u",
            "data": b"x",
        },
    )
    assert isinstance(ok, messages.Update)
    with pytest.raises(ValidationError, match="num_examples"):
        messages.parse(
            "update",
            {
                "round": 1,
                "base_cid": "b",
                "num_examples": "3",
                "loss": 0.5,
                "train_s": 0.1,
                "update_cid": "u",
                "data": b"x",
            },
        )
    with pytest.raises(ValidationError, match="missing field 'cid'"):
        messages.parse("fetch", {})
    with pytest.raises(ValidationError, match="unknown field"):
        messages.parse("fetch", {"cid": "x", "extra": 1})
    with pytest.raises(ValidationError) as exc:
        messages.parse("launch_missiles", {})
    assert exc.value.code == "UNKNOWN_TYPE"
    with pytest.raises(ValidationError, match="finite"):
        messages.parse("heartbeat", {"status": "idle", "ts": float("nan")})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decoders_raise_only_project_errors_on_bytes(data: bytes) -> None:
    alice, channel = Identity.generate(), b"\x00" * 32
    for fn in (
        lambda: open_frame(
            data, channel=channel, sender_peer_id=alice.peer_id, sender_public_key=alice.public_key
        ),
        lambda: ServerHandshake(alice).on_hello(data),
        lambda: ClientHandshake(alice, alice.peer_id).on_challenge(data),
        lambda: raise_if_refusal(data),
    ):
        with contextlib.suppress(FednodeError):
            fn()


_json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(messages.MESSAGES)),
    st.dictionaries(
        st.sampled_from(
            ["round", "cid", "data", "status", "ts", "id", "op", "args", "kind", "loss", "x"]
        ),
        _json_like,
        max_size=6,
    ),
)
def test_message_parser_raises_only_validation_errors(type_: str, payload: dict) -> None:
    with contextlib.suppress(ValidationError):
        messages.parse(type_, payload)


_ENVELOPE_KEYS = ["v", "t", "s", "f", "n", "ts", "p", "sig", "x"]
_HANDSHAKE_KEYS = ["hs", "proto", "pub", "nonce", "to", "sig", "rot", "code"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_ENVELOPE_KEYS), _json_like, max_size=9))
def test_envelope_decoder_on_arbitrary_structures(frame: dict) -> None:
    """Well-formed CBOR of any shape: only the project's own errors come out."""
    alice = Identity.generate()
    with contextlib.suppress(FednodeError):
        open_frame(
            encode(frame),
            channel=b"\x00" * 32,
            sender_peer_id=alice.peer_id,
            sender_public_key=alice.public_key,
        )


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(_HANDSHAKE_KEYS),
        _json_like | st.sampled_from(["hello", "challenge", "auth", "error", "fednode/1"]),
        max_size=8,
    )
)
def test_handshake_on_arbitrary_structures(msg: dict) -> None:
    alice = Identity.generate()
    frame = encode(msg)
    for fn in (
        lambda: ServerHandshake(alice).on_hello(frame),
        lambda: ClientHandshake(alice, alice.peer_id).on_challenge(frame),
        lambda: raise_if_refusal(frame),
    ):
        with contextlib.suppress(FednodeError):
            fn()


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=300)
    | st.builds(lambda a, b: f"fnjt1.{a}.{b}", st.text(max_size=80), st.text(max_size=80))
)
def test_token_checker_on_arbitrary_strings(token: str) -> None:
    from protocol import tokens

    with contextlib.suppress(FednodeError):
        tokens.check(token, coordinator=Identity.generate(), now=NOW)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(st.sampled_from(["old", "new", "ts", "sig"]), _json_like, max_size=4),
        max_size=4,
    )
    | _json_like
)
def test_rotation_chain_on_arbitrary_structures(chain: object) -> None:
    from protocol.rotation import aliases

    with contextlib.suppress(FednodeError):
        aliases(chain, Identity.generate().public_key)


def test_cbor_tags_are_refused_by_name() -> None:
    """A tagged value (e.g. a CID as tag 42) in a frame is a DecodeError that says so."""
    import cbor2

    from protocol.envelope import decode
    from protocol.errors import DecodeError

    with pytest.raises(DecodeError, match="CBOR tag 42 is not allowed"):
        decode(cbor2.dumps({"x": cbor2.CBORTag(42, b"\x00")}))
