"""Key rotation: the old key signs the new one, so peers that knew the old ID can follow.

A node that runs `fednode rotate-key` gets a new Ed25519 key; a *rotation statement*
``{old, new, ts, sig}`` (``sig`` by the old key over a domain tag and [old, new, ts]) is
appended to its chain. In the handshake each side presents its chain; a peer that expected
an older ID accepts the newer key if every link verifies, and learns the node's former IDs
(its aliases), so specs and operator lists written with the old ID keep working.

What this does not do: a *stolen* old key can sign a rotation to the thief's key. Rotation
is for routine key hygiene; after a compromise, tell peers the new ID out of band (see
docs/security.md).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from protocol.envelope import encode
from protocol.errors import HandshakeError, SignatureError
from protocol.identity import Identity, peer_id_from_public_key, verify

_DOMAIN = b"fednode/key-rotation/v1\x00"
MAX_CHAIN = 32


@dataclass(frozen=True)
class Rotation:
    old: bytes  # raw public keys
    new: bytes
    ts: float
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "ts": self.ts, "sig": self.sig}


def rotate(old: Identity, new: Identity, ts: float) -> Rotation:
    body = _DOMAIN + encode([old.public_key, new.public_key, ts])
    return Rotation(old.public_key, new.public_key, ts, old.sign(body))


def _from_wire(item: Any) -> Rotation:
    ok = (
        isinstance(item, dict)
        and isinstance(item.get("old"), bytes)
        and isinstance(item.get("new"), bytes)
        and isinstance(item.get("ts"), int | float)
        and isinstance(item.get("sig"), bytes)
    )
    if not ok:
        raise HandshakeError("a key-rotation statement is malformed")
    return Rotation(item["old"], item["new"], float(item["ts"]), item["sig"])


def aliases(chain: Any, current_public_key: bytes) -> list[str]:
    """The former peer IDs a chain proves for ``current_public_key`` (oldest first).

    Every link must be signed by the previous key and the last must end at the current key;
    anything else is a HandshakeError: a chain that does not verify proves nothing.
    """
    if chain in (None, []):
        return []
    if not isinstance(chain, list) or len(chain) > MAX_CHAIN:
        raise HandshakeError(f"a key-rotation chain is a list of at most {MAX_CHAIN} items")
    links = [_from_wire(item) for item in chain]
    for prev, nxt in itertools.pairwise(links):
        if prev.new != nxt.old:
            raise HandshakeError("the key-rotation chain is broken between two links")
    if links[-1].new != current_public_key:
        raise HandshakeError("the key-rotation chain does not end at the presented key")
    out = []
    for link in links:
        try:
            verify(link.old, link.sig, _DOMAIN + encode([link.old, link.new, link.ts]))
        except SignatureError:
            raise HandshakeError("a key-rotation statement's signature does not verify") from None
        out.append(peer_id_from_public_key(link.old))
    return out
