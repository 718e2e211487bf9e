"""A python model end to end: real processes on 127.0.0.1, the model code a package on each
node's PYTHONPATH, allowed with `fednode run --allow-model`.

The coordinator refuses to create a session whose factory it was not allowed, or whose
fingerprint its own code does not build. Three participants are selected; the third's
PYTHONPATH holds another version of the package (a hidden layer twice as wide): it declines
every task with MODEL_MISMATCH naming the tensor, and never trains, while the session
completes with the other two.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli, cli_json, start_cluster
from tests.test_factories import FACTORY, FP, write_package
from tests.test_quality_e2e import create, future_ids, online, rows, spec_file, until

pytestmark = pytest.mark.timeout(120)

MODEL = {
    "kind": "python",
    "factory": FACTORY,
    "args": {"hidden": 8},
    "input_shape": [1, 8, 8],
    "fingerprint": FP,
}


@pytest.mark.slow  # 17 s; fast: tests/test_factories.py (refused before any import, differing
# code named tensor by tensor, a python model priced and trained)
async def test_a_python_model_trains_where_allowed_and_differing_code_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    same = write_package(tmp_path / "same")
    other = write_package(tmp_path / "other", factor=2)
    allow = ("--allow-model", FACTORY)
    # each node process inherits PYTHONPATH as it is when the node starts
    monkeypatch.setenv("PYTHONPATH", str(same))
    c = start_cluster(tmp_path / "fed", 0, *allow)
    try:
        # the coordinator builds the model too: a factory it was not allowed, or a
        # fingerprint its code does not build, is refused at create
        for model, code, words in [
            ({**MODEL, "factory": "netpkg.nets:broken"}, "MODEL_NOT_ALLOWED", "--allow-model"),
            (
                {**MODEL, "args": {"hidden": 4}},
                "MODEL_MISMATCH",
                "tensor '1.weight' has shape [4, 64], expected [8, 64]",
            ),
        ]:
            refused = cli_json(
                "session", "create", str(spec_file(tmp_path, "refused", model=model)), target=c
            )
            assert refused["error"]["code"] == code, refused
            assert words in refused["error"]["message"] + refused["error"]["hint"], refused

        ids = future_ids(c, 3)
        spec = spec_file(
            tmp_path, "python", rounds=2, participants=ids, min_participants=2, model=MODEL
        )
        sid = create(c, spec)
        for k in range(3):
            if k == 2:
                monkeypatch.setenv("PYTHONPATH", str(other))
            c.start_participant(k, 3, *allow)
        await until(c, online(3))  # all three are selected in round 1
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=90)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status
        assert status["final_accuracy"] > 0.5, status  # chance is 0.1

        led = c.coordinator_home.ledger_path
        errors = [
            json.loads(r["data"])
            for r in rows(
                led, "SELECT data FROM events WHERE session_id = ? AND kind = ?", sid, "task_error"
            )
        ]
        assert errors and {e["peer_id"] for e in errors} == {ids[2]}, errors
        assert all(e["code"] == "MODEL_MISMATCH" for e in errors), errors
        assert "tensor '1.weight' has shape [16, 64], expected [8, 64]" in errors[0]["message"]
        accepted = rows(
            led,
            "SELECT DISTINCT participant FROM client_updates WHERE session_id = ? "
            "AND status = 'accepted'",
            sid,
        )
        assert {r["participant"] for r in accepted} == set(ids[:2])

        odd = c.participant_homes[2].ledger_path
        declined = rows(
            odd, "SELECT data FROM events WHERE session_id = ? AND kind = 'task_declined'", sid
        )
        assert declined and all(json.loads(r["data"])["code"] == "MODEL_MISMATCH" for r in declined)
        assert not rows(odd, "SELECT 1 FROM events WHERE kind = 'task_done'")  # never trained
    finally:
        c.procs.stop_all()
