"""Key rotation: chains verify, peers that knew the old ID follow, forgeries are refused."""

from __future__ import annotations

import stat

import pytest

from fednode.home import NodeHome
from protocol.errors import HandshakeError, PeerMismatch
from protocol.handshake import ClientHandshake, ServerHandshake
from protocol.identity import Identity
from protocol.rotation import aliases, rotate


def _handshake(client: ClientHandshake, server: ServerHandshake):
    auth = client.on_challenge(server.on_hello(client.hello()))
    return client.result, server.on_auth(auth)


def test_chain_of_two_rotations_proves_both_former_ids() -> None:
    a, b, c = Identity.generate(), Identity.generate(), Identity.generate()
    chain = [rotate(a, b, 1.0).to_wire(), rotate(b, c, 2.0).to_wire()]
    assert aliases(chain, c.public_key) == [a.peer_id, b.peer_id]
    with pytest.raises(HandshakeError, match="does not end"):
        aliases(chain, b.public_key)
    with pytest.raises(HandshakeError, match="broken"):
        aliases(chain[::-1], c.public_key)


def test_forged_rotation_is_refused() -> None:
    victim, thief = Identity.generate(), Identity.generate()
    forged = rotate(thief, thief, 1.0).to_wire()
    forged["old"] = victim.public_key  # claims the victim handed over to the thief
    with pytest.raises(HandshakeError, match="does not verify"):
        aliases([forged], thief.public_key)


def test_client_expecting_old_id_follows_a_rotated_server() -> None:
    old, new, client = Identity.generate(), Identity.generate(), Identity.generate()
    server = ServerHandshake(new, chain=[rotate(old, new, 1.0)])
    c_res, _ = _handshake(ClientHandshake(client, old.peer_id), server)
    assert c_res.peer_id == new.peer_id and c_res.aliases == (old.peer_id,)
    # without the chain the same server is an impostor for the old ID
    with pytest.raises(PeerMismatch):
        ServerHandshake(new).on_hello(ClientHandshake(client, old.peer_id).hello())


def test_server_learns_a_rotated_clients_former_id() -> None:
    old, new, server = Identity.generate(), Identity.generate(), Identity.generate()
    client = ClientHandshake(new, server.peer_id, chain=[rotate(old, new, 1.0)])
    _, s_res = _handshake(client, ServerHandshake(server))
    assert s_res.peer_id == new.peer_id and s_res.aliases == (old.peer_id,)


def test_home_rotate_key(tmp_path) -> None:
    home = NodeHome(tmp_path / "n")
    first, _ = home.init()
    old, new = home.rotate_key()
    assert old.peer_id == first.peer_id and home.identity().peer_id == new.peer_id
    assert stat.S_IMODE(home.key_path.stat().st_mode) == 0o600
    retired = tmp_path / "n" / f"identity.key.retired-{old.peer_id}"
    assert Identity.load(retired).peer_id == old.peer_id
    _, newer = home.rotate_key()
    chain = [r.to_wire() for r in home.chain()]
    assert aliases(chain, newer.public_key) == [old.peer_id, new.peer_id]
