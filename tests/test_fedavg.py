from __future__ import annotations

import numpy as np
import pytest

from fednode.strategies import STRATEGIES, ClientUpdate, FedAvg, get_strategy
from protocol.errors import ValidationError


def w(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((2, 2), value, np.float32), "b": np.full(3, value, np.float32)}


def test_weighted_mean_by_hand():
    updates = [ClientUpdate("p1", w(0.0), 1, 0.5), ClientUpdate("p2", w(4.0), 3, 0.5)]
    out, state = FedAvg().aggregate(w(100.0), updates, {})
    assert state == {}  # FedAvg keeps no state
    assert list(out) == ["a", "b"]
    for v in out.values():
        assert v.dtype == np.float32
        assert np.all(v == 3.0)  # (1*0 + 3*4) / 4


def test_mean_of_different_values_per_entry():
    a = {"t": np.array([1.0, 2.0, 10.0], np.float32)}
    b = {"t": np.array([3.0, 6.0, -10.0], np.float32)}
    out, _ = FedAvg().aggregate(a, [ClientUpdate("x", a, 2, 0), ClientUpdate("y", b, 2, 0)], {})
    assert np.allclose(out["t"], [2.0, 4.0, 0.0])
    # a zero-example client contributes nothing
    out, _ = FedAvg().aggregate(a, [ClientUpdate("x", a, 5, 0), ClientUpdate("y", b, 0, 0)], {})
    assert np.array_equal(out["t"], a["t"])


def test_errors():
    g = w(0.0)
    with pytest.raises(ValidationError, match="no updates"):
        FedAvg().aggregate(g, [], {})
    with pytest.raises(ValidationError, match="zero"):
        FedAvg().aggregate(g, [ClientUpdate("p", w(1.0), 0, 0.0)], {})
    bad_key = {"a": g["a"], "c": g["b"]}
    with pytest.raises(ValidationError, match="'b'"):
        FedAvg().aggregate(
            g, [ClientUpdate("p1", w(1.0), 1, 0), ClientUpdate("p2", bad_key, 1, 0)], {}
        )
    extra = dict(w(1.0), c=np.zeros(1, np.float32))
    with pytest.raises(ValidationError, match="'c'"):
        FedAvg().aggregate(g, [ClientUpdate("p1", extra, 1, 0)], {})
    bad_shape = {"a": np.zeros((2, 3), np.float32), "b": g["b"]}
    with pytest.raises(ValidationError, match="'a'"):
        FedAvg().aggregate(g, [ClientUpdate("p1", bad_shape, 1, 0)], {})


def test_registry():
    assert isinstance(get_strategy("fedavg"), FedAvg)
    assert get_strategy("fedavg").name == "fedavg"
    assert "fedavg" in STRATEGIES
    with pytest.raises(ValidationError, match="fedavg"):
        get_strategy("nope")
