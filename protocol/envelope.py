"""Canonical encoding and signed envelopes.

Every message after the handshake is an envelope: a canonical CBOR map (RFC 8949 §4.2,
via cbor2's ``canonical=True``) whose signature covers, byte for byte, the protocol
version, the message type, the session, the sender, a per-connection sequence number, a
timestamp, the SHA-256 of the payload bytes and the *channel*: a hash of the handshake
transcript. Binding the channel means an envelope captured on one connection cannot be
replayed on another, even by a sender's own later connection; the sequence number (each
one exactly one more than the last) means it cannot be replayed, dropped or reordered
within one; the timestamp window bounds how long a frame stays interesting.

The payload travels as its own CBOR bytes inside the envelope so that the signature is
over exactly what was sent; bulk bytes (models) are CBOR byte strings, never base64.

A payload with one large byte string at its top level (a model, an update, a masked vector:
at least ``BULK_MIN_BYTES``) travels as a *bulk frame* instead, so that the bytes are never
copied into and out of CBOR (four copies of a model per hop)::

    BULK_MAGIC | header length (4 bytes, big-endian) | header (CBOR map) | raw bytes

The header is the plain envelope with the large field taken out of ``p``, plus ``k`` (which
field the raw bytes fill) and ``l`` (their length); its signature, under its own domain so
that it can never be taken for a plain one, covers the header's fields and the SHA-256 of the
raw bytes. ``BULK_MAGIC`` starts with 0xff, the CBOR "break" code, which no CBOR item can
start with: a plain frame (always a CBOR map, 0xa0..0xbf) is never read as a bulk one.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import cbor2

from protocol import text
from protocol.errors import DecodeError, ReplayError, SignatureError
from protocol.identity import Identity, verify

PROTOCOL_VERSION = 1
MAX_CLOCK_SKEW_S = 300.0
_SIGNING_DOMAIN = b"fednode/envelope/v1\x00"
_FRAME_KEYS = {"v", "t", "s", "f", "n", "ts", "p", "sig"}
_BULK_SIGNING_DOMAIN = b"fednode/envelope/v1/bulk\x00"
_BULK_KEYS = _FRAME_KEYS | {"k", "l"}
BULK_MAGIC = b"\xffFNB"
_BULK_PREFIX = len(BULK_MAGIC) + 4  # the magic, then the header's length
# Below this, CBOR's copies cost less than a second frame layout is worth.
BULK_MIN_BYTES = 64 * 1024
# A bulk header holds the small fields of one message: the per-type caps of protocol.limits
# (64 KiB for control traffic, 1 MiB for specs) bound what a well-behaved peer puts there.
MAX_BULK_HEADER_BYTES = 1024 * 1024
# The type names a message kind (protocol.messages) and the session is an ID such as
# s-0123456789ab: both short identifiers. Anything else is not a fednode frame, and since
# both end up in logs, errors, the ledger and operators' terminals, it is refused here,
# before any of that, instead of being carried along.
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
SESSION_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
# The payload field a bulk frame's raw bytes fill: a message field name (protocol.messages).
FIELD_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")


def encode(obj: Any) -> bytes:
    """Deterministic CBOR: the same value always gives the same bytes."""
    return cbor2.dumps(obj, canonical=True)


def _no_tags(*args: Any) -> Any:
    """Refuse every CBOR tag. cbor2 calls tag hooks as (decoder, tag) in some releases and
    (tag, immutable) in others (6.x), so find the tag among the arguments."""
    tag = next((a for a in args if isinstance(a, cbor2.CBORTag)), None)
    number = tag.tag if tag is not None else "?"
    raise DecodeError(f"CBOR tag {number} is not allowed in fednode frames")


def decode(data: bytes, *, what: str = "frame") -> Any:
    """Parse CBOR; any failure (truncation, garbage, nesting bombs) is a DecodeError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{what} must be binary, got {type(data).__name__}")
    try:
        return cbor2.loads(bytes(data), tag_hook=_no_tags)
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises many types; none may escape as-is
        if isinstance(exc.__cause__, DecodeError):  # our tag refusal, wrapped by cbor2
            raise DecodeError(f"{what}: {exc.__cause__.message}") from None
        # cbor2's messages are its own, but bound them anyway: they may quote the input
        reason = text.clean(str(exc), 200)
        raise DecodeError(f"{what} is not valid CBOR: {type(exc).__name__}: {reason}") from None


def _signing_bytes(
    channel: bytes,
    v: int,
    type_: str,
    session: str,
    sender: str,
    seq: int,
    ts: float,
    payload_hash: bytes,
) -> bytes:
    return _SIGNING_DOMAIN + encode([channel, v, type_, session, sender, seq, ts, payload_hash])


def _bulk_signing_bytes(
    channel: bytes,
    v: int,
    type_: str,
    session: str,
    sender: str,
    seq: int,
    ts: float,
    payload_hash: bytes,
    field: str,
    length: int,
    raw_hash: bytes,
) -> bytes:
    return _BULK_SIGNING_DOMAIN + encode(
        [channel, v, type_, session, sender, seq, ts, payload_hash, field, length, raw_hash]
    )


def bulk_field(payload: dict[str, Any]) -> str | None:
    """The field a payload's bulk frame carries raw: its largest top-level byte string of at
    least BULK_MIN_BYTES (None: a plain frame)."""
    best, size = None, BULK_MIN_BYTES - 1
    for key, value in payload.items():
        if isinstance(key, str) and isinstance(value, bytes | bytearray | memoryview):
            n = value.nbytes if isinstance(value, memoryview) else len(value)
            if n > size:
                best, size = key, n
    return best


@dataclass(frozen=True)
class Envelope:
    """A verified envelope. Only ``open_frame`` makes these from received bytes."""

    type: str
    session: str
    sender: str
    seq: int
    ts: float
    payload: dict[str, Any]
    size: int  # bytes of the whole frame, for accounting


def seal(
    identity: Identity,
    *,
    channel: bytes,
    type: str,
    seq: int,
    payload: dict[str, Any],
    ts: float,
    session: str = "",
) -> bytes:
    """Encode and sign one envelope.

    Only the signed bytes must be canonical (the receiver rebuilds them); the payload and the
    frame travel as the exact bytes that were hashed and signed, so they use cbor2's plain
    encoder, which is deterministic for our dicts and 10x faster on multi-MB models (the
    canonical encoder sorts map items by re-encoding them into separate buffers).
    A payload with a large byte string goes out as a bulk frame (see the module's doc).
    """
    field = bulk_field(payload)
    if field is not None:
        return _seal_bulk(identity, channel, type, seq, payload, ts, session, field)
    body = cbor2.dumps(payload)
    sender = identity.peer_id
    sig = identity.sign(
        _signing_bytes(
            channel, PROTOCOL_VERSION, type, session, sender, seq, ts, hashlib.sha256(body).digest()
        )
    )
    return cbor2.dumps(
        {
            "v": PROTOCOL_VERSION,
            "t": type,
            "s": session,
            "f": sender,
            "n": seq,
            "ts": ts,
            "p": body,
            "sig": sig,
        }
    )


def _seal_bulk(
    identity: Identity,
    channel: bytes,
    type_: str,
    seq: int,
    payload: dict[str, Any],
    ts: float,
    session: str,
    field: str,
) -> bytes:
    raw = payload[field]
    length = raw.nbytes if isinstance(raw, memoryview) else len(raw)
    body = cbor2.dumps({k: v for k, v in payload.items() if k != field})
    sender = identity.peer_id
    sig = identity.sign(
        _bulk_signing_bytes(
            channel,
            PROTOCOL_VERSION,
            type_,
            session,
            sender,
            seq,
            ts,
            hashlib.sha256(body).digest(),
            field,
            length,
            hashlib.sha256(raw).digest(),
        )
    )
    header = cbor2.dumps(
        {
            "v": PROTOCOL_VERSION,
            "t": type_,
            "s": session,
            "f": sender,
            "n": seq,
            "ts": ts,
            "p": body,
            "k": field,
            "l": length,
            "sig": sig,
        }
    )
    # The one copy of the raw bytes on this side: into the frame the socket sends.
    return b"".join((BULK_MAGIC, len(header).to_bytes(4, "big"), header, raw))


def _field(frame: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    value = frame.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DecodeError(f"envelope field {name!r} ({key}) is missing or of the wrong type")
    return value


def open_frame(
    data: bytes, *, channel: bytes, sender_peer_id: str, sender_public_key: bytes
) -> Envelope:
    """Decode an envelope and check its signature against the connection's peer.

    Checks happen before anything acts on the content: shape, version, that the claimed
    sender is the authenticated peer (an impostor frame is refused even if well signed by
    someone else), then the signature over the exact bytes. A bulk frame (it starts with
    BULK_MAGIC) gets the same checks, and gives the same Envelope.
    """
    if isinstance(data, bytes | bytearray | memoryview) and bytes(data[:4]) == BULK_MAGIC:
        return _open_bulk(data, channel, sender_peer_id, sender_public_key)
    frame = decode(data, what="envelope")
    if not isinstance(frame, dict) or set(frame) != _FRAME_KEYS:
        raise DecodeError(
            "envelope must be a map with exactly the keys " + ", ".join(sorted(_FRAME_KEYS))
        )
    v, type_, session, sender, seq, ts, body, sig = _checked_fields(frame, sender_peer_id)
    verify(
        sender_public_key,
        sig,
        _signing_bytes(channel, v, type_, session, sender, seq, ts, hashlib.sha256(body).digest()),
    )
    return Envelope(
        type=type_,
        session=session,
        sender=sender,
        seq=seq,
        ts=float(ts),
        payload=_payload(body, type_),
        size=len(data),
    )


def _checked_fields(
    frame: dict[str, Any], sender_peer_id: str
) -> tuple[int, str, str, str, int, int | float, bytes, bytes]:
    """The fields plain and bulk frames share, each of its type and in its range, and the
    sender the authenticated peer."""
    v = _field(frame, "v", int, "version")
    if v != PROTOCOL_VERSION:
        raise DecodeError(
            f"envelope version {v} is not supported (this node speaks {PROTOCOL_VERSION})",
            hint="upgrade the older node",
        )
    type_ = _field(frame, "t", str, "type")
    session = _field(frame, "s", str, "session")
    sender = _field(frame, "f", str, "sender")
    seq = _field(frame, "n", int, "sequence")
    ts = _field(frame, "ts", (int, float), "timestamp")
    body = _field(frame, "p", bytes, "payload")
    sig = _field(frame, "sig", bytes, "signature")
    if not math.isfinite(ts):
        raise DecodeError("envelope timestamp is not a finite number")
    if not TYPE_RE.fullmatch(type_):
        raise DecodeError(
            f"envelope type {text.shown(type_)} is not a message type name "
            "(lower-case letters, digits and _, at most 32)"
        )
    if not SESSION_RE.fullmatch(session):
        raise DecodeError(
            f"envelope session {text.shown(session)} is not a session ID "
            "(letters, digits, '.', '_' and '-', at most 64)"
        )
    if sender != sender_peer_id:
        raise SignatureError(
            f"envelope claims sender {text.shown(sender)} on a connection authenticated as "
            f"{sender_peer_id}",
            hint="a peer may only speak for itself",
        )
    return v, type_, session, sender, seq, ts, body, sig


def _payload(body: bytes, type_: str) -> dict[str, Any]:
    payload = decode(body, what=f"payload of {type_!r}")
    if not isinstance(payload, dict):
        raise DecodeError(f"payload of {type_!r} must be a map")
    return payload


def _open_bulk(
    data: bytes | bytearray | memoryview,
    channel: bytes,
    sender_peer_id: str,
    sender_public_key: bytes,
) -> Envelope:
    """open_frame for a bulk frame: every length is checked against the bytes received
    (nothing is allocated on a length the peer declares), the signature before the payload
    is decoded, and the raw bytes are copied once, out of the received frame."""
    view = memoryview(data)
    if len(view) < _BULK_PREFIX:
        raise DecodeError(f"bulk envelope of {len(view)} bytes is truncated before its header")
    header_len = int.from_bytes(view[len(BULK_MAGIC) : _BULK_PREFIX], "big")
    if header_len > MAX_BULK_HEADER_BYTES or _BULK_PREFIX + header_len > len(view):
        raise DecodeError(
            f"bulk envelope header claims {header_len:,} bytes; the frame has "
            f"{len(view) - _BULK_PREFIX:,} after the length and a header may have at most "
            f"{MAX_BULK_HEADER_BYTES:,}"
        )
    frame = decode(view[_BULK_PREFIX : _BULK_PREFIX + header_len], what="bulk envelope header")
    if not isinstance(frame, dict) or set(frame) != _BULK_KEYS:
        raise DecodeError(
            "bulk envelope header must be a map with exactly the keys "
            + ", ".join(sorted(_BULK_KEYS))
        )
    v, type_, session, sender, seq, ts, body, sig = _checked_fields(frame, sender_peer_id)
    field = _field(frame, "k", str, "bulk field")
    length = _field(frame, "l", int, "bulk length")
    if not FIELD_RE.fullmatch(field):
        raise DecodeError(
            f"bulk envelope field {text.shown(field)} is not a message field name "
            "(lower-case letters, digits and _, at most 32)"
        )
    raw = view[_BULK_PREFIX + header_len :]
    if length != len(raw):
        raise DecodeError(
            f"bulk envelope declares {length:,} raw bytes for {field!r}; {len(raw):,} follow "
            "its header"
        )
    verify(
        sender_public_key,
        sig,
        _bulk_signing_bytes(
            channel,
            v,
            type_,
            session,
            sender,
            seq,
            ts,
            hashlib.sha256(body).digest(),
            field,
            length,
            hashlib.sha256(raw).digest(),
        ),
    )
    payload = _payload(body, type_)
    if field in payload:
        raise DecodeError(f"bulk envelope of {type_!r} carries field {field!r} twice")
    # Messages hold bytes (protocol.messages checks the type), so this is the one copy.
    payload[field] = bytes(raw)
    return Envelope(
        type=type_,
        session=session,
        sender=sender,
        seq=seq,
        ts=float(ts),
        payload=payload,
        size=len(view),
    )


class ReplayGuard:
    """Per-connection inbound check: sequence strictly +1, timestamp within the window."""

    def __init__(self, max_skew_s: float = MAX_CLOCK_SKEW_S) -> None:
        self.max_skew_s = max_skew_s
        self.last_seq = 0

    def check(self, env: Envelope, now: float) -> None:
        if env.seq != self.last_seq + 1:
            kind = "replayed or duplicated" if env.seq <= self.last_seq else "out of order"
            raise ReplayError(
                f"envelope {env.type!r} has sequence {env.seq}, expected "
                f"{self.last_seq + 1}: {kind}"
            )
        if abs(env.ts - now) > self.max_skew_s:
            raise ReplayError(
                f"envelope {env.type!r} is {env.ts - now:+.0f} s from this "
                f"node's clock (window ±{self.max_skew_s:.0f} s)"
            )
        self.last_seq = env.seq
