"""A session's privacy audit, wired: the data and model fednode.audit attacks, from what the
one who runs it can read.

Whoever runs the audit must know who the members are, so it runs where the records are:

* in a local federation (``fedctl demo``, a test cluster, a lab where one operator holds
  every shard) the operator reads every participant's data: ``members`` are the data
  sources the contributors trained on (default: the datasets they registered, when these
  are shards of the embedded digits every node holds), ``nonmembers`` a source never
  trained on (default: the coordinator's evaluation data, ``data.dataset``, for digits the
  held-out test split);
* a participant can audit its own records against the global model: its own ``--dataset``
  as members, held-out rows of the same distribution as non-members;
* the coordinator alone cannot: it holds no participant's records.

The model is the session's current version, as safetensors bytes (checked against the
spec's shapes; never unpickled). Shadow models train with the session's [training] settings
(fednode.audit.shadow_config).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fednode import audit, training, weights
from fednode.data import Dataset, load_eval, load_partition, load_split
from fednode.ledger import Ledger
from fednode.schema import Schema
from protocol import audit as record_shape
from protocol.errors import DataError, StateError, UsageError
from protocol.spec import NO_DATASET

DIGITS = "digits"


def default_members(inputs: dict[str, Any]) -> list[str]:
    """The contributors' registered datasets, if every one is a digits shard (data each
    node holds, so the operator can read it); else UsageError: the operator must say."""
    datasets = sorted(set(inputs["datasets"].values()))
    if not datasets:
        raise StateError(
            f"session {inputs['session_id']} has no accepted update: nobody's records are in "
            "its model, there is nothing to audit"
        )
    if not all(d.startswith(DIGITS + ":") for d in datasets):
        raise UsageError(
            "the session's participants trained on their own data, which this machine "
            "cannot read by default",
            hint="give the members' data with --members SOURCE[,SOURCE…] (e.g. "
            "--members csv:/data/a.csv,csv:/data/b.csv) and non-members with --nonmembers",
        )
    return datasets


def _members(spec: dict[str, Any], sources: list[str]) -> Dataset:
    """The members' training data exactly as each participant cut it (fednode.participant:
    load_split's training part when the participants evaluate, else load_partition)."""
    schema = Schema.from_spec(spec)
    d = spec["data"]
    cut = {k: d[k] for k in ("features", "partition", "seed", "alpha", "labels_per_part")}
    evaluates = spec.get("evaluation", {}).get("on", "coordinator") != "coordinator"
    parts = [
        load_split(s, **cut, schema=schema)[0]
        if evaluates
        else load_partition(s, **cut, schema=schema)
        for s in sources
    ]
    return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def _nonmembers(spec: dict[str, Any], source: str) -> Dataset:
    d = spec["data"]
    data = load_eval(source, features=d["features"], seed=d["seed"], schema=Schema.from_spec(spec))
    if data is None:
        raise UsageError(
            f"--nonmembers {source!r} holds no data",
            hint="give held-out data of the same distribution, e.g. --nonmembers digits",
        )
    return data


def run_audit(
    inputs: dict[str, Any],
    model: bytes,
    *,
    members: list[str] | None = None,
    nonmembers: str = "",
    shadows: int = audit.DEFAULT_SHADOWS,
    max_eval: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Audit the session of ``inputs`` (admin ``audit.inputs``, or reporting.audit_inputs
    offline) whose model is ``model``: the record to keep (protocol.audit.check_record)."""
    spec = inputs["spec"]
    audit.check_model(spec["model"])
    if not inputs.get("model_cid"):
        raise StateError(f"session {inputs['session_id']} has no model yet")
    members = members or default_members(inputs)
    if not nonmembers:
        nonmembers = spec["data"]["dataset"]
        if nonmembers == NO_DATASET:
            raise UsageError(
                "the coordinator holds no data (data.dataset = none) to serve as non-members",
                hint="give held-out data of the same distribution with --nonmembers SOURCE",
            )
    if any(m.startswith(DIGITS + ":") for m in members) and nonmembers != DIGITS:
        raise DataError(
            f"members are digits shards but --nonmembers is {nonmembers!r}",
            hint="non-members must come from the same distribution: --nonmembers digits",
        )
    final = weights.from_bytes(model, expect=training.expected_shapes(spec["model"]))
    evaluated, outside, pool = audit.audit_sets(
        _members(spec, members), _nonmembers(spec, nonmembers), seed=seed, max_eval=max_eval
    )
    result = audit.audit(
        spec["model"],
        final,
        evaluated,
        outside,
        pool,
        audit.shadow_config(spec),
        shadows=shadows,
        seed=seed,
    )
    out = result.to_dict()
    out.update(
        model_cid=inputs["model_cid"],
        members_data=",".join(members),
        nonmembers_data=nonmembers,
    )
    return record_shape.check_record(out)


def record_offline(ledger: Ledger, session_id: str, record: dict[str, Any]) -> int:
    """Write an audit to a stopped coordinator's ledger (``fedctl audit privacy
    --data-dir``): an ``audit`` event in its hash chain; returns the event's id."""
    ledger.get_session(session_id)  # NotFound for an unknown session
    event = ledger.append_event(
        "audit",
        session_id=session_id,
        data={**record_shape.check_record(record), "by": "offline"},
    )
    return int(event["id"])
