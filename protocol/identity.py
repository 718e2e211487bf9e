"""Node identities: Ed25519 keys and libp2p-style peer IDs.

A peer ID is the libp2p one (libp2p/specs, peer-ids/peer-ids.md): the public key is
serialised as the protobuf ``PublicKey {Type = Ed25519 (1), Data = 32 bytes}``; since that
is 36 bytes (<= 42) the multihash is the *identity* multihash of it, and the string is the
base58btc encoding without a multibase prefix, which is why every Ed25519 peer ID starts
with ``12D3KooW``. Because the key is inside the ID, anyone holding a peer ID can check a
signature from it without asking anyone: that is what lets nodes that do not trust each
other authenticate with no certificate authority.

Key files hold the libp2p protobuf ``PrivateKey {Type = Ed25519, Data = seed || public}``
(the layout go-libp2p and kubo use), written with mode 0600; a key file readable by group
or others is refused, as ssh refuses one.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from multiformats import multibase

from protocol.errors import IdentityError, SignatureError

KEY_TYPE_ED25519 = 1
_PUB_PREFIX = bytes([0x08, KEY_TYPE_ED25519, 0x12, 32])  # Type=1, Data: len 32
_PRIV_PREFIX = bytes([0x08, KEY_TYPE_ED25519, 0x12, 64])  # Type=1, Data: len 64
_IDENTITY_MH = bytes([0x00, len(_PUB_PREFIX) + 32])  # identity multihash, 36 bytes
_BASE58 = multibase.get("base58btc")


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# Cached: multiformats' base58 validates types at run time (~1 ms a call), and a node sees
# the same few peers on every message.
@functools.lru_cache(maxsize=4096)
def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer ID of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise IdentityError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    multihash = _IDENTITY_MH + _PUB_PREFIX + public_key
    return _BASE58.encode(multihash)[1:]  # drop the multibase 'z': peer IDs are bare base58


@functools.lru_cache(maxsize=4096)
def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw Ed25519 public key inside a peer ID; IdentityError if it is not one."""
    if not isinstance(peer_id, str) or not peer_id.startswith("12D3KooW"):
        raise IdentityError(
            f"not an Ed25519 peer ID: {peer_id!r}",
            hint="peer IDs look like 12D3KooW…; get one with `fednode id` or `fedctl whoami`",
        )
    try:
        raw = _BASE58.decode("z" + peer_id)
    except Exception as exc:  # multibase raises several types on bad characters
        raise IdentityError(f"peer ID {peer_id!r} is not valid base58: {exc}") from None
    if len(raw) != 38 or raw[:2] != _IDENTITY_MH or raw[2:6] != _PUB_PREFIX:
        raise IdentityError(f"peer ID {peer_id!r} does not hold an Ed25519 public key")
    return raw[6:]


def verify(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Raise SignatureError unless ``signature`` is ``public_key``'s signature of ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise SignatureError("signature does not verify under the sender's key") from None


@dataclass(frozen=True)
class Identity:
    """A node's or operator's key pair."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def public_key(self) -> bytes:
        return _raw_public(self.private_key.public_key())

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def to_protobuf(self) -> bytes:
        """libp2p ``PrivateKey`` protobuf: Ed25519 seed followed by the public key."""
        seed = self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return _PRIV_PREFIX + seed + self.public_key

    @classmethod
    def from_protobuf(cls, blob: bytes) -> Identity:
        if len(blob) != 68 or blob[:4] != _PRIV_PREFIX:
            raise IdentityError("key file is not a libp2p Ed25519 private key (68 bytes)")
        ident = cls.from_seed(blob[4:36])
        if ident.public_key != blob[36:]:
            raise IdentityError("key file is corrupt: its public half does not match the seed")
        return ident

    def save(self, path: Path) -> None:
        """Write the key with mode 0600, refusing to overwrite an existing key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(
                f"a key already exists at {path}", hint="use it, or move it away first"
            ) from None
        with os.fdopen(fd, "wb") as fh:
            fh.write(self.to_protobuf())

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise IdentityError(f"no key at {path}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key {path} is readable by others (mode {stat.S_IMODE(mode):o})",
                hint=f"run `chmod 600 {path}`",
            )
        return cls.from_protobuf(path.read_bytes())

    @classmethod
    def load_or_create(cls, path: Path) -> Identity:
        if path.exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident
