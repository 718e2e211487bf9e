"""FedBuff's pure part (fednode/fedbuff.py) by hand, and the spec's async cross-checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fednode import fedbuff
from protocol import spec
from protocol.errors import SpecError, ValidationError


def settings(**over: Any) -> fedbuff.Settings:
    agg = {**spec.defaults()["aggregation"], "mode": "async", **over}
    return fedbuff.Settings.of(agg)


def entry(peer: str, delta: list[float], n: int, version: int) -> fedbuff.Entry:
    return fedbuff.Entry(peer, {"w": np.array(delta, dtype=np.float32)}, n, version, 0.5)


def test_staleness_weights_by_hand() -> None:
    assert fedbuff.staleness_weight(0, "polynomial", 0.5) == 1.0
    assert fedbuff.staleness_weight(3, "polynomial", 0.5) == pytest.approx(0.5)  # 4^-0.5
    assert fedbuff.staleness_weight(8, "polynomial", 0.5) == pytest.approx(1 / 3)  # 9^-0.5
    assert fedbuff.staleness_weight(1, "polynomial", 1.0) == pytest.approx(0.5)
    assert fedbuff.staleness_weight(7, "constant", 0.5) == 1.0
    with pytest.raises(ValueError, match="future"):
        fedbuff.staleness_weight(-1, "polynomial", 0.5)


def test_the_step_by_hand_for_three_updates_of_different_staleness() -> None:
    # current version 5; updates trained on 5, 2 and 4: staleness 0, 3, 1
    current = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    entries = [
        entry("a", [1.0, 0.0], 100, 5),
        entry("b", [0.0, 2.0], 100, 2),
        entry("c", [4.0, 4.0], 200, 4),
    ]
    s = settings(server_lr=0.5, max_update_norm=0.0, max_weight_share=1.0)
    out = fedbuff.step(current, 5, entries, {"a": 100, "b": 100, "c": 200}, s)
    # shares 1/4, 1/4, 1/2; staleness weights 1, 1/2, 1/sqrt(2)
    sw_c = 2**-0.5
    expect = np.array(
        [
            1.0 + 0.5 * (0.25 * 1.0 + 0.5 * sw_c * 4.0),
            1.0 + 0.5 * (0.25 * 0.5 * 2.0 + 0.5 * sw_c * 4.0),
        ]
    )
    np.testing.assert_allclose(out.weights["w"], expect, rtol=1e-6)
    assert out.weights["w"].dtype == np.float32
    assert out.staleness == [0, 3, 1]
    assert [f["staleness_weight"] for f in out.figures] == pytest.approx([1.0, 0.5, sw_c])
    assert [f["share"] for f in out.figures] == pytest.approx([0.25, 0.25, 0.5])
    assert fedbuff.summary(out.staleness) == {"max": 3, "mean": pytest.approx(4 / 3), "fresh": 1}


def test_fresh_updates_with_server_lr_1_are_the_weighted_mean() -> None:
    """Every update fresh, constant weighting, lr 1: FedAvg's weighted mean of the models."""
    current = {"w": np.zeros(3, dtype=np.float32)}
    entries = [entry("a", [1.0, 2.0, 3.0], 1, 0), entry("b", [3.0, 2.0, 1.0], 3, 0)]
    s = settings(max_update_norm=0.0, max_weight_share=1.0)  # server_lr 0 -> 1.0
    assert s.server_lr == 1.0
    out = fedbuff.step(current, 0, entries, {}, s)
    np.testing.assert_allclose(out.weights["w"], [2.5, 2.0, 1.5])


def test_bounds_apply_claims_clip_and_share_cap_per_peer() -> None:
    current = {"w": np.zeros(2, dtype=np.float32)}
    # "a" claims 1000 but registered 10; "b" sent two updates into one buffer
    entries = [
        entry("a", [30.0, 40.0], 1000, 0),  # norm 50, clipped to 5
        entry("b", [1.0, 0.0], 10, 0),
        entry("b", [1.0, 0.0], 30, 0),
    ]
    s = settings(max_update_norm=5.0, max_weight_share=0.5)
    out = fedbuff.step(current, 0, entries, {"a": 10, "b": 40}, s)
    shares = [f["share"] for f in out.figures]
    # per peer: a 10, b 40 -> b capped at 0.5, a gets 0.5; b's half split 10:30
    assert shares == pytest.approx([0.5, 0.125, 0.375])
    assert out.figures[0]["scale"] == pytest.approx(0.1)
    np.testing.assert_allclose(out.weights["w"], [0.5 * 3.0 + 0.5, 0.5 * 4.0], rtol=1e-6)


def test_max_staleness_refusal() -> None:
    fedbuff.check_staleness(4, 4)
    with pytest.raises(ValidationError) as err:
        fedbuff.check_staleness(5, 4)
    assert err.value.code == "TOO_STALE" and "max_staleness = 4" in err.value.message
    ok, stale = fedbuff.split_stale(
        [entry("a", [0.0], 1, 7), entry("b", [0.0], 1, 2)], version=7, max_staleness=4
    )
    assert [e.peer for e in ok] == ["a"]
    assert [(e.peer, err.code) for e, err in stale] == [("b", "TOO_STALE")]
    with pytest.raises(ValidationError):  # the step never applies a too stale update
        fedbuff.step(
            {"w": np.zeros(1)}, 7, [entry("b", [0.0], 1, 2)], {}, settings(max_staleness=4)
        )


def test_buffer_takes_k_and_keeps_the_rest() -> None:
    buf = fedbuff.Buffer(2)
    for p in "abc":
        buf.add(entry(p, [0.0], 1, 0))
    assert buf.full
    assert [e.peer for e in buf.take()] == ["a", "b"]
    assert len(buf) == 1 and not buf.full


def test_pick_gives_slots_to_the_peers_that_waited_longest() -> None:
    last = {"a": 5.0, "b": 1.0}
    assert fedbuff.pick(["a", "b", "c"], last, 2) == ["c", "b"]
    assert fedbuff.pick(["a"], last, 0) == []


def test_spec_async_defaults_and_refusals() -> None:
    agg = spec.validate({"aggregation": {"mode": "async", "buffer_size": 2}})["aggregation"]
    assert (agg["buffer_size"], agg["max_staleness"], agg["staleness"]) == (2, 10, "polynomial")
    assert spec.detection_mode(spec.validate({"aggregation": {"mode": "async"}})) == "off"
    assert spec.validate({})["aggregation"]["mode"] == "sync"
    refused = {
        "secure": ({"aggregation": {"mode": "async", "secure": True}}, "synchronized cohort"),
        "median": ({"aggregation": {"mode": "async", "strategy": "median"}}, "fedavg or fedprox"),
        "central": (
            {"aggregation": {"mode": "async"}, "privacy": {"mode": "central_dp"}},
            "accountant",
        ),
        "exclude": (
            {"aggregation": {"mode": "async"}, "robustness": {"detection": "exclude"}},
            "different model versions",
        ),
        "participants": (
            {
                "aggregation": {"mode": "async"},
                "evaluation": {"on": "participants"},
                "data": {"dataset": "none"},
            },
            "different version",
        ),
    }
    for name, (raw, words) in refused.items():
        with pytest.raises(SpecError) as err:
            spec.validate(raw)
        assert 'aggregation.mode = "async"' in err.value.message, name
        assert words in err.value.message + (err.value.hint or ""), (name, err.value.message)
    with pytest.raises(SpecError, match=r"aggregation\.buffer_size"):
        spec.validate({"aggregation": {"mode": "async", "buffer_size": 0}})
    assert math.isclose(
        fedbuff.Settings.of(
            spec.validate({"aggregation": {"server_lr": 0.3}})["aggregation"]
        ).server_lr,
        0.3,
    )
