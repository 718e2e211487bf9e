"""`fedctl export mlflow` (fedctl/mlflow_export.py), read back through MLflow's own client.

The fast tests export a stopped coordinator's ledger and store (written by fednode's Ledger
and BlockStore, three rounds with metrics and traffic) with `--data-dir` into a `file:`
store and read the run back with ``mlflow.MlflowClient``: the parameters are the spec's,
each metric has one point per round with the ledger's value, the model artifact's bytes hash
to the model's CID. The slow test does the same over the protocol, from a coordinator that
ran a real federation (two participants, two rounds), into a `sqlite:` store (MLflow's
recommended local store; its first use runs MLflow's Alembic migrations, ~8 s here).
Without MLflow installed (the `fednode[mlflow]` extra) they skip; the command's own error
for a missing MLflow is tested with the import blocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from fednode.home import NodeHome
from fednode.ledger import Ledger
from fednode.store import BlockStore
from protocol import spec as specmod
from protocol.cid import file_cid
from protocol.errors import FednodeError
from protocol.identity import Identity
from tests.conftest import Cluster, cli_json, start_cluster
from tests.test_quality_e2e import future_ids, online, until
from tests.test_rollback import admin, run_to_end

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # this process reads back too
mlflow = pytest.importorskip(
    "mlflow", reason="MLflow is not installed: pip install 'fednode[mlflow]'"
)

from fedctl.mlflow_export import export_run  # noqa: E402  (after the skip)

SID = "s-0123456789ab"
PEERS = [Identity.from_seed(bytes([k]) * 32).peer_id for k in (1, 2)]
ACCURACY = [0.61, 0.78, 0.85]
LOSS = [1.2, 0.7, 0.45]


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """The spec's leaves by dotted path (the test's own walk, not the exporter's)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _as_param(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@pytest.fixture
def stopped(tmp_path: Path) -> NodeHome:
    """A stopped coordinator's directory: a completed 3-round session and its models."""
    home = NodeHome(tmp_path / "coordinator")
    home.init()
    store = BlockStore(home.store_root)
    spec = specmod.validate({"name": "mlf", "rounds": 3, "participants": PEERS})
    models = [
        store.put(save({"w": np.full((64, 10), r, dtype=np.float32)}, metadata={"r": str(r)}))
        for r in range(4)
    ]
    with Ledger(home.ledger_path) as led:
        led.create_session(
            SID, name="mlf", spec=spec, strategy="fedavg", secure_aggregation=False, rounds=3,
            created_at=100.0,
        )  # fmt: skip
        led.update_session(SID, status="running", started_at=100.0)
        led.record_model(
            SID, 0, cid=models[0], parent_cid=None, accuracy=0.1, loss=2.3, size=2650,
            created_at=100.0,
        )  # fmt: skip
        for r in (1, 2, 3):
            led.start_round(SID, r, selected=PEERS, model_cid_in=models[r - 1], started_at=100 + r)
            for k, peer in enumerate(PEERS):
                led.record_update(
                    SID, r, participant=peer, samples=400, loss=LOSS[r - 1] + k / 10,
                    bytes=1000 + 10 * r + k, bytes_raw=2560 + k, down_bytes=900 + r,
                    down_raw=2560, duration_s=0.2, arrival_s=0.3, update_cid=None,
                    received_at=100.5 + r,
                )  # fmt: skip
            led.complete_round(
                SID, r, ended_at=101.0 + r, model_cid=models[r], parent_cid=models[r - 1],
                accuracy=ACCURACY[r - 1], loss=LOSS[r - 1], size=2650, participants=2,
                metrics={"accuracy": ACCURACY[r - 1]},
                participant_metrics={"accuracy": ACCURACY[r - 1] - 0.02},
            )  # fmt: skip
        led.update_session(SID, status="completed", ended_at=110.0)
    return home


def _read_back(uri: str, run_id: str) -> tuple[Any, Any]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


def _check_run(
    client: Any, run: Any, spec: Mapping[str, Any], summary: Mapping[str, Any], tmp: Path
) -> None:
    """The run holds the session: params, one metric point per round, model by CID."""
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: _as_param(v) for k, v in _leaves(spec).items()}
    history = summary["history"]
    rounds = [h["round"] for h in history]
    for name, key in (
        ("accuracy", "accuracy"),
        ("loss", "loss"),
        ("participants", "participants"),
        ("bytes_up", "up_bytes"),
        ("bytes_down", "down_bytes"),
        ("compression_ratio_up", "up_ratio"),
    ):
        points = client.get_metric_history(run.info.run_id, name)
        assert [p.step for p in points] == rounds, name  # one point per round, step = round
        assert [p.value for p in points] == pytest.approx([h[key] for h in history]), name
    (final,) = client.get_metric_history(run.info.run_id, "final_accuracy")
    assert final.value == pytest.approx(summary["final_accuracy"])
    tags = run.data.tags
    assert tags["fednode.session_id"] == summary["session_id"]
    assert tags["fednode.model_cid"] == summary["model_cid"]
    local = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp))
    assert file_cid(Path(local).read_bytes()) == summary["model_cid"]
    spec_file = client.download_artifacts(run.info.run_id, "fednode/spec.json", str(tmp))
    assert json.loads(Path(spec_file).read_text()) == spec


def test_a_stopped_coordinators_session_exports_and_reads_back(
    stopped: NodeHome, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in
    uri = (tmp_path / "mlruns").as_uri()
    out = cli_json(
        "export", "mlflow", SID, "--data-dir", str(stopped.root), "--tracking-uri", uri,
        "--experiment", "fed",
    )  # fmt: skip
    assert out["ok"] and out["rounds"] == 3 and out["truncated"] == [], out
    with Ledger(stopped.ledger_path) as led:
        summary = led.summary(SID)
        spec = led.get_session(SID)["spec"]
    assert summary["history"][0]["up_bytes"] == 1010 + 1011  # the traffic is in the ledger
    client, run = _read_back(uri, out["run_id"])
    assert client.get_experiment(out["experiment_id"]).name == "fed"
    assert run.data.tags["fednode.source"] == "ledger"
    _check_run(client, run, spec, summary, tmp_path)
    assert [p.value for p in client.get_metric_history(out["run_id"], "accuracy")] == ACCURACY
    participant = client.get_metric_history(out["run_id"], "participant_accuracy")
    assert [p.value for p in participant] == pytest.approx([a - 0.02 for a in ACCURACY])

    # the same session again into the same experiment: refused, nothing added
    report = _report(stopped)
    with pytest.raises(FednodeError) as err:
        export_run(report, None, tracking_uri=uri, experiment="fed", source="ledger")
    assert err.value.code == "ALREADY_EXPORTED" and out["run_id"] in err.value.message
    assert len(client.search_runs([out["experiment_id"]])) == 1


def _report(home: NodeHome) -> dict[str, Any]:
    from fednode.reporting import build_report

    with Ledger(home.ledger_path) as led:
        return build_report(led, SID)


def test_a_session_still_running_is_not_exported(stopped: NodeHome, tmp_path: Path) -> None:
    report, db = _report(stopped), tmp_path / "unused.db"
    report["session"]["status"] = "running"
    with pytest.raises(FednodeError) as err:
        export_run(report, None, tracking_uri=f"sqlite:///{db}", experiment="x", source="-")
    assert err.value.code == "BAD_STATE" and "running" in err.value.message
    assert not db.exists()  # refused before MLflow was asked anything


def test_without_mlflow_the_command_names_the_extra(stopped: NodeHome, tmp_path: Path) -> None:
    """MLflow hidden from the import system, as on a machine without the extra."""
    code = (
        "import sys; sys.modules['mlflow'] = None; from fedctl.cli import main; "
        f"sys.argv = ['fedctl', 'export', 'mlflow', '{SID}', '--data-dir', "
        f"'{stopped.root}', '--tracking-uri', 'sqlite:///{tmp_path}/m.db', '--json']; main()"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert got.returncode == 1, got.stdout + got.stderr
    error = json.loads(got.stdout)["error"]
    assert error["code"] == "MISSING_EXTRA" and "fednode[mlflow]" in error["hint"]
    assert not (tmp_path / "m.db").exists()


# --- a real federation, exported over the protocol -------------------------------------


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        yield c
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # ~25 s: four processes and MLflow's sqlite migrations; fast tests above
def test_a_federated_session_exports_from_the_coordinator_into_sqlite(
    fed: Cluster, tmp_path: Path
) -> None:
    ids = future_ids(fed, 2)
    sid = admin(
        fed,
        "session.create",
        spec={"name": "tracked", "rounds": 2, "participants": ids, "min_participants": 2},
    )["session_id"]
    for k in range(2):
        fed.start_participant(k, 2)
    asyncio.run(until(fed, online(2), timeout=120))
    final = run_to_end(fed, sid)
    assert final["status"] == "completed", final

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = cli_json(
        "export", "mlflow", sid, "--tracking-uri", uri,
        "--artifact-location", str(tmp_path / "artifacts"), target=fed,
    )  # fmt: skip
    assert out["ok"] and out["rounds"] == 2, out
    report = cli_json("report", sid, "--format", "json", target=fed)["report"]
    client, run = _read_back(uri, out["run_id"])
    assert run.data.tags["fednode.source"] == "coordinator"
    assert run.data.tags["fednode.coordinator"] == fed.peer_id
    _check_run(client, run, report["spec"], report["session"], tmp_path)
    assert any((tmp_path / "artifacts").rglob("model.safetensors"))  # where it was told
