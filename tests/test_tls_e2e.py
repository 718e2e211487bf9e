"""`fednode run --tls`: a whole session over wss:// with identity-bound certificates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.identity import Identity
from tests.conftest import Cluster, cli, cli_json, start_cluster


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(tmp_path_factory.mktemp("tls"), 2, "--tls")
    try:
        yield c
    finally:
        c.procs.stop_all()


def test_session_over_tls(tls_cluster: Cluster, tmp_path: Path) -> None:
    assert tls_cluster.url.startswith("wss://")
    spec = tmp_path / "s.json"
    spec.write_text(
        json.dumps({"rounds": 2, "min_participants": 2, "participants": tls_cluster.peer_ids})
    )
    sid = cli_json("session", "create", str(spec), target=tls_cluster)["session_id"]
    cli_json("session", "start", sid, target=tls_cluster)
    cli("session", "watch", sid, "--json", target=tls_cluster, check=True)
    status = cli_json("session", "status", sid, target=tls_cluster)
    assert status["status"] == "completed" and status["participants"] == 2


def test_tls_checks_the_peer_id_not_a_ca(tls_cluster: Cluster) -> None:
    someone_else = Identity.generate().peer_id
    res = cli(
        "--coordinator",
        tls_cluster.url,
        "--coordinator-id",
        someone_else,
        "--key",
        str(tls_cluster.operator_key),
        "session",
        "list",
        "--json",
    )
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["code"] == "PEER_MISMATCH"


def test_plain_ws_to_a_tls_node_fails_cleanly(tls_cluster: Cluster) -> None:
    plain = tls_cluster.url.replace("wss://", "ws://")
    res = cli(
        "--coordinator",
        plain,
        "--coordinator-id",
        tls_cluster.peer_id,
        "--key",
        str(tls_cluster.operator_key),
        "session",
        "list",
        "--json",
    )
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["code"] in ("UNREACHABLE", "HANDSHAKE_FAILED")
