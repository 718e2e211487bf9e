"""Local training stops at its deadline or stop flag, and never returns a non-finite update."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from fednode.data import Dataset, load_partition
from fednode.training import (
    NonFiniteUpdate,
    TrainConfig,
    TrainingStopped,
    init_weights,
    train,
)

SPEC = {"kind": "mlp", "inputs": 64, "hidden": [32, 32], "classes": 10}
STEPS_PER_EPOCH = 15  # ceil(479 / 32)


@pytest.fixture(scope="module")
def shard() -> Dataset:
    return load_partition("digits:0/3", features="standardize", partition="iid", seed=0)


def cfg(**kw) -> TrainConfig:
    base = {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "optimizer": "sgd", "momentum": 0.9}
    return TrainConfig(**(base | kw))


def test_a_deadline_in_the_past_stops_before_the_first_step(shard: Dataset) -> None:
    with pytest.raises(TrainingStopped) as info:
        train(SPEC, init_weights(SPEC, 0), shard, cfg(local_epochs=1000), deadline=0.0)
    err = info.value
    assert err.code == "TRAIN_DEADLINE"
    assert "after 0 of 1000 epochs (0 steps" in err.message and "limit" in err.message


def test_a_deadline_passing_mid_training_stops_within_one_batch(
    shard: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that passes the deadline at the 40th batch: training stops there (epoch 3 of
    1000), not at the end of the epoch, nor after the 1000 epochs."""
    import fednode.training as training_mod

    calls = 0

    class Clock:
        """training's view of the time module: monotonic() jumps after 41 readings (one at
        the start, then one per batch)."""

        perf_counter = staticmethod(time.perf_counter)

        @staticmethod
        def monotonic() -> float:
            nonlocal calls
            calls += 1
            return 1000.0 if calls > 41 else 0.0

    monkeypatch.setattr(training_mod, "time", Clock)
    with pytest.raises(TrainingStopped) as info:
        train(SPEC, init_weights(SPEC, 0), shard, cfg(local_epochs=1000), deadline=500.0)
    assert info.value.code == "TRAIN_DEADLINE"
    assert f"after {40 // STEPS_PER_EPOCH} of 1000 epochs (40 steps" in info.value.message
    assert "the limit was 500.00 s" in info.value.message


def test_a_stop_flag_set_from_another_thread_stops_training(shard: Dataset) -> None:
    """Training runs in a worker thread (as in the participant); the main thread waits until
    it has started, sets the flag, and training ends within one batch."""
    started = threading.Event()
    stop = threading.Event()

    class Watched(threading.Event):
        """The stop flag train() polls: says so the first time, then reflects ``stop``."""

        def is_set(self) -> bool:
            started.set()
            return stop.is_set()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            train, SPEC, init_weights(SPEC, 0), shard, cfg(local_epochs=1000), stop=Watched()
        )
        assert started.wait(60)
        stop.set()
        with pytest.raises(TrainingStopped) as info:
            fut.result(timeout=60)
    err = info.value
    assert err.code == "TRAIN_CANCELLED" and "cancelled" in err.message
    steps = int(err.message.split("(")[1].split(" steps")[0])
    assert steps < 1000 * STEPS_PER_EPOCH  # it did not run all the epochs


def test_a_flag_set_after_n_checks_stops_at_step_n(shard: Dataset) -> None:
    class SetByAnotherThreadAt(threading.Event):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.calls, self.n = 0, n

        def is_set(self) -> bool:
            self.calls += 1
            if self.calls == self.n:  # the flag is set by another thread, as on a cancel
                t = threading.Thread(target=self.set)
                t.start()
                t.join()
            return super().is_set()

    with pytest.raises(TrainingStopped) as info:
        train(
            SPEC, init_weights(SPEC, 0), shard, cfg(local_epochs=50), stop=SetByAnotherThreadAt(8)
        )
    assert info.value.code == "TRAIN_CANCELLED"
    assert "after 0 of 50 epochs (7 steps" in info.value.message


def test_without_a_deadline_or_flag_training_is_unchanged(shard: Dataset) -> None:
    w0 = init_weights(SPEC, 0)
    a = train(SPEC, w0, shard, cfg(seed=3))
    b = train(
        SPEC, w0, shard, cfg(seed=3), deadline=time.monotonic() + 3600, stop=threading.Event()
    )
    assert a.steps == b.steps == STEPS_PER_EPOCH and a.loss == b.loss
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in w0)


def test_nan_data_is_a_non_finite_update(shard: Dataset) -> None:
    x = shard.x.astype(np.float32).copy()
    x[5, 3] = np.nan
    with pytest.raises(NonFiniteUpdate) as info:
        train(SPEC, init_weights(SPEC, 0), Dataset(x, shard.y), cfg(local_epochs=20))
    err = info.value
    assert err.code == "NON_FINITE_UPDATE"
    assert "loss became nan at epoch 1 of 20" in err.message  # it stopped at once


def test_a_huge_learning_rate_is_a_non_finite_update(shard: Dataset) -> None:
    """One batch whose loss is finite, and a step that sends the weights to infinity: the
    trained weights are refused, named."""
    with pytest.raises(NonFiniteUpdate) as info:
        train(
            SPEC,
            init_weights(SPEC, 0),
            shard,
            cfg(batch_size=len(shard), lr=float("inf"), momentum=0.0),
        )
    assert info.value.code == "NON_FINITE_UPDATE"
    assert "trained tensor" in info.value.message and "non-finite" in info.value.message


def test_divergence_with_the_largest_lr_a_spec_allows(shard: Dataset) -> None:
    """lr = 10 and momentum = 0.999 (the spec's maxima) diverge on digits: an error, not NaNs."""
    with pytest.raises(NonFiniteUpdate) as info:
        train(SPEC, init_weights(SPEC, 0), shard, cfg(lr=10.0, momentum=0.999, local_epochs=20))
    assert info.value.code == "NON_FINITE_UPDATE"
