"""Evaluation on the participants, piece by piece: the wire's bounds on a report, the
held-out split, and the spec's refusal of a coordinator told to evaluate without data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fednode import holdout
from fednode.data import Dataset
from fednode.participant import eval_report, split_for_eval
from fednode.training import init_weights
from protocol import messages
from protocol import spec as specmod
from protocol.errors import DataError, SpecError, ValidationError

UPDATE = {
    "round": 1,
    "base_cid": "bafybase",
    "num_examples": 10,
    "loss": 0.5,
    "train_s": 1.0,
    "update_cid": "bafyupdate",
    "data": b"x",
}
MASKED = {"round": 1, "data": b"x", "loss": 0.5, "train_s": 1.0}


@pytest.mark.parametrize("base", [UPDATE, MASKED], ids=["update", "secagg_masked"])
def test_a_report_within_bounds_is_kept(base: dict[str, Any]) -> None:
    kind = "update" if "base_cid" in base else "secagg_masked"
    msg = messages.parse(
        kind,
        {
            **base,
            "eval_examples": 40,
            "eval_loss": 0.3,
            "eval_metrics": {"accuracy": 0.9, "r2": -3},
        },
    )
    assert (msg.eval_examples, msg.eval_loss) == (40, 0.3)
    assert msg.eval_metrics == {"accuracy": 0.9, "r2": -3.0}
    assert messages.parse(kind, base).eval_examples == 0  # no report: the old message


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"eval_metrics": {"precision": 0.5}}, "unknown metric"),
        ({"eval_metrics": {"accuracy": 1.5}}, "eval_metrics.accuracy"),
        ({"eval_metrics": {"accuracy": float("nan")}}, "eval_metrics.accuracy"),
        ({"eval_metrics": {"roc_auc": -0.1}}, "eval_metrics.roc_auc"),
        ({"eval_metrics": {"mae": -1.0}}, "eval_metrics.mae"),
        ({"eval_metrics": {"accuracy": True}}, "eval_metrics.accuracy"),
        ({"eval_loss": -0.1}, "eval_loss"),
        ({"eval_loss": 1e13}, "eval_loss"),
        ({"eval_loss": None}, "eval_loss"),
        ({"eval_examples": -1}, "eval_examples"),
    ],
)
def test_a_report_out_of_bounds_is_refused(fields: dict[str, Any], says: str) -> None:
    report = {"eval_examples": 40, "eval_loss": 0.3, "eval_metrics": {"accuracy": 0.9}}
    for kind, base in (("update", UPDATE), ("secagg_masked", MASKED)):
        with pytest.raises(ValidationError) as exc:
            messages.parse(kind, {**base, **report, **fields})
        assert says in exc.value.message


def test_figures_of_no_examples_are_refused() -> None:
    with pytest.raises(ValidationError, match="0 examples"):
        messages.parse("update", {**UPDATE, "eval_loss": 0.3})
    with pytest.raises(ValidationError, match="0 examples"):
        messages.parse("update", {**UPDATE, "eval_metrics": {"accuracy": 0.5}})


def test_evaluating_on_a_coordinator_without_data_is_refused() -> None:
    for on in ("coordinator", "both"):
        with pytest.raises(SpecError) as exc:
            specmod.validate({"evaluation": {"on": on}, "data": {"dataset": "none"}})
        assert (
            f'evaluation.on = "{on}"' in exc.value.message and "data.dataset" in exc.value.message
        )
    ok = specmod.validate({"evaluation": {"on": "participants"}, "data": {"dataset": "none"}})
    assert ok["evaluation"]["on"] == "participants"
    assert specmod.defaults()["evaluation"]["on"] == "coordinator"


def _data(n: int) -> Dataset:
    return Dataset(np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n) % 3)


def test_the_held_out_split_is_seeded_disjoint_and_whole() -> None:
    data = _data(50)
    train, test = holdout.split(data, 0.2, seed=7)
    assert (len(train), len(test)) == (40, 10)
    rows = {tuple(r) for r in np.concatenate([train.x, test.x])}
    assert len(rows) == 50  # every example once: nothing lost, nothing in both
    again_train, again_test = holdout.split(data, 0.2, seed=7)
    assert np.array_equal(again_test.x, test.x) and np.array_equal(again_train.y, train.y)
    assert not np.array_equal(holdout.split(data, 0.2, seed=8)[1].x, test.x)
    assert [len(p) for p in holdout.split(_data(2), 0.01, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="cannot hold out"):
        holdout.split(_data(1), 0.2, seed=0)
    with pytest.raises(DataError, match="test_fraction"):
        holdout.split(data, 0.0, seed=0)


def test_a_participant_splits_only_when_it_evaluates() -> None:
    data = _data(50)
    plain = specmod.defaults()
    assert split_for_eval(plain, data) == (data, None)
    evaluating = specmod.validate({"evaluation": {"on": "participants"}})
    train, test = split_for_eval(evaluating, data)
    assert test is not None and len(train) + len(test) == 50


def test_a_report_is_what_the_wire_accepts() -> None:
    mspec = {"kind": "logreg", "inputs": 2, "hidden": [], "classes": 3}
    report = eval_report(mspec, init_weights(mspec, 0), _data(30))
    assert report["eval_examples"] == 30 and set(report["eval_metrics"]) == {"accuracy"}
    messages.parse("update", {**UPDATE, **report})  # no ValidationError
