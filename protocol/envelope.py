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
# The type names a message kind (protocol.messages) and the session is an ID such as
# s-0123456789ab: both short identifiers. Anything else is not a fednode frame, and since
# both end up in logs, errors, the ledger and operators' terminals, it is refused here,
# before any of that, instead of being carried along.
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
SESSION_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")


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
    """
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
    someone else), then the signature over the exact bytes.
    """
    frame = decode(data, what="envelope")
    if not isinstance(frame, dict) or set(frame) != _FRAME_KEYS:
        raise DecodeError(
            "envelope must be a map with exactly the keys " + ", ".join(sorted(_FRAME_KEYS))
        )
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
    verify(
        sender_public_key,
        sig,
        _signing_bytes(channel, v, type_, session, sender, seq, ts, hashlib.sha256(body).digest()),
    )
    payload = decode(body, what=f"payload of {type_!r}")
    if not isinstance(payload, dict):
        raise DecodeError(f"payload of {type_!r} must be a map")
    return Envelope(
        type=type_,
        session=session,
        sender=sender,
        seq=seq,
        ts=float(ts),
        payload=payload,
        size=len(data),
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
