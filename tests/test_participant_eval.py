"""Evaluation on the participants, piece by piece: the wire's bounds on a report, the
held-out split, and the spec's refusal of a coordinator told to evaluate without data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednode.data import Dataset, parse_dataset_spec
from fednode.ledger import Ledger
from fednode.participant import Participant, eval_report
from fednode.store import BlockStore
from fednode.training import init_weights
from protocol import messages
from protocol import spec as specmod
from protocol.errors import DataError, SpecError, ValidationError
from protocol.identity import Identity
from tests.test_data_sources import write_idx

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


def participant(tmp_path: Path, dataset: str) -> Participant:
    return Participant(
        Identity.generate(),
        Ledger(tmp_path / "ledger.db"),
        BlockStore(tmp_path / "store"),
        url="ws://127.0.0.1:1",
        coordinator_id=Identity.generate().peer_id,
        dataset=parse_dataset_spec(dataset),
    )


def image_spec(**evaluation: Any) -> dict[str, Any]:
    return specmod.validate(
        {
            "model": {"kind": "logreg", "inputs": 4, "classes": 3},
            "data": {
                "input_shape": [1, 2, 2],
                "classes": [0, 1, 2],
                "test_fraction": 0.25,
                "features": "none",
            },
            "evaluation": evaluation,
        }
    )


def test_a_participant_evaluates_on_its_sources_held_out_files(tmp_path: Path) -> None:
    """The IDX t10k pair is the test part; without it a seeded test_fraction of the rows,
    the same on every call; not evaluating, everything trains."""
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (40, 2, 2), dtype=np.uint8), np.arange(40, dtype=np.uint8) % 3
    write_idx(tmp_path / "with", "train", x, y, gz=False)
    write_idx(tmp_path / "with", "t10k", x[:7], y[:7], gz=False)
    write_idx(tmp_path / "without", "train", x, y, gz=True)
    evaluating = image_spec(on="participants")

    node = participant(tmp_path / "a", f"idx:{tmp_path / 'with'}")
    train, test = node._local_data(evaluating)
    assert test is not None and (len(train), len(test)) == (40, 7)
    assert np.array_equal(test.x, x[:7].reshape(7, -1)) and test.y.tolist() == y[:7].tolist()

    node = participant(tmp_path / "b", f"idx:{tmp_path / 'without'}")
    train, test = node._local_data(evaluating)
    assert test is not None and (len(train), len(test)) == (30, 10)
    rows = {tuple(r) for r in np.concatenate([train.x, test.x])}
    assert len(rows) == len({tuple(r) for r in x.reshape(40, -1)})  # nothing lost or doubled
    again = participant(tmp_path / "c", f"idx:{tmp_path / 'without'}")._local_data(evaluating)
    assert again[1] is not None and np.array_equal(again[1].x, test.x)  # seeded

    train, test = node._local_data(image_spec(on="coordinator"))
    assert test is None and len(train) == 40


def test_evaluating_without_held_out_rows_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (10, 2, 2), dtype=np.uint8), np.arange(10, dtype=np.uint8) % 3
    write_idx(tmp_path / "d", "train", x, y, gz=False)
    s = image_spec(on="participants")
    s["data"]["test_fraction"] = 0.0
    with pytest.raises(DataError, match="holds out no test rows"):
        participant(tmp_path, f"idx:{tmp_path / 'd'}")._local_data(s)


def test_a_report_is_what_the_wire_accepts() -> None:
    mspec = {"kind": "logreg", "inputs": 2, "hidden": [], "classes": 3}
    report = eval_report(mspec, init_weights(mspec, 0), _data(30))
    assert report["eval_examples"] == 30 and set(report["eval_metrics"]) == {"accuracy"}
    messages.parse("update", {**UPDATE, **report})  # no ValidationError
