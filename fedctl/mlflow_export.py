"""`fedctl export mlflow`: one session as one MLflow run, written through MLflow's own client.

What goes where (docs/operations.md, "Experiment tracking"):

* **params**: the session's spec flattened to dotted keys (``training.lr``,
  ``aggregation.strategy``); text as it is, every other value as JSON (``10``, ``0.05``,
  ``true``, ``[128, 128]``). A value over MLflow's length limit is cut (the whole spec is
  also the artifact ``fednode/spec.json``) and named in the result's ``truncated``.
* **metrics**, with step = the round number, one point per completed round: ``accuracy``,
  ``loss``, the task's other metrics by name (``roc_auc``, ``mae``, ``r2``), the
  participants' own evaluation as ``participant_<name>``, ``participants``, ``duration_s``,
  ``bytes_up``, ``bytes_up_raw``, ``bytes_down``, ``bytes_down_raw``,
  ``compression_ratio_up``, ``compression_ratio_down`` and ``rolled_back`` (1 when the
  round's model was later rolled back); at step = the rounds completed, the session's
  ``final_<metric>``, ``final_loss``, ``session_duration_s``, ``session_bytes_up``,
  ``session_bytes_down``, ``session_dropped``, ``session_participants`` and
  ``session_health_score``.
* **artifacts**: ``model/model.safetensors`` (the session's model, its bytes checked against
  its CID before they are logged), ``fednode/spec.json`` and ``fednode/report.json`` (the
  data of `fedctl report`).
* **tags**: ``fednode.session_id``, ``fednode.model_cid``, ``fednode.status``,
  ``fednode.strategy``, ``fednode.codec``, ``fednode.source`` (``coordinator`` or
  ``ledger``), ``fednode.coordinator`` (its peer ID, when known), ``fednode.version``.

MLflow is an optional extra (``pip install 'fednode[mlflow]'``: mlflow-skinny, with
SQLAlchemy and Alembic for ``sqlite:`` stores), imported only here and only when the command
runs. fedctl turns MLflow's usage telemetry off unless ``MLFLOW_DISABLE_TELEMETRY`` is set.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from protocol.errors import FednodeError, UsageError
from protocol.lifecycle import is_terminal

EXTRA_HINT = "install the extra: pip install 'fednode[mlflow]'"
# MLflow's own limits (mlflow.utils.validation): a param's value, and entries per log_batch
MAX_PARAM_VALUE = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
# session IDs are "s-" and hex; anything else would end up inside an MLflow filter string
SESSION_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")

# Per round: the metric's name in MLflow and its key in a history row of the summary
ROUND_FIGURES = (
    ("participants", "participants"),
    ("duration_s", "duration_s"),
    ("bytes_up", "up_bytes"),
    ("bytes_up_raw", "up_raw"),
    ("bytes_down", "down_bytes"),
    ("bytes_down_raw", "down_raw"),
    ("compression_ratio_up", "up_ratio"),
    ("compression_ratio_down", "down_ratio"),
)
SESSION_FIGURES = (
    ("session_duration_s", "duration_s"),
    ("session_bytes_up", "bytes_up"),
    ("session_bytes_down", "bytes_down"),
    ("session_dropped", "dropped"),
    ("session_participants", "participants"),
)


def check_session_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise UsageError(f"{session_id!r} is not a session ID", hint="see `fedctl session list`")
    return session_id


def flatten_spec(spec: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """The spec as MLflow params: dotted keys; text as is, anything else as JSON."""
    out: dict[str, str] = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_spec(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def _number(value: Any) -> float | None:
    """A figure MLflow can plot: a finite number (bools and None are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def round_metrics(report: Mapping[str, Any]) -> Iterator[tuple[str, float, int]]:
    """(name, value, step) of every per-round and session figure (see the module's text)."""
    summary = report["session"]
    for row in summary.get("history") or []:
        step = int(row["round"])
        figures: dict[str, Any] = {"accuracy": row.get("accuracy"), "loss": row.get("loss")}
        for name, value in (row.get("metrics") or {}).items():
            figures.setdefault(name, value)
        for name, value in (row.get("participant_metrics") or {}).items():
            figures[f"participant_{name}"] = value
        for name, key in ROUND_FIGURES:
            figures[name] = row.get(key)
        figures["rolled_back"] = 1 if row.get("rolled_back") else 0
        for name, value in figures.items():
            number = _number(value)
            if number is not None:
                yield name, number, step
    last = int(summary.get("rounds_completed") or 0)
    finals: dict[str, Any] = {"final_accuracy": summary.get("final_accuracy")}
    for name, value in (summary.get("final_metrics") or {}).items():
        finals.setdefault(f"final_{name}", value)
    finals["final_loss"] = summary.get("final_loss")
    for name, key in SESSION_FIGURES:
        finals[name] = summary.get(key)
    quality = report.get("quality") or []
    finals["session_health_score"] = quality[-1].get("health_score") if quality else None
    for name, value in finals.items():
        number = _number(value)
        if number is not None:
            yield name, number, last


def _version() -> str:
    try:
        return importlib.metadata.version("fednode")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return ""


def _mlflow() -> Any:
    """The mlflow package, or MISSING_EXTRA. Telemetry off unless the user chose."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError as exc:
        raise FednodeError(
            f"MLflow is not installed ({exc})", code="MISSING_EXTRA", hint=EXTRA_HINT
        ) from None
    return mlflow


def _failed(exc: Exception, uri: str) -> FednodeError:
    text = " ".join(str(exc).split())[:600]
    return FednodeError(
        f"MLflow refused the export to {uri}: {text}",
        code="MLFLOW_FAILED",
        hint="check --tracking-uri: http(s)://HOST:PORT of an MLflow server, sqlite:///PATH "
        "(the fednode[mlflow] extra has what it needs), or file:PATH (MLflow 3 wants "
        "MLFLOW_ALLOW_FILE_STORE=true for it)",
    )


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def export_run(
    report: Mapping[str, Any],
    model: bytes | None,
    *,
    tracking_uri: str,
    experiment: str,
    artifact_location: str = "",
    source: str,
    coordinator: str = "",
) -> dict[str, Any]:
    """Write ``report`` (the data of `fedctl report`, with its ``spec``) and ``model`` (the
    session's model, checked against its CID by the caller) as one new run in
    ``experiment``; refuses a session not ended, or one the experiment holds already."""
    summary = report["session"]
    session_id = check_session_id(str(summary["session_id"]))
    if not is_terminal(summary["status"]):
        raise FednodeError(
            f"session {session_id} is {summary['status']}: export it once it has ended",
            code="BAD_STATE",
            hint=f"fedctl session watch {session_id}",
        )
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    spec = report.get("spec") or {}
    params = flatten_spec(spec)
    truncated = sorted(k for k, v in params.items() if len(v) > MAX_PARAM_VALUE)
    for key in truncated:
        params[key] = params[key][: MAX_PARAM_VALUE - 1] + "…"
    now_ms = int(time.time() * 1000)
    metrics = [Metric(n, v, now_ms, s) for n, v, s in round_metrics(report)]
    tags = {
        "fednode.session_id": session_id,
        "fednode.model_cid": str(summary.get("model_cid") or ""),
        "fednode.status": str(summary["status"]),
        "fednode.strategy": str(summary.get("strategy") or ""),
        "fednode.codec": str((summary.get("compression") or {}).get("codec") or ""),
        "fednode.source": source,
        "fednode.coordinator": coordinator,
        "fednode.version": _version(),
    }
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            experiment_id = client.create_experiment(
                experiment, artifact_location=artifact_location or None
            )
        earlier = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`fednode.session_id` = '{session_id}'",
            max_results=1,
        )
        if earlier:
            raise FednodeError(
                f"experiment {experiment!r} holds session {session_id} already (run "
                f"{earlier[0].info.run_id})",
                code="ALREADY_EXPORTED",
                hint="delete that run in MLflow, or pass another --experiment",
            )
        run = client.create_run(experiment_id, run_name=str(report.get("name") or session_id))
        run_id = run.info.run_id
        try:
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            for chunk in _batches([Param(k, v) for k, v in params.items()], PARAMS_PER_BATCH):
                client.log_batch(run_id, params=chunk)
            for chunk in _batches(metrics, METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=chunk)
            artifacts = _log_artifacts(client, run_id, report, spec, model)
            client.set_terminated(run_id, RUN_STATUS.get(str(summary["status"]), "FINISHED"))
        except BaseException:
            client.set_terminated(run_id, "FAILED")  # never a run left RUNNING
            raise
    except MlflowException as exc:
        raise _failed(exc, tracking_uri) from None
    return {
        "session_id": session_id,
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "experiment_id": experiment_id,
        "run_id": run_id,
        "params": len(params),
        "truncated": truncated,
        "metrics": len(metrics),
        "rounds": len(summary.get("history") or []),
        "artifacts": artifacts,
        "model_cid": tags["fednode.model_cid"] or None,
    }


def _log_artifacts(
    client: Any,
    run_id: str,
    report: Mapping[str, Any],
    spec: Mapping[str, Any],
    model: bytes | None,
) -> list[str]:
    logged = []
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / "fednode"
        folder.mkdir()
        (folder / "spec.json").write_text(json.dumps(spec, indent=2, sort_keys=True))
        (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
        client.log_artifacts(run_id, str(folder), artifact_path="fednode")
        logged += ["fednode/spec.json", "fednode/report.json"]
        if model is not None:
            path = Path(work) / "model.safetensors"
            path.write_bytes(model)
            client.log_artifact(run_id, str(path), artifact_path="model")
            logged.append("model/model.safetensors")
    return logged
