"""Identity: the libp2p spec vector, key files, peer ID parsing."""

from __future__ import annotations

import os
import stat

import pytest

from protocol.errors import IdentityError, SignatureError
from protocol.identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify

# libp2p/specs peer-ids/peer-ids.md, "Test vectors", Ed25519: the protobuf private key,
# its protobuf public key, and the peer ID that libp2p derives from it.
SPEC_PRIVATE = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC_PROTOBUF = bytes.fromhex(
    "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_spec_vector() -> None:
    ident = Identity.from_protobuf(SPEC_PRIVATE)
    assert b"\x08\x01\x12\x20" + ident.public_key == SPEC_PUBLIC_PROTOBUF
    assert ident.peer_id == SPEC_PEER_ID
    assert ident.to_protobuf() == SPEC_PRIVATE
    assert public_key_from_peer_id(SPEC_PEER_ID) == ident.public_key


def test_generated_ids_are_ed25519_peer_ids() -> None:
    ident = Identity.generate()
    assert ident.peer_id.startswith("12D3KooW")
    assert peer_id_from_public_key(public_key_from_peer_id(ident.peer_id)) == ident.peer_id


def test_sign_verify_and_tamper() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"round 3")
    verify(ident.public_key, sig, b"round 3")
    with pytest.raises(SignatureError):
        verify(ident.public_key, sig, b"round 4")
    with pytest.raises(SignatureError):
        verify(Identity.generate().public_key, sig, b"round 3")


def test_key_file_is_0600_and_roundtrips(tmp_path) -> None:
    path = tmp_path / "k" / "identity.key"
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path).peer_id == ident.peer_id
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)


def test_world_readable_key_refused(tmp_path) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="readable by others") as exc:
        Identity.load(path)
    assert "chmod 600" in exc.value.hint


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
        "12D3KooW0000",
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pqq",
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p0",
    ],
)
def test_bad_peer_ids(bad: str) -> None:
    with pytest.raises(IdentityError):
        public_key_from_peer_id(bad)


def test_corrupt_key_file(tmp_path) -> None:
    blob = bytearray(Identity.generate().to_protobuf())
    blob[-1] ^= 1  # public half no longer matches the seed
    with pytest.raises(IdentityError, match="corrupt"):
        Identity.from_protobuf(bytes(blob))
