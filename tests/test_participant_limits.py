"""A participant's own limits and the end of every task, in process (no sockets).

A fake connection stands in for the coordinator: ``_do_round`` gets a real RoundStart, a real
ledger and content store, real data and real training; what it sends is recorded.
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from fednode import participant as P
from fednode import training, weights
from fednode.cli import parse_size
from fednode.data import Dataset, parse_dataset_spec
from fednode.ledger import Ledger
from fednode.session import model_spec
from fednode.store import BlockStore
from protocol import messages, modelspec, secagg, spec
from protocol.errors import FednodeError
from protocol.identity import Identity

SESSION = "s-limits"
COORD = Identity.generate()


class FakeConn:
    """What _do_round needs of a Connection: the coordinator's peer ID and send(). Given
    the node, it grants each ``upload_ready`` at once (kept in ``asked``, not ``sent``), as
    a coordinator with a free upload slot does."""

    peer_id = COORD.peer_id

    def __init__(self, node: P.Participant | None = None) -> None:
        self.node = node
        self.sent: list[messages.Message] = []
        self.asked: list[messages.UploadReady] = []

    async def send(self, msg: messages.Message, session: str = "") -> int:
        assert session == SESSION
        if isinstance(msg, messages.UploadReady):
            assert self.node is not None, "no coordinator here to grant an upload"
            self.asked.append(msg)
            self.node._grants[(session, msg.round)].set_result(None)
        else:
            self.sent.append(msg)
        return 100


def make_spec(**model: Any) -> dict[str, Any]:
    training_ = model.pop("training", {})
    return spec.validate(
        {
            "min_participants": 1,
            "model": {"hidden": [16]} | model,
            "training": {"local_epochs": 1} | training_,
        }
    )


@pytest.fixture
def node(tmp_path: Path) -> P.Participant:
    ledger = Ledger(tmp_path / "ledger.db")
    p = P.Participant(
        Identity.generate(),
        ledger,
        BlockStore(tmp_path / "store"),
        url="ws://127.0.0.1:1",
        coordinator_id=COORD.peer_id,
        dataset=parse_dataset_spec("digits:0/3"),
        limits=P.Limits(max_params=100_000, max_memory=2**30, max_train_s=600.0),
    )
    p.num_examples = 479
    yield p
    ledger.close()


def round_start(node: P.Participant, s: dict[str, Any], **kw: Any) -> messages.RoundStart:
    """A round_start whose model is in the node's store (so _fetch finds it there)."""
    cid = node.store.put(weights.to_bytes(training.init_weights(model_spec(s), 0)), pin=False)
    return messages.RoundStart(
        round=kw.pop("round", 1), model_cid=cid, spec=s, deadline_s=kw.pop("deadline_s", 60.0), **kw
    )


def only_task_error(conn: FakeConn) -> messages.TaskError:
    assert len(conn.sent) == 1, conn.sent
    (msg,) = conn.sent
    assert isinstance(msg, messages.TaskError), msg
    return msg


def task_row(node: P.Participant) -> dict[str, Any]:
    (row,) = node.ledger.tasks(SESSION)
    return row


async def test_a_normal_round_still_sends_its_update(node: P.Participant) -> None:
    conn = FakeConn(node)
    await node._do_round(conn, SESSION, round_start(node, make_spec()))
    assert [m.TYPE for m in conn.sent] == ["update"]
    (update,), (asked,) = conn.sent, conn.asked  # it asked to send exactly what it sent
    assert isinstance(update, messages.Update) and asked.bytes == len(update.data) > 0
    assert asked.round == update.round == 1
    row = task_row(node)
    assert row["status"] == "done" and row["samples"] == 479 and row["error"] is None


async def test_the_probe_spec_is_declined_before_anything_is_allocated(tmp_path: Path) -> None:
    """hidden = [65536, 65536] (4.3e9 parameters) made a participant build a 17 GB torch
    model on round_start. An honest coordinator refuses that spec now; a hostile one sends it
    unvalidated, and the participant's own validation declines it by arithmetic (no such
    model fits a frame): nothing fetched, nothing allocated, both ledgers told."""
    ledger = Ledger(tmp_path / "ledger.db")
    node = P.Participant(
        Identity.generate(),
        ledger,
        BlockStore(tmp_path / "store"),
        url="ws://127.0.0.1:1",
        coordinator_id=COORD.peer_id,
        dataset=parse_dataset_spec("digits:0/3"),
    )
    node.num_examples = 479
    assert node.limits.max_params < 4_299_948_042  # true on any machine under ~400 GB of RAM
    s = make_spec()
    s["model"]["hidden"] = [65536, 65536]  # what a hostile coordinator sends, unvalidated
    task = messages.RoundStart(round=1, model_cid="bafkreinotfetched", spec=s, deadline_s=60.0)
    conn = FakeConn()
    rss0 = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
        await node._do_round(conn, SESSION, task)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = psutil.Process().memory_info().rss - rss0
    err = only_task_error(conn)  # no fetch: declined before anything was asked for
    assert err.code == "SPEC_INVALID" and err.round == 1
    assert "4,299,948,042 parameters" in err.message
    row = task_row(node)
    assert row["status"] == "declined" and row["error"].startswith("SPEC_INVALID: ")
    kinds = [e["kind"] for e in ledger.events(SESSION)]
    assert "task_declined" in kinds
    assert peak < 1024 * 1024, peak  # Python allocations (tracemalloc): under 1 MiB
    assert grown < 50 * 2**20, grown  # the process (RSS, torch included): under 50 MiB
    ledger.close()


async def test_memory_beyond_the_limit_is_declined(node: P.Participant) -> None:
    node.limits = P.Limits(max_params=10**9, max_memory=2**20, max_train_s=600.0)
    s = make_spec(hidden=[512], training={"optimizer": "adam"})
    need = modelspec.training_memory(model_spec(s), s["training"], 479)
    conn = FakeConn()
    await node._do_round(conn, SESSION, round_start(node, s))
    err = only_task_error(conn)
    assert err.code == "LIMIT_MEMORY"
    assert f"{need:,} bytes" in err.message and "limit of 1.0 MiB (--max-memory)" in err.message
    assert task_row(node)["status"] == "declined"


async def test_a_secure_round_beyond_a_limit_is_declined_before_its_keys(
    node: P.Participant,
) -> None:
    node.limits = P.Limits(max_params=100, max_memory=2**30, max_train_s=600.0)
    conn = FakeConn()
    s = make_spec()
    task = round_start(node, s, secagg={"not": "parsed: declined first"})
    await node._do_round(conn, SESSION, task)
    assert only_task_error(conn).code == "LIMIT_PARAMS"  # no secagg_keys went out
    row = task_row(node)
    assert row["status"] == "declined" and row["secure"] is True


async def test_nan_training_sends_a_task_error_not_an_update(
    node: P.Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = node._load_data

    def poisoned(data_spec: dict[str, Any], schema: Any = None) -> Dataset:
        d = real(data_spec, schema)
        x = d.x.astype(np.float32).copy()
        x[:, 0] = np.nan
        return Dataset(x, d.y)

    monkeypatch.setattr(node, "_load_data", poisoned)
    conn = FakeConn()
    await node._do_round(conn, SESSION, round_start(node, make_spec()))
    err = only_task_error(conn)
    assert err.code == "NON_FINITE_UPDATE" and "nan" in err.message
    row = task_row(node)
    assert row["status"] == "failed" and row["error"].startswith("NON_FINITE_UPDATE")


async def test_max_train_seconds_cancels_training(node: P.Participant) -> None:
    node.limits = P.Limits(max_params=100_000, max_memory=2**30, max_train_s=1e-6)
    conn = FakeConn()
    s = make_spec(training={"local_epochs": 1000})
    await node._do_round(conn, SESSION, round_start(node, s))
    err = only_task_error(conn)
    assert err.code == "TRAIN_DEADLINE"
    assert "of 1000 epochs" in err.message and "--max-train-seconds 1e-06" in err.message
    assert task_row(node)["status"] == "failed"


async def test_the_round_deadline_cancels_training(node: P.Participant) -> None:
    conn = FakeConn()
    s = make_spec(training={"local_epochs": 1000})
    # round_start arrived 100 s ago, for a round of 60 s: no time left to train
    task = round_start(node, s, deadline_s=60.0)
    await node._do_round(conn, SESSION, task, arrived=time.monotonic() - 100.0)
    err = only_task_error(conn)
    assert err.code == "TRAIN_DEADLINE" and "round's deadline" in err.message
    assert "after 0 of 1000 epochs (0 steps" in err.message


async def test_an_unexpected_error_still_ends_the_task(
    node: P.Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torch RuntimeError (or MemoryError, or a bug) used to leave the task `running`
    forever, with nothing logged and nothing sent."""

    def boom(*_a: Any, **_k: Any) -> training.TrainResult:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: " + "x" * 5000)

    monkeypatch.setattr(training, "train", boom)
    conn = FakeConn()
    await node._do_round(conn, SESSION, round_start(node, make_spec()))
    err = only_task_error(conn)
    assert err.code == "INTERNAL" and err.message.startswith("RuntimeError: DefaultCPUAllocator")
    assert len(err.message) <= P.MAX_ERROR_CHARS
    row = task_row(node)
    assert row["status"] == "failed" and row["error"].startswith("INTERNAL: RuntimeError")


async def test_cancelling_the_task_stops_the_training_thread(
    node: P.Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection lost or node stopping: the asyncio task is cancelled, and the worker thread
    (which cannot be killed) is told to stop, and does, within a batch."""
    began, ended = threading.Event(), threading.Event()
    outcome: list[BaseException] = []
    real = training.train

    def watched(*a: Any, **k: Any) -> training.TrainResult:
        began.set()
        try:
            return real(*a, **k)
        except BaseException as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    monkeypatch.setattr(training, "train", watched)
    conn = FakeConn()
    s = make_spec(training={"local_epochs": 1000})  # minutes of training if not stopped
    task = asyncio.create_task(node._do_round(conn, SESSION, round_start(node, s)))
    assert await asyncio.to_thread(began.wait, 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(ended.wait, 60)
    assert len(outcome) == 1 and isinstance(outcome[0], training.TrainingStopped)
    assert outcome[0].code == "TRAIN_CANCELLED"
    row = task_row(node)
    assert row["status"] == "failed" and "cancelled" in row["error"]
    assert conn.sent == []  # nothing to tell: the connection is going away


def test_default_limits_follow_the_machine() -> None:
    lim = P.Limits.for_machine()
    total = psutil.virtual_memory().total
    assert lim.max_memory == total // 2
    assert lim.max_params == lim.max_memory // 48
    assert lim.max_train_s == 3600.0
    # an explicit memory budget moves the parameter default with it
    assert P.Limits.for_machine(max_memory=48_000).max_params == 1000
    assert P.Limits.for_machine(max_params=7).max_params == 7


def test_parse_size() -> None:
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("512M") == 512 * 2**20
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("64k") == 65536
    assert parse_size("1048576") == 2**20
    for bad in ("", "4X", "-1G", "G", "0"):
        with pytest.raises(FednodeError) as info:
            parse_size(bad)
        assert info.value.code == "USAGE"


def secure_task(node: P.Participant, s: dict[str, Any]) -> messages.RoundStart:
    wire = secagg.params_to_wire(secagg.Params(round_tag=b"t", graph_seed=b"\0" * 32))
    wire |= {"weight": 479, "max_update_norm": 10.0}  # what the coordinator assigns
    return round_start(node, spec.validate(s | {"aggregation": {"secure": True}}), secagg=wire)


async def test_a_secure_round_stops_training_at_its_deadline(node: P.Participant) -> None:
    """The secure path: keys go out, and training past --max-train-seconds ends the task
    with TRAIN_DEADLINE at once, without waiting for the coordinator's roster."""
    node.limits = P.Limits(max_params=100_000, max_memory=2**30, max_train_s=1e-6)
    conn = FakeConn()
    await node._do_round(
        conn, SESSION, secure_task(node, make_spec(training={"local_epochs": 1000}))
    )
    assert [m.TYPE for m in conn.sent] == ["secagg_keys", "task_error"]
    err = conn.sent[-1]
    assert isinstance(err, messages.TaskError) and err.code == "TRAIN_DEADLINE"
    row = task_row(node)
    assert row["status"] == "failed" and row["secure"] is True


async def test_a_secure_round_sends_no_non_finite_update(
    node: P.Participant, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverged(*_a: Any, **_k: Any) -> training.TrainResult:
        raise training.NonFiniteUpdate("the training loss became nan at epoch 1 of 1, step 3")

    monkeypatch.setattr(training, "train", diverged)
    conn = FakeConn()
    await node._do_round(conn, SESSION, secure_task(node, make_spec()))
    assert [m.TYPE for m in conn.sent] == ["secagg_keys", "task_error"]
    assert conn.sent[-1].code == "NON_FINITE_UPDATE"  # type: ignore[attr-defined]
    assert task_row(node)["status"] == "failed"
