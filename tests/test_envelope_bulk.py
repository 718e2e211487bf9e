"""Bulk frames (protocol/envelope.py): a large byte string travels raw after a signed header.

Every refusal here is of a frame an attacker could send: the receiver must refuse it with the
project's own error before it acts on the content, and never allocate on a declared length.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import envelope, messages
from protocol.envelope import (
    BULK_MAGIC,
    BULK_MIN_BYTES,
    ReplayGuard,
    bulk_field,
    open_frame,
    seal,
)
from protocol.errors import (
    DecodeError,
    FednodeError,
    ReplayError,
    SignatureError,
    ValidationError,
)
from protocol.identity import Identity

NOW = 1_800_000_000.0
CHANNEL = b"\x07" * 32
ALICE = Identity.generate()
BLOB = os.urandom(BULK_MIN_BYTES + 123)
PREFIX = len(BULK_MAGIC) + 4


def _seal(payload: dict, seq: int = 1, identity: Identity = ALICE, type_: str = "block") -> bytes:
    return seal(
        identity, channel=CHANNEL, type=type_, seq=seq, payload=payload, ts=NOW, session="s-1"
    )


def _open(frame: bytes | bytearray):
    return open_frame(
        frame, channel=CHANNEL, sender_peer_id=ALICE.peer_id, sender_public_key=ALICE.public_key
    )


def _split(frame: bytes) -> tuple[dict, bytes]:
    """A bulk frame's header (decoded) and raw bytes."""
    n = int.from_bytes(frame[len(BULK_MAGIC) : PREFIX], "big")
    return cbor2.loads(frame[PREFIX : PREFIX + n]), frame[PREFIX + n :]


def _join(header: dict, raw: bytes) -> bytes:
    head = cbor2.dumps(header)
    return BULK_MAGIC + len(head).to_bytes(4, "big") + head + raw


def test_a_large_field_travels_raw_and_comes_back_as_bytes() -> None:
    frame = _seal({"cid": "bafk", "data": BLOB})
    assert frame.startswith(BULK_MAGIC)
    assert frame.endswith(BLOB)  # raw, no CBOR around it
    header, raw = _split(frame)
    assert header["k"] == "data" and header["l"] == len(BLOB) and raw == BLOB
    assert cbor2.loads(header["p"]) == {"cid": "bafk"}  # the rest, without the bulk field
    env = _open(frame)
    assert env.payload == {"cid": "bafk", "data": BLOB}
    assert type(env.payload["data"]) is bytes  # what protocol.messages accepts
    assert env.size == len(frame)
    assert (env.type, env.session, env.seq, env.ts) == ("block", "s-1", 1, NOW)
    assert isinstance(messages.parse(env.type, env.payload), messages.Block)


def test_small_payloads_stay_plain_and_the_largest_field_goes_bulk() -> None:
    assert bulk_field({"data": b"x" * (BULK_MIN_BYTES - 1)}) is None
    assert not _seal({"cid": "x", "data": b"x" * 1024}).startswith(BULK_MAGIC)
    big = os.urandom(2 * BULK_MIN_BYTES)
    assert bulk_field({"a": BLOB, "b": big, "c": "text" * 50_000}) == "b"
    env = _open(_seal({"a": BLOB, "b": big}, type_="x_test"))
    assert env.payload == {"a": BLOB, "b": big}  # the smaller one rode in the CBOR part


def test_truncated_frames_are_refused() -> None:
    frame = _seal({"cid": "x", "data": BLOB})
    for cut in (len(BULK_MAGIC), PREFIX - 1, PREFIX, PREFIX + 10, len(frame) - 1):
        with pytest.raises(DecodeError):
            _open(frame[:cut])


def test_header_length_beyond_the_frame_is_refused() -> None:
    frame = bytearray(_seal({"cid": "x", "data": BLOB}))
    for claimed in (len(frame), 2**32 - 1):
        frame[len(BULK_MAGIC) : PREFIX] = claimed.to_bytes(4, "big")
        with pytest.raises(DecodeError, match="header claims"):
            _open(frame)


def test_raw_length_mismatch_is_refused_before_the_signature() -> None:
    frame = _seal({"cid": "x", "data": BLOB})
    with pytest.raises(DecodeError, match="raw bytes"):
        _open(frame + b"\x00")  # one byte more than the header declares
    header, raw = _split(frame)
    header["l"] = 10**15  # a length the receiver must not allocate
    with pytest.raises(DecodeError, match="raw bytes"):
        _open(_join(header, raw))


def test_a_flipped_raw_byte_fails_the_signature() -> None:
    frame = bytearray(_seal({"cid": "x", "data": BLOB}))
    for at in (-1, -len(BLOB), -len(BLOB) // 2):
        bad = bytearray(frame)
        bad[at] ^= 0x01
        with pytest.raises(SignatureError):
            _open(bad)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("t", "update"),
        ("s", "s-2"),
        ("n", 2),
        ("ts", NOW + 1),
        ("p", cbor2.dumps({"cid": "y"})),
        ("k", "other"),
        ("v", 1),  # unchanged: the control
    ],
)
def test_header_tampering_is_refused(key: str, value: object) -> None:
    header, raw = _split(_seal({"cid": "x", "data": BLOB}))
    header[key] = value
    if key == "v":
        assert _open(_join(header, raw)).payload["data"] == BLOB
        return
    with pytest.raises(SignatureError):
        _open(_join(header, raw))


def test_header_shape_is_checked() -> None:
    header, raw = _split(_seal({"cid": "x", "data": BLOB}))
    for bad in (
        {**header, "x": 1},  # an unknown key
        {k: v for k, v in header.items() if k != "l"},  # a missing one
        {**header, "v": 2},
        {**header, "l": "many"},
        {**header, "k": "Data; rm"},  # not a field name
        {**header, "t": "../etc"},
        {**header, "ts": float("nan")},
    ):
        with pytest.raises(DecodeError):
            _open(_join(bad, raw))
    with pytest.raises(DecodeError):
        _open(BULK_MAGIC + (4).to_bytes(4, "big") + cbor2.dumps([1, 2, 3]))


def test_impostor_and_another_channel_are_refused() -> None:
    mallory = Identity.generate()
    with pytest.raises(SignatureError, match="claims sender"):
        _open(_seal({"cid": "x", "data": BLOB}, identity=mallory))
    frame = _seal({"cid": "x", "data": BLOB})
    with pytest.raises(SignatureError):
        open_frame(
            frame,
            channel=b"\x08" * 32,
            sender_peer_id=ALICE.peer_id,
            sender_public_key=ALICE.public_key,
        )


def test_a_plain_signature_is_never_a_bulk_one() -> None:
    """The same fields signed for a plain frame do not verify as a bulk header: separate
    signing domains, so a frame cannot be re-wrapped in the other layout."""
    plain = cbor2.loads(_seal({"cid": "x"}))
    header, raw = _split(_seal({"cid": "x", "data": BLOB}))
    header["sig"] = plain["sig"]
    with pytest.raises(SignatureError):
        _open(_join(header, raw))


def test_bulk_field_colliding_with_a_payload_key_is_refused() -> None:
    """A sender that signs a header whose CBOR part already holds the bulk field."""
    frame = _seal({"cid": "x", "data": BLOB})
    header, raw = _split(frame)
    # signed by the sender itself, with "data" in both places
    header["p"] = cbor2.dumps({"cid": "x", "data": b"short"})
    header["sig"] = ALICE.sign(
        envelope._bulk_signing_bytes(
            CHANNEL,
            1,
            "block",
            "s-1",
            ALICE.peer_id,
            1,
            NOW,
            hashlib.sha256(header["p"]).digest(),
            "data",
            len(raw),
            hashlib.sha256(raw).digest(),
        )
    )
    with pytest.raises(DecodeError, match="twice"):
        _open(_join(header, raw))


def test_bulk_field_not_in_the_message_type_is_refused_by_the_parser() -> None:
    """The envelope does not know message types; protocol.messages refuses an unknown field
    and a field of another type, as for a plain frame."""
    env = _open(_seal({"cid": "x", "blob": BLOB}))
    assert env.payload["blob"] == BLOB
    with pytest.raises(ValidationError, match="unknown field"):
        messages.parse(env.type, env.payload)
    env = _open(_seal({"cid": BLOB, "data": b"x"}))
    with pytest.raises(ValidationError, match="cid' must be text"):
        messages.parse(env.type, env.payload)


def test_replay_guard_catches_bulk_frames() -> None:
    guard = ReplayGuard()
    first = _seal({"cid": "x", "data": BLOB}, seq=1)
    guard.check(_open(first), NOW)
    with pytest.raises(ReplayError, match="replayed"):
        guard.check(_open(first), NOW)
    with pytest.raises(ReplayError, match="out of order"):
        guard.check(_open(_seal({"cid": "x", "data": BLOB}, seq=3)), NOW)


def test_memoryview_and_bytearray_payloads_seal_like_bytes() -> None:
    for blob in (bytearray(BLOB), memoryview(BLOB)):
        env = _open(_seal({"cid": "x", "data": blob}))
        assert env.payload["data"] == BLOB


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=2**32 - 1))
def test_arbitrary_bulk_frames_raise_only_project_errors(tail: bytes, header_len: int) -> None:
    frame = BULK_MAGIC + header_len.to_bytes(4, "big") + tail
    with contextlib.suppress(FednodeError):
        _open(frame)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_flipped_byte_is_refused(at: int, xor: int) -> None:
    frame = bytearray(_seal({"cid": "x", "data": BLOB}))
    at %= len(frame)
    if xor == 0:
        return
    frame[at] ^= xor
    with pytest.raises(FednodeError):
        _open(frame)
