"""The examples' data sources and models end to end: real processes on 127.0.0.1, the data
written by the examples' own make_data.py into tmp_path.

- a CNN declared as layers on MNIST-format IDX files (digits drawn at 28x28, a folder per
  participant with its t10k pair), evaluated on the participants only: the coordinator has
  no data (data.dataset = "none");
- a CSV with a header, text labels and a named label column, and a folder of PNG images per
  class, as two sessions running at once on one coordinator;
- a regression task on a parquet file: the session completes and its loss falls.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedctl.client import AdminClient
from fednode.home import NodeHome
from tests.conftest import Cluster, cli, cli_json, start_cluster
from tests.examples_helpers import EXAMPLES, make_data
from tests.test_quality_e2e import (
    create,
    future_ids,
    online,
    operator,
    rows,
    spec_file,
    until,
)

pytestmark = pytest.mark.timeout(240)


def example_toml(name: str) -> dict[str, Any]:
    """The example's spec as written (not validated: derived fields are left out)."""
    return tomllib.loads((EXAMPLES / name / "spec.toml").read_text())


def start_participants(c: Cluster, datasets: list[str], first: int = 0) -> None:
    """participant-{first+k} on datasets[k] (their peer IDs: future_ids)."""
    ready = {"url": c.url, "peer_id": c.peer_id}
    for k, dataset in enumerate(datasets, start=first):
        home = NodeHome(c.root / f"participant-{k}")
        c.procs.start_participant(f"participant-{k}", home, ready, dataset)
        c.participant_homes.append(home)


def run_session(c: Cluster, sid: str, timeout: float = 180) -> dict[str, Any]:
    assert cli_json("session", "start", sid, target=c)["status"] == "running"
    cli("session", "watch", sid, "--json", check=True, target=c, timeout=timeout)
    return cli_json("session", "status", sid, target=c)


def accepted_updates(c: Cluster, sid: str) -> list[Any]:
    return rows(
        c.coordinator_home.ledger_path,
        "SELECT round, participant, loss, eval_examples, eval_metrics FROM client_updates "
        "WHERE session_id = ? AND status = 'accepted' ORDER BY round",
        sid,
    )


# ------------------------------------------------------------------- a CNN on IDX files


def cnn_on_idx(tmp_path: Path, rounds: int) -> dict[str, Any]:
    """Three participants on IDX folders written by the example's make_data.py, the
    example's spec and CNN, evaluation on the participants only."""
    folders = make_data("mnist-cnn-idx").write_participants(tmp_path / "idx", 3)
    raw = example_toml("mnist-cnn-idx")
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 3)
        spec = spec_file(
            tmp_path,
            "mnist-cnn",
            rounds=rounds,
            participants=ids,
            min_participants=3,
            data=raw["data"],
            model=raw["model"],
            # more local steps than the example's: 479 images each, not MNIST's 6,000
            training={**raw["training"], "local_epochs": 3, "batch_size": 32},
            evaluation=raw["evaluation"],
        )
        sid = create(c, spec)
        start_participants(c, [f"idx:{f}" for f in folders])
        status = run_session(c, sid)
        assert status["status"] == "completed" and status["rounds_completed"] == rounds, status
        assert status["evaluation"] == "participants"
        updates = accepted_updates(c, sid)
        assert len(updates) == 3 * rounds
        # each participant evaluated on its t10k files: 120 images (360 test digits / 3)
        assert {u["eval_examples"] for u in updates} == {120}
        return status
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # 22 s; fast: the example's spec and data (test_examples.py), a CNN over the
# wire (test_layers_e2e), IDX files (test_data_sources), participants evaluating
# (test_participant_eval_e2e)
def test_the_mnist_example_cnn_learns_from_idx_files_evaluated_on_the_participants(
    tmp_path: Path,
) -> None:
    """The example's CNN as declared (421,642 parameters), three participants, five rounds.
    The participants' figures describe the model each round started from, so the final
    accuracy is round 4's model on the 360 held-out digits."""
    status = cnn_on_idx(tmp_path, rounds=5)
    acc = [h["accuracy"] for h in status["history"]]
    assert acc[0] < 0.3, acc  # round 1 reports the initial model: chance is 0.1
    assert status["final_accuracy"] >= 0.95, acc


# ------------------------------------- a CSV table, an image folder and a regression at once


def example_session(tmp_path: Path, name: str, ids: list[str], rounds: int) -> Path:
    raw = example_toml(name)
    fields = raw | {"rounds": rounds, "participants": ids, "min_participants": len(ids)}
    return spec_file(tmp_path, name, **{k: v for k, v in fields.items() if k != "name"})


@pytest.mark.slow  # 17 s; csv: test_schema_e2e, regression: test_round_metrics_e2e
async def test_a_csv_table_an_image_folder_and_a_regression_on_one_coordinator(
    tmp_path: Path,
) -> None:
    """Three sessions at once, two participants each, data as each example's make_data.py
    writes it: CSV files with a header and text labels in a named column (a binary task),
    folders of PNG images per class, parquet files with a numeric target and a split column
    (a regression). Every session is evaluated on its participants only."""
    csvs = make_data("tabular-csv").write_participants(tmp_path / "csv", 2, rows=200)
    imgs = make_data("image-folder").write_participants(tmp_path / "img", 2)
    pqs = make_data("regression").write_participants(tmp_path / "pq", 2, rows=200)
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 6)
        rounds = 3
        sids = {
            name: create(c, example_session(tmp_path, name, ids[k : k + 2], rounds))
            for name, k in (("tabular-csv", 0), ("image-folder", 2), ("regression", 4))
        }
        start_participants(
            c,
            [f"csv:{p}" for p in csvs]
            + [f"images:{p}" for p in imgs]
            + [f"parquet:{p}" for p in pqs],
        )
        await until(c, online(6), timeout=90)
        # the admin channel directly, not a fedctl process per call: three sessions' starts
        # and statuses would cost seconds of Python start-up on two cores
        async with operator(c) as client:
            for sid in sids.values():
                assert (await client.call("session.start", session_id=sid))["status"] == "running"
        status: dict[str, dict[str, Any]] = {}

        async def finished(client: AdminClient) -> bool:
            for name, sid in sids.items():
                status[name] = await client.call("session.status", session_id=sid)
            return all(
                got["status"] in ("completed", "failed", "stopped") for got in status.values()
            )

        await until(c, finished, timeout=150)
        for got in status.values():
            assert got["status"] == "completed" and got["rounds_completed"] == rounds, got
            assert got["evaluation"] == "participants"

        # the table: "low"/"high" in the column "risk" mapped through data.classes; a binary
        # task reports accuracy and ROC AUC on each participant's seeded 20 % (40 of 200 rows)
        updates = accepted_updates(c, sids["tabular-csv"])
        assert len(updates) == 2 * rounds and {u["eval_examples"] for u in updates} == {40}
        assert all(set(json.loads(u["eval_metrics"])) == {"accuracy", "roc_auc"} for u in updates)
        assert status["tabular-csv"]["final_accuracy"] >= 0.8, status["tabular-csv"]["history"]

        # the images: 899 or 898 PNG files per participant, a seeded 20 % held out
        updates = accepted_updates(c, sids["image-folder"])
        assert {u["eval_examples"] for u in updates} == {179}
        acc = [h["accuracy"] for h in status["image-folder"]["history"]]
        assert acc[0] < 0.3 and status["image-folder"]["final_accuracy"] >= 0.7, acc

        # the regression: held out by the split column (40 of 200 rows), MAE and R²; the loss
        # falls, both the participants' training loss and the evaluated one
        updates = accepted_updates(c, sids["regression"])
        assert {u["eval_examples"] for u in updates} == {40}
        assert all(set(json.loads(u["eval_metrics"])) == {"mae", "r2"} for u in updates)
        train_loss = {r: [u["loss"] for u in updates if u["round"] == r] for r in (1, rounds)}
        assert max(train_loss[rounds]) < min(train_loss[1]), train_loss
        loss = [h["loss"] for h in status["regression"]["history"]]
        assert loss == sorted(loss, reverse=True) and loss[-1] < loss[0] / 4, loss
    finally:
        c.procs.stop_all()
