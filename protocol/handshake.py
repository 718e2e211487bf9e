"""Mutual authentication, as a state machine with no I/O.

Three frames, client first (drawn step by step in docs/architecture.md):

1. client → server  hello      {proto, pub_c, nonce_c, to}   to = the peer ID it means to reach
2. server → client  challenge  {proto, pub_s, nonce_s, sig_s} sig_s = Sign_s(transcript(server))
3. client → server  auth       {sig_c}                        sig_c = Sign_c(transcript(client))
4. server → client  a signed Welcome envelope, or an unsigned error frame with the reason

``transcript(role)`` is canonical CBOR of [role, proto, nonce_c, nonce_s, pub_c, pub_s, to]
behind a domain tag. It binds the protocol version, both fresh nonces, both keys and the
intended peer ID, so a signature cannot be replayed into another handshake, reflected back
(the role differs), or relayed to a third node (``to`` differs). The client refuses a server
whose key does not hash to the peer ID it expected; the server refuses a hello addressed to
someone else. The result carries ``channel``, a hash of the whole exchange that every
later envelope signs over (see protocol.envelope).

Before authentication nothing can be signed, so a refusal is an unsigned ``error`` frame.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from protocol import text
from protocol.envelope import decode, encode
from protocol.errors import FednodeError, HandshakeError, PeerMismatch, SignatureError
from protocol.identity import Identity, peer_id_from_public_key, verify
from protocol.rotation import Rotation, aliases

PROTOCOL = "fednode/1"
NONCE_BYTES = 32
_DOMAIN = b"fednode/handshake/v1\x00"


@dataclass(frozen=True)
class HandshakeResult:
    peer_id: str  # the authenticated remote peer
    public_key: bytes
    channel: bytes  # binds every later envelope to this connection
    aliases: tuple[str, ...] = ()  # former peer IDs of the remote, proven by its rotation chain


def error_frame(err: FednodeError) -> bytes:
    return encode({"hs": "error", **err.to_dict()})


def raise_if_refusal(frame: bytes) -> None:
    """Raise the peer's reason if ``frame`` is an unsigned handshake refusal."""
    msg = decode(frame, what="frame")
    if isinstance(msg, dict) and msg.get("hs") == "error":
        _message(frame, "error-free frame")


def _message(frame: bytes, expected: str) -> dict[str, Any]:
    msg = decode(frame, what=f"handshake {expected}")
    if not isinstance(msg, dict) or not isinstance(msg.get("hs"), str):
        raise HandshakeError(f"expected a handshake {expected!r} frame")
    if msg["hs"] == "error":
        raise HandshakeError(
            # The peer's words, bounded and without control characters: they reach logs and
            # the operator's terminal.
            f"peer refused the handshake: {text.clean(str(msg.get('code')), 64)}: "
            f"{text.clean(str(msg.get('message')), 500)}",
            hint=text.clean(str(msg.get("hint") or HandshakeError.hint), 500),
            code=text.clean(str(msg.get("code")), 64),
        )
    if msg["hs"] != expected:
        raise HandshakeError(f"expected handshake {expected!r}, got {text.shown(msg['hs'])}")
    return msg


def _bytes(msg: dict[str, Any], key: str, size: int) -> bytes:
    value = msg.get(key)
    if not isinstance(value, bytes) or len(value) != size:
        raise HandshakeError(f"handshake field {key!r} must be {size} bytes")
    return value


def _check_proto(msg: dict[str, Any]) -> None:
    if msg.get("proto") != PROTOCOL:
        raise HandshakeError(
            f"peer speaks {text.shown(msg.get('proto'))}, this node speaks {PROTOCOL!r}",
            hint="run the same fednode version on both machines",
        )


@dataclass
class _Transcript:
    nonce_c: bytes
    nonce_s: bytes
    pub_c: bytes
    pub_s: bytes
    to: str

    def signed(self, role: str) -> bytes:
        return _DOMAIN + encode(
            [role, PROTOCOL, self.nonce_c, self.nonce_s, self.pub_c, self.pub_s, self.to]
        )

    def channel(self) -> bytes:
        return hashlib.sha256(self.signed("channel")).digest()


class ClientHandshake:
    """The side that dials; it knows whom it wants to reach."""

    def __init__(
        self,
        identity: Identity,
        expected_peer_id: str,
        nonce: bytes | None = None,
        chain: list[Rotation] | None = None,
    ):
        self.identity = identity
        self.chain = chain or []
        self.expected = expected_peer_id
        self.nonce = nonce or os.urandom(NONCE_BYTES)
        self.result: HandshakeResult | None = None

    def hello(self) -> bytes:
        return encode(
            {
                "hs": "hello",
                "proto": PROTOCOL,
                "pub": self.identity.public_key,
                "nonce": self.nonce,
                "to": self.expected,
                "rot": [r.to_wire() for r in self.chain],
            }
        )

    def on_challenge(self, frame: bytes) -> bytes:
        msg = _message(frame, "challenge")
        _check_proto(msg)
        pub_s = _bytes(msg, "pub", 32)
        nonce_s = _bytes(msg, "nonce", NONCE_BYTES)
        sig_s = _bytes(msg, "sig", 64)
        got = peer_id_from_public_key(pub_s)
        former = aliases(msg.get("rot"), pub_s)
        if got != self.expected and self.expected not in former:
            raise PeerMismatch(f"expected peer {self.expected}, the server is {got}")
        t = _Transcript(self.nonce, nonce_s, self.identity.public_key, pub_s, self.expected)
        try:
            verify(pub_s, sig_s, t.signed("server"))
        except SignatureError:
            raise HandshakeError("server's handshake signature does not verify") from None
        self.result = HandshakeResult(got, pub_s, t.channel(), tuple(former))
        return encode({"hs": "auth", "sig": self.identity.sign(t.signed("client"))})


class ServerHandshake:
    """The side that listens; it learns who the client is."""

    def __init__(
        self, identity: Identity, nonce: bytes | None = None, chain: list[Rotation] | None = None
    ):
        self.identity = identity
        self.nonce = nonce or os.urandom(NONCE_BYTES)
        self.chain = chain or []
        self._names = {identity.peer_id} | {peer_id_from_public_key(r.old) for r in self.chain}
        self._transcript: _Transcript | None = None
        self._client_aliases: tuple[str, ...] = ()

    def on_hello(self, frame: bytes) -> bytes:
        msg = _message(frame, "hello")
        _check_proto(msg)
        pub_c = _bytes(msg, "pub", 32)
        nonce_c = _bytes(msg, "nonce", NONCE_BYTES)
        to = msg.get("to")
        if not isinstance(to, str) or to not in self._names:
            raise PeerMismatch(
                f"client wants peer {text.shown(to)}, this node is {self.identity.peer_id}"
            )
        self._client_aliases = tuple(aliases(msg.get("rot"), pub_c))
        self._transcript = _Transcript(nonce_c, self.nonce, pub_c, self.identity.public_key, to)
        return encode(
            {
                "hs": "challenge",
                "proto": PROTOCOL,
                "pub": self.identity.public_key,
                "nonce": self.nonce,
                "sig": self.identity.sign(self._transcript.signed("server")),
                "rot": [r.to_wire() for r in self.chain],
            }
        )

    def on_auth(self, frame: bytes) -> HandshakeResult:
        if self._transcript is None:
            raise HandshakeError("auth before hello")
        msg = _message(frame, "auth")
        sig_c = _bytes(msg, "sig", 64)
        t = self._transcript
        try:
            verify(t.pub_c, sig_c, t.signed("client"))
        except SignatureError:
            raise HandshakeError(
                "client's handshake signature does not verify: it does not "
                "hold the key it presented"
            ) from None
        return HandshakeResult(
            peer_id_from_public_key(t.pub_c), t.pub_c, t.channel(), self._client_aliases
        )
