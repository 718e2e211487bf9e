"""The data schema end to end: real processes on 127.0.0.1, participants on their own CSV files.

Two participants hold CSV files with text labels in a named label column (not the last); a
third holds the same layout with another class set. The session's [data] schema names the
label column, the feature columns and the classes: the two train (checked at start with
`fednode run --spec`, and at each task), the third registers (it was started without the
spec) and declines every task with SCHEMA_MISMATCH naming the class it does not know, in its
own ledger and in the coordinator's, while the session completes with the other two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fednode.home import NodeHome
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, online, rows, until

pytestmark = pytest.mark.timeout(120)

CLASSES = ["setosa", "versicolor", "virginica"]


def write_csv(path: Path, classes: list[str], seed: int, n: int = 90) -> None:
    """Three separable clusters in four features; the label column second of five."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(size=(n, 4)) + 3.0 * np.eye(3, 4)[y]
    frame = pd.DataFrame(x.round(4), columns=["a", "b", "c", "d"])
    frame.insert(1, "species", [classes[k] for k in y])
    frame.to_csv(path, index=False)


async def test_participants_share_a_schema_and_a_mismatch_is_declined(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        for k, classes in enumerate([CLASSES, CLASSES, ["setosa", "versicolor", "daisy"]]):
            write_csv(tmp_path / f"p{k}.csv", classes, seed=k)
        write_csv(tmp_path / "eval.csv", CLASSES, seed=9, n=60)
        ids = future_ids(c, 3)
        spec = tmp_path / "iris.json"
        spec.write_text(
            json.dumps(
                {
                    "name": "iris",
                    "rounds": 1,
                    "participants": ids,
                    "min_participants": 2,
                    "data": {
                        "dataset": f"csv:{tmp_path / 'eval.csv'}",
                        "label": "species",
                        "columns": ["a", "b", "c", "d"],
                        "classes": CLASSES,
                    },
                    "model": {"inputs": 4, "classes": 3, "hidden": [16]},
                    "training": {"lr": 0.1},
                }
            )
        )
        sid = create(c, spec)
        ready = {"url": c.url, "peer_id": c.peer_id}
        for k in range(3):
            home = NodeHome(c.root / f"participant-{k}")
            extra = ["--spec", str(spec)] if k < 2 else []  # the third checks at its tasks
            c.procs.start_participant(
                f"participant-{k}", home, ready, f"csv:{tmp_path / f'p{k}.csv'}", *extra
            )
            c.participant_homes.append(home)
        await until(c, online(3))  # all three are selected in round 1
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=90)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 1, status
        assert status["final_accuracy"] > 0.8, status  # the shared mapping trained one model

        odd = ids[2]
        led = c.coordinator_home.ledger_path
        errors = [
            json.loads(r["data"])
            for r in rows(
                led, "SELECT data FROM events WHERE session_id = ? AND kind = ?", sid, "task_error"
            )
        ]
        assert errors and {e["peer_id"] for e in errors} == {odd}, errors
        assert all(e["code"] == "SCHEMA_MISMATCH" for e in errors)
        assert "label value(s) 'daisy' are not in data.classes" in errors[0]["message"]
        accepted = rows(
            led,
            "SELECT participant FROM client_updates WHERE session_id = ? AND status = 'accepted'",
            sid,
        )
        assert {r["participant"] for r in accepted} == set(ids[:2])

        declined = [
            json.loads(r["data"])
            for r in rows(
                c.participant_homes[2].ledger_path,
                "SELECT data FROM events WHERE session_id = ? AND kind = 'task_declined'",
                sid,
            )
        ]
        assert declined and all(d["code"] == "SCHEMA_MISMATCH" for d in declined)
        assert "'daisy'" in declined[0]["message"] and "p2.csv" in declined[0]["message"]
    finally:
        c.procs.stop_all()


def test_a_participant_started_with_the_spec_refuses_mismatching_data(tmp_path: Path) -> None:
    """`fednode run --spec`: the data is checked before registering; a mismatch exits."""
    write_csv(tmp_path / "p.csv", ["setosa", "versicolor", "daisy"], seed=0)
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[data]\nlabel = "species"\nclasses = ["setosa", "versicolor", "virginica"]\n'
        "[model]\ninputs = 4\nclasses = 3\n"
    )
    home = NodeHome(tmp_path / "node")
    home.init()
    proc = cli(
        "fednode", "run", "--role", "participant", "--data-dir", str(home.root),
        "--coordinator", "ws://127.0.0.1:9", "--coordinator-id", home.identity().peer_id,
        "--dataset", f"csv:{tmp_path / 'p.csv'}", "--spec", str(spec), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.stdout, proc.stderr)  # a data error (docs/cli.md)
    assert "SCHEMA_MISMATCH" in proc.stderr and "'daisy'" in proc.stderr
    assert proc.stdout == ""  # it never started serving
