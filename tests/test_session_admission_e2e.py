"""`session start` refuses a session nobody may join, against a real coordinator process.

`fedctl session init` writes `participants = []`, which admits only peers holding an invite
(fednode.coordinator.Coordinator.allowed). A session made from that template unchanged,
with no invite, would wait `wait_participants_s` for nobody and fail; the coordinator
refuses to start it and says how to invite, and starts it once an invite exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cluster, cli, cli_json, start_cluster


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A coordinator alone: starting a session needs no participant online."""
    c = start_cluster(tmp_path_factory.mktemp("admission"), 0)
    try:
        yield c
    finally:
        c.procs.stop_all()


def _start_refused(sid: str, c: Cluster) -> dict[str, str]:
    res = cli("session", "start", sid, "--json", target=c)
    assert res.returncode == 1, (res.stdout, res.stderr)
    return json.loads(res.stdout)["error"]


def test_template_session_starts_only_after_an_invite(coordinator: Cluster, tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    assert cli_json("session", "init", str(spec))["path"] == str(spec)
    assert "participants = []" in spec.read_text()  # the template, unchanged
    sid = cli_json("session", "create", str(spec), target=coordinator)["session_id"]

    err = _start_refused(sid, coordinator)
    assert err["code"] == "BAD_STATE"
    assert "nobody may join" in err["message"] and sid in err["message"]
    assert f"fedctl invite --session {sid}" in err["hint"] and "participants" in err["hint"]
    human = cli("session", "start", sid, target=coordinator)  # the same, for people
    assert human.returncode == 1
    assert "BAD_STATE" in human.stderr and f"fedctl invite --session {sid}" in human.stderr
    assert cli_json("session", "status", sid, target=coordinator)["status"] == "created"

    # an invite that expired before the start does not count: nobody can use it
    cli_json("invite", "--session", sid, "--expires", "0.001", target=coordinator)
    assert _start_refused(sid, coordinator)["code"] == "BAD_STATE"

    invite = cli_json("invite", "--session", sid, "--expires", "10m", target=coordinator)
    assert invite["session_id"] == sid
    started = cli_json("session", "start", sid, target=coordinator)
    assert started == {"ok": True, "session_id": sid, "status": "running"}
    assert cli_json("session", "stop", sid, target=coordinator)["status"] == "stopped"


def test_listed_participants_need_no_invite(coordinator: Cluster, tmp_path: Path) -> None:
    listed = cli_json("fednode", "init", "--data-dir", str(tmp_path / "p"))["peer_id"]
    spec = tmp_path / "listed.json"
    spec.write_text(json.dumps({"rounds": 1, "min_participants": 1, "participants": [listed]}))
    sid = cli_json("session", "create", str(spec), target=coordinator)["session_id"]
    assert cli_json("session", "start", sid, target=coordinator)["status"] == "running"
    assert cli_json("session", "stop", sid, target=coordinator)["status"] == "stopped"
