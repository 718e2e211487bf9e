"""Outlier detection that acts (fednode.robustness): each verdict on small updates whose
figures are worked out by hand, the cap that keeps a round's majority, quarantine's count,
the spec's refusals, and the ledger's record of scores and quarantines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fednode import robustness
from fednode.ledger import Ledger
from fednode.robustness import Thresholds, quarantine_due, score
from protocol import spec as specmod
from protocol.errors import SpecError
from tests.test_ledger import _session, _update

LIMITS = Thresholds()  # the spec's defaults
HONEST = {
    "a": [np.array([1.0, 1.0])],
    "b": [np.array([1.1, 0.9])],
    "c": [np.array([0.9, 1.1])],
    "d": [np.array([1.0, 1.05])],
}


def _with(peer: str, *values: float) -> dict[str, list[np.ndarray]]:
    return {**HONEST, peer: [np.array(values)]}


def test_a_sign_flipped_update_is_excluded_and_the_honest_kept() -> None:
    # pass 1: the coordinate-wise median of x (1, 1.1, .9, 1, -1) and y (1, .9, 1.1, 1.05,
    # -1) is (1, 1); x is excluded. Pass 2 judges against the median of the four kept:
    # x (1, 1.1, .9, 1) -> 1 and y (1, .9, 1.1, 1.05) -> 1.025, so m = (1, 1.025)
    first = score(_with("x", -1.0, -1.0), Thresholds(), exclude=False)
    assert first is not None and first["x"].cosine < -0.99  # named, not excluded...
    assert not first["x"].excluded  # ...in alert mode
    scores = score(_with("x", -1.0, -1.0), LIMITS)
    assert scores is not None
    m = np.array([1.0, 1.025])
    x = scores["x"]
    assert x.cosine == pytest.approx(-m.sum() / (math.sqrt(2) * np.linalg.norm(m)))
    assert x.distance == pytest.approx(np.linalg.norm(np.array([-1.0, -1.0]) - m))
    # the kept norms: √2 (a), √2.02 (b, c), √2.1025 (d): their median is √2.02
    assert x.norm_ratio == pytest.approx(math.sqrt(2) / math.sqrt(2.02))
    assert x.excluded and any("cosine" in r for r in x.reasons)
    assert any("z-score" in r for r in x.reasons)
    assert [p for p, s in scores.items() if s.excluded] == ["x"]
    assert scores["a"].distance == pytest.approx(0.025) and scores["a"].cosine > 0.999


def test_a_scaled_update_is_excluded_by_its_norm() -> None:
    scores = score(_with("x", 10.0, 10.0), LIMITS)
    assert scores is not None and scores["x"].excluded
    # judged at last against the four kept, whose median update is (1, 1.025): x points
    # almost the same way; only the norm tells
    m = np.array([1.0, 1.025])
    assert scores["x"].cosine == pytest.approx(m.sum() / (math.sqrt(2) * np.linalg.norm(m)))
    ratio = math.hypot(10, 10) / math.sqrt(2.02)
    assert scores["x"].norm_ratio == pytest.approx(ratio)
    assert any(f"{ratio:.1f}× the median" in r for r in scores["x"].reasons)


def test_a_free_rider_is_excluded_by_its_missing_norm() -> None:
    scores = score(_with("x", 0.0, 0.0), LIMITS)
    assert scores is not None and scores["x"].excluded
    assert scores["x"].norm == 0.0 and scores["x"].cosine == 0.0  # no direction at all
    assert any("<" in r and "norm" in r for r in scores["x"].reasons)
    # without the lower bound nothing catches it: a zero update points nowhere (cosine 0)
    loose = Thresholds(min_norm_ratio=0.0, max_z=1e6)
    assert score(_with("x", 0.0, 0.0), loose)["x"].reasons == ()  # type: ignore[index]


def test_fewer_than_half_are_ever_excluded() -> None:
    # 3 of 5 flipped: the median is theirs now, so the honest two look like the outliers;
    # at most 2 of 5 are left out, whoever they are, and the rest always make the aggregate
    updates = {
        "a": [np.array([1.0, 1.0])],
        "b": [np.array([1.1, 0.9])],
        "x": [np.array([-1.0, -1.0])],
        "y": [np.array([-1.1, -0.9])],
        "z": [np.array([-0.9, -1.1])],
    }
    scores = score(updates, LIMITS)
    assert scores is not None
    assert sum(s.excluded for s in scores.values()) == 2
    assert {p for p, s in scores.items() if s.outlier} == {"a", "b"}
    # a strategy's minimum (Krum with f = 1 needs 5) keeps every update in
    kept = score(updates, LIMITS, keep=5)
    assert kept is not None and not any(s.excluded for s in kept.values())
    one = score(_with("x", -1.0, -1.0), LIMITS, keep=4)  # 5 updates, 4 to keep: 1 may go
    assert one is not None and [p for p, s in one.items() if s.excluded] == ["x"]


def test_too_few_updates_are_not_judged_and_alert_mode_excludes_none() -> None:
    assert (
        score({"a": HONEST["a"], "b": HONEST["b"], "x": [np.array([-1.0, -1.0])]}, LIMITS) is None
    )
    scores = score(_with("x", -1.0, -1.0), LIMITS, exclude=False)
    assert scores is not None and scores["x"].outlier and not scores["x"].excluded


def test_a_non_finite_update_is_excluded_before_any_other() -> None:
    updates = {**_with("x", -1.0, -1.0), "n": [np.array([np.nan, 1.0])]}
    scores = score(updates, Thresholds(min_updates=4))
    assert scores is not None
    assert scores["n"].reasons == ("non-finite values",) and scores["n"].excluded
    assert scores["x"].excluded  # cap (6 - 1) // 2 = 2: both go
    assert scores["n"].as_dict()["norm"] is not None  # the broken values were zeroed


def test_equal_honest_updates_are_not_outliers_by_rounding() -> None:
    same = {p: [np.array([1.0, 1.0 + 1e-9 * k])] for k, p in enumerate("abcdef")}
    scores = score(same, LIMITS)
    assert scores is not None and not any(s.outlier for s in scores.values())


def test_quarantine_counts_exclusions_in_the_window() -> None:
    assert quarantine_due([True, False, True, True], after=3, window=5)
    assert not quarantine_due([True, False, True], after=3, window=5)
    assert not quarantine_due([True, True, False, True], after=2, window=2)  # last two: F, T
    assert quarantine_due([False, True, True], after=2, window=2)
    assert not quarantine_due([True] * 10, after=0, window=5)  # 0 = never


def test_the_spec_refuses_detection_with_secure_aggregation() -> None:
    with pytest.raises(SpecError, match=r"robustness\.detection") as err:
        specmod.validate({"aggregation": {"secure": True}, "robustness": {"detection": "alert"}})
    assert "max_update_norm" in (err.value.hint or "")
    quiet = specmod.validate({"aggregation": {"secure": True}})
    assert quiet["robustness"]["detection"] == "auto"  # the default: off when secure
    assert specmod.detection_mode(quiet) == "off"
    plain = specmod.validate({})
    assert specmod.detection_mode(plain) == "exclude"
    plain["aggregation"]["secure"] = True  # a checked spec changed and checked again
    assert specmod.detection_mode(specmod.validate(plain)) == "off"
    alert = specmod.validate({"robustness": {"detection": "alert"}})
    assert specmod.detection_mode(alert) == "alert"
    with pytest.raises(SpecError, match="quarantine_after = 6 is more than"):
        specmod.validate({"robustness": {"quarantine_after": 6, "quarantine_window": 5}})


def test_the_ledger_keeps_scores_and_counts_from_the_last_quarantine(tmp_path: Path) -> None:
    with Ledger(tmp_path / "ledger.db") as led:
        _session(led)
        for rnd in (1, 2, 3):
            _update(led, rnd, "x")
            _update(led, rnd, "a")
            figures = score(_with("x", -1.0, -1.0), LIMITS)
            assert figures is not None
            led.record_scores("s1", rnd, {"x": figures["x"].as_dict(), "a": figures["a"].as_dict()})
        assert led.exclusion_history("s1", "x") == [True, True, True]
        assert led.exclusion_history("s1", "a") == [False, False, False]
        row = next(u for u in led.updates("s1", 3) if u["participant"] == "x")
        assert row["excluded"] == 1 and row["scores"]["cosine"] == pytest.approx(-1.0, abs=1e-3)
        assert row["scores"]["reasons"] and row["scores"]["excluded"] is True
        led.mark_quarantined("s1", 3, "x")
        assert led.exclusion_history("s1", "x") == []  # dealt with by the quarantine
        _update(led, 4, "x")
        led.record_scores("s1", 4, {"x": {"excluded": False}})
        assert led.exclusion_history("s1", "x") == [False]


def test_thresholds_come_from_the_spec() -> None:
    rob = specmod.validate({"robustness": {"max_z": 5, "min_cosine": -0.5}})["robustness"]
    limits = robustness.Thresholds.of(rob)
    assert (limits.max_z, limits.min_cosine, limits.min_updates) == (5.0, -0.5, 4)


def test_each_strategy_says_how_many_updates_it_needs() -> None:
    from fednode.strategies import get_strategy

    def need(**agg: object) -> int:
        spec = specmod.validate({"min_participants": 10, "aggregation": agg})
        return get_strategy(spec["aggregation"]).min_updates

    assert need(strategy="fedavg") == 1 and need(strategy="median") == 1
    assert need(strategy="krum", num_malicious=2) == 7  # n > 2f + 2
    assert need(strategy="multikrum", num_malicious=1) == 5
    assert need(strategy="bulyan", num_malicious=1) == 7  # n >= 4f + 3
