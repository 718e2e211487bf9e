"""fednode.quality: every formula with hand-computed numbers, every alert rule at, just under
and just over its threshold, the SLA file's validation, and properties (0..100, finite) for
any input."""

from __future__ import annotations

import json
import math
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode import quality as q
from fednode.quality import (
    SLA,
    AlertCondition,
    ParticipantObservation,
    ParticipantScores,
    SessionObservation,
)
from protocol import alerts
from protocol.errors import ValidationError

DEFAULT = SLA()


def obs(**kw: Any) -> ParticipantObservation:
    return ParticipantObservation(peer_id="peer-A", **kw)


def scores(o: ParticipantObservation, sla: SLA = DEFAULT) -> ParticipantScores:
    return q.participant_scores(o, sla)


def alert_types(o: ParticipantObservation, sla: SLA = DEFAULT) -> set[str]:
    return {c.alert_type for c in q.participant_alerts(o, scores(o, sla), sla, "S1")}


def session_alert_types(o: SessionObservation, sla: SLA = DEFAULT) -> set[str]:
    return {c.alert_type for c in q.session_alerts(o, q.session_scores(o, sla), sla)}


# --- SLA -----------------------------------------------------------------------------------------


def test_sla_defaults_match_the_table() -> None:
    assert SLA().to_dict() == q.SLA_FIELDS
    assert q.sla_from_dict({}) == SLA()
    assert SLA().min_convergence_rate == 20
    assert isinstance(SLA().min_convergence_rate, int)
    assert len(q.SLA_FIELDS) == 11
    assert [f.name for f in fields(SLA)] == list(q.SLA_FIELDS)


def test_sla_template_has_every_key_at_its_default() -> None:
    parsed = json.loads(q.sla_template())
    assert parsed == q.SLA_FIELDS
    assert q.sla_from_dict(parsed) == SLA()
    assert '"max_training_time": 300000' in q.sla_template()


def test_load_sla_file_overrides_two_keys(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_text(json.dumps({"max_latency": 250, "min_convergence_rate": 5}))
    sla = q.load_sla(path)
    assert sla.max_latency == 250.0
    assert sla.min_convergence_rate == 5
    assert replace(sla, max_latency=500.0, min_convergence_rate=20) == SLA()


def test_load_sla_of_the_template(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_text(q.sla_template())
    assert q.load_sla(str(path)) == SLA()


def test_load_sla_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_text('{"max_latency": 250,}')
    with pytest.raises(ValidationError) as exc:
        q.load_sla(path)
    assert exc.value.code == "SLA_INVALID"
    assert "not valid JSON" in exc.value.message
    assert str(path) in exc.value.message
    assert "line 1" in exc.value.message


def test_load_sla_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as exc:
        q.load_sla(tmp_path / "nope.json")
    assert exc.value.code == "SLA_INVALID"
    assert "cannot read SLA file" in exc.value.message


def test_load_sla_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValidationError) as exc:
        q.load_sla(path)
    assert exc.value.code == "SLA_INVALID"


def test_load_sla_key_twice(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_text('{"max_latency": 250, "max_latency": 300}')
    with pytest.raises(ValidationError, match="'max_latency' appears twice") as exc:
        q.load_sla(path)
    assert exc.value.code == "SLA_INVALID"


def test_load_sla_bad_value_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "sla.json"
    path.write_text('{"min_uptime": 120}')
    with pytest.raises(ValidationError) as exc:
        q.load_sla(path)
    assert exc.value.message.startswith(f"{path}: ")
    assert "'min_uptime' = 120" in exc.value.message
    assert exc.value.code == "SLA_INVALID"


@pytest.mark.parametrize(
    ("key", "value", "shown", "accepted"),
    [
        ("min_uptime", 100.5, "100.5", ">= 0 and <= 100 (%)"),
        ("min_task_completion", -1, "-1", ">= 0 and <= 100 (%)"),
        ("min_model_quality", 101, "101", ">= 0 and <= 100 (score 0..100)"),
        ("max_anomaly_threshold", float("nan"), "NaN", ">= 0 and <= 100 (%)"),
        ("max_error_rate", float("inf"), "Infinity", ">= 0 and <= 100 (%)"),
        ("max_training_time", 0, "0", "> 0 and <= 86400000 (ms)"),
        ("max_training_time", 86_400_001, "86400001", "> 0 and <= 86400000 (ms)"),
        ("max_latency", 0, "0", "> 0 and <= 600000 (ms)"),
        ("max_latency", -5, "-5", "> 0 and <= 600000 (ms)"),
        ("max_latency", 600_001, "600001", "> 0 and <= 600000 (ms)"),
        ("min_convergence_rate", 0, "0", "an integer >= 1 and <= 100000 (rounds)"),
        ("min_convergence_rate", 100_001, "100001", "an integer >= 1 and <= 100000"),
        ("min_convergence_rate", 2.5, "2.5", "an integer >= 1 and <= 100000"),
        ("min_convergence_rate", 20.0, "20.0", "an integer >= 1 and <= 100000"),
        ("min_security_score", True, "true", "a number >= 0 and <= 100"),
        ("min_privacy_compliance", "95", '"95"', "a number >= 0 and <= 100"),
        ("min_data_quality", None, "null", "a number >= 0 and <= 100"),
        ("max_latency", [500], "[500]", "a number > 0 and <= 600000"),
        ("max_training_time", 10**400, "1" + "0" * 400, "a number > 0 and <= 86400000"),
    ],
)
def test_sla_bad_value_names_key_value_and_range(
    key: str, value: object, shown: str, accepted: str
) -> None:
    with pytest.raises(ValidationError) as exc:
        q.sla_from_dict({key: value})
    msg = exc.value.message
    assert f"SLA key {key!r} = {shown} " in msg
    assert accepted in msg
    assert exc.value.code == "SLA_INVALID"
    assert key in exc.value.hint


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("min_uptime", 0),
        ("min_uptime", 100),
        ("max_training_time", 86_400_000),
        ("max_training_time", 0.5),
        ("max_latency", 600_000),
        ("min_convergence_rate", 1),
        ("min_convergence_rate", 100_000),
    ],
)
def test_sla_boundaries_are_accepted(key: str, value: float) -> None:
    assert getattr(q.sla_from_dict({key: value}), key) == value


def test_sla_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError) as exc:
        q.sla_from_dict({"max_latancy": 300})
    assert "unknown SLA key 'max_latancy'" in exc.value.message
    for key in q.SLA_FIELDS:
        assert key in exc.value.message


def test_sla_must_be_an_object() -> None:
    with pytest.raises(ValidationError, match="JSON object") as exc:
        q.sla_from_dict([1, 2])  # type: ignore[arg-type]
    assert "max_latency" in exc.value.message


def test_sla_built_directly_is_checked_too() -> None:
    with pytest.raises(ValidationError, match="'max_latency' = 0"):
        SLA(max_latency=0)


# --- participant formulas -------------------------------------------------------------------


FULL = dict(
    training_time_ms=600_000.0,  # twice the SLA: 50
    tasks_selected=10,
    tasks_completed=7,
    tasks_failed=3,
    model_quality=60.0,
    data_quality=80.0,
    uptime_pct=72.0,
    heartbeat_consistency_pct=70.0,
    latency_ms=1000.0,  # twice the SLA: 50
    bandwidth_mbps=50.0,  # half of 100 Mbit/s: 50
    disconnects=2,  # 100 - 40 = 60
    cpu_efficiency_pct=50.0,
    memory_efficiency_pct=40.0,
)


def test_participant_scores_by_hand() -> None:
    s = scores(obs(**FULL))
    assert s.task_completion_rate == pytest.approx(70.0)
    assert s.error_rate == pytest.approx(30.0)
    assert s.connection_stability == pytest.approx(60.0)
    assert s.training_time_score == pytest.approx(50.0)
    assert s.latency_score == pytest.approx(50.0)
    assert s.bandwidth_score == pytest.approx(50.0)
    assert s.performance == pytest.approx((50 + 70 + 60 + 80) / 4)  # 65
    assert s.reliability == pytest.approx((72 + 70 + (100 - 30) + 60) / 4)  # 68
    assert s.network == pytest.approx(50.0)
    assert s.resource == pytest.approx(45.0)
    assert s.overall == pytest.approx(0.3 * 65 + 0.3 * 68 + 0.2 * 50 + 0.2 * 45)  # 58.9
    assert s.has_input


@pytest.mark.parametrize(
    ("ms", "expected"),
    [(0.0, 100.0), (300_000.0, 100.0), (300_001.0, 100 * 300_000 / 300_001), (1_200_000, 25.0)],
)
def test_training_time_score(ms: float, expected: float) -> None:
    assert scores(obs(training_time_ms=ms)).training_time_score == pytest.approx(expected)


@pytest.mark.parametrize(("ms", "expected"), [(499.0, 100.0), (500.0, 100.0), (2000.0, 25.0)])
def test_latency_score(ms: float, expected: float) -> None:
    assert scores(obs(latency_ms=ms)).latency_score == pytest.approx(expected)


def test_latency_score_follows_the_sla() -> None:
    sla = SLA(max_latency=100)
    assert q.participant_scores(obs(latency_ms=400.0), sla).latency_score == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("mbps", "expected"), [(0.0, 0.0), (25.0, 25.0), (100.0, 100.0), (1e4, 100)]
)
def test_bandwidth_score(mbps: float, expected: float) -> None:
    assert scores(obs(bandwidth_mbps=mbps)).bandwidth_score == pytest.approx(expected)


@pytest.mark.parametrize(("disconnects", "expected"), [(0, 100.0), (1, 80.0), (3, 40.0), (9, 0.0)])
def test_connection_stability(disconnects: int, expected: float) -> None:
    s = scores(obs(disconnects=disconnects, uptime_pct=100.0))
    assert s.connection_stability == pytest.approx(expected)


def test_connection_stability_needs_a_window_or_a_disconnect() -> None:
    # No observation window (uptime not measured) and nothing counted: not measured.
    assert scores(obs()).connection_stability is None
    # A counted disconnect is a measurement even without the window.
    assert scores(obs(disconnects=2)).connection_stability == pytest.approx(60.0)


def test_task_rates_need_selections() -> None:
    s = scores(obs(tasks_selected=0, tasks_completed=0, tasks_failed=0))
    assert s.task_completion_rate is None
    assert s.error_rate is None
    s = scores(obs(tasks_selected=4, tasks_completed=4))
    assert s.task_completion_rate == 100.0
    assert s.error_rate == 0.0


def test_none_inputs_are_left_out_not_counted_as_zero() -> None:
    s = scores(obs(uptime_pct=90.0))  # only uptime (and, with it, connection stability)
    assert s.reliability == pytest.approx((90 + 100) / 2)
    assert s.performance is None and s.network is None and s.resource is None
    assert s.overall == pytest.approx(95.0)  # reliability alone carries all the weight


def test_weights_are_renormalised_over_parts_with_input() -> None:
    s = scores(obs(model_quality=80.0, cpu_efficiency_pct=40.0))
    assert s.performance == 80.0 and s.resource == 40.0
    assert s.reliability is None and s.network is None
    assert s.overall == pytest.approx((0.3 * 80 + 0.2 * 40) / (0.3 + 0.2))  # 64


def test_no_input_at_all_gives_zero_and_no_alert() -> None:
    o = obs()
    s = scores(o)
    assert s.overall == 0.0
    assert not s.has_input
    assert s.trend == "stable"
    assert q.participant_alerts(o, s, DEFAULT) == []


def test_non_finite_inputs_count_as_not_measured() -> None:
    nan, inf = float("nan"), float("inf")
    s = scores(
        obs(
            uptime_pct=nan,
            latency_ms=inf,
            bandwidth_mbps=-inf,
            training_time_ms=nan,
            model_quality=inf,
            cpu_efficiency_pct=nan,
            heartbeat_consistency_pct=90.0,
        )
    )
    assert s.latency_score is None and s.bandwidth_score is None
    assert s.training_time_score is None and s.performance is None and s.resource is None
    assert s.reliability == pytest.approx(90.0)
    assert s.overall == pytest.approx(90.0)


def test_negative_times_count_as_not_measured() -> None:
    s = scores(obs(latency_ms=-3.0, training_time_ms=-1.0, bandwidth_mbps=-2.0))
    assert (s.latency_score, s.training_time_score, s.bandwidth_score) == (None, None, None)


def test_out_of_range_percentages_are_clamped() -> None:
    s = scores(obs(uptime_pct=100.0000001, heartbeat_consistency_pct=-3.0))
    assert s.reliability == pytest.approx((100 + 0 + 100) / 3)


def test_participant_scores_to_dict() -> None:
    d = scores(obs(**FULL)).to_dict()
    assert set(d) == {
        "task_completion_rate",
        "error_rate",
        "connection_stability",
        "training_time_score",
        "latency_score",
        "bandwidth_score",
        "performance",
        "reliability",
        "network",
        "resource",
        "overall",
        "trend",
    }
    json.dumps(d, allow_nan=False)


# --- trend ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], "stable"),
        ([50.0], "stable"),
        ([50.0, 60.0, 70.0], "improving"),  # slope 10
        ([70.0, 60.0, 50.0], "declining"),
        ([50.0, 51.0, 50.0, 51.0], "stable"),
        ([0.0, 2.0, 4.0], "stable"),  # slope exactly 2: not more than 2
        ([0.0, 2.1, 4.2], "improving"),  # slope 2.1
        ([4.2, 2.1, 0.0], "declining"),
        ([100.0, 0.0, 10.0, 20.0, 30.0, 40.0], "improving"),  # only the last 5 count
        ([10.0, float("nan"), 20.0, 30.0], "improving"),  # NaN left out
    ],
)
def test_trend(values: list[float], expected: str) -> None:
    assert q.trend(values) == expected


def test_participant_trend_uses_history_then_this_score() -> None:
    s = q.participant_scores(obs(**FULL), DEFAULT, [90.0, 85.0, 80.0, 75.0])
    assert s.trend == "declining"  # ... 75 then 58.9
    s = q.participant_scores(obs(**FULL), DEFAULT, [30.0, 40.0, 50.0])
    assert s.trend == "improving"
    # An overall with no input behind it is not part of the trend.
    assert q.participant_scores(obs(), DEFAULT, [90.0, 90.0]).trend == "stable"


# --- model quality ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (1.0, 0.5, 100.0),  # lowered the loss
        (1.0, 1.0, 100.0),  # did not raise it
        (1.0, 2.0, 50.0),  # doubled it
        (0.6, 0.8, 75.0),
        (1.0, float("inf"), 0.0),
        (1.0, float("nan"), 0.0),
        (float("nan"), 1.0, 0.0),
        (float("inf"), 1.0, 100.0),  # it does not raise an infinite loss
        (0.0, 0.5, 0.0),  # raised a perfect loss
        (0.0, 0.0, 100.0),
    ],
)
def test_model_quality_score(before: float, after: float, expected: float) -> None:
    assert q.model_quality_score(before, after) == pytest.approx(expected)


# --- data quality -------------------------------------------------------------------------------


def report(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "rows": 10,
        "missing": 0,
        "duplicates": 0,
        "label_counts": {"a": 5, "b": 5},
    }
    base.update(kw)
    return base


def test_data_quality_score_by_hand() -> None:
    assert q.data_quality_score(report()) == pytest.approx(100.0)
    assert q.data_quality_score(report(missing=1, duplicates=2)) == pytest.approx(100 * 0.9 * 0.8)
    # balance of 9:1 = -(0.9 ln 0.9 + 0.1 ln 0.1) / ln 2 = 0.468996
    unbalanced = report(label_counts={"a": 9, "b": 1})
    assert q.data_quality_score(unbalanced) == pytest.approx(46.8996, abs=1e-3)
    # three equal labels and one empty one: entropy ln 3 over ln 4 = 0.792481
    four = report(rows=9, label_counts={"a": 3, "b": 3, "c": 3, "d": 0})
    assert q.data_quality_score(four) == pytest.approx(79.2481, abs=1e-3)


def test_data_quality_edge_cases() -> None:
    assert q.data_quality_score(report(rows=0, label_counts={})) == 0.0
    assert q.data_quality_score(report(label_counts={"a": 10})) == 100.0  # nothing to skew
    assert q.data_quality_score(report(label_counts={})) == 100.0
    assert q.data_quality_score(report(missing=10)) == 0.0


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ([1, 2], "must be a map"),
        ({"rows": 1, "missing": 0, "duplicates": 0}, "lacks 'label_counts'"),
        ({**report(), "extra": 1}, "unknown key 'extra'"),
        (report(rows=-1), "'rows' = -1"),
        (report(rows=True), "'rows' = true"),
        (report(rows=10.0), "'rows' = 10.0"),
        (report(missing=11), "'missing' = 11"),
        (report(duplicates="2"), "'duplicates' = \"2\""),
        (report(label_counts=[5, 5]), "'label_counts' must be a map"),
        (report(label_counts={"a": -1}), "'label_counts' ['a'] = -1"),
        (report(label_counts={"a": 1.5}), "'label_counts' ['a'] = 1.5"),
        (report(label_counts={"a": 8, "b": 8}), "sums to 16, more than rows (10)"),
    ],
)
def test_data_quality_refuses_malformed_reports(bad: Any, fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        q.data_quality_score(bad)
    assert fragment in exc.value.message


def test_data_report_with_nan_row_duplicate_row_and_unbalanced_labels() -> None:
    nan, inf = float("nan"), float("inf")
    x = np.array(
        [[0, 1], [0, 1], [2, 3], [nan, 1], [4, 5], [inf, 0]], dtype=np.float32
    )  # row 1 repeats row 0; rows 3 and 5 are not finite
    y = np.array([0, 0, 0, 0, 1, 0], dtype=np.int64)
    r = q.data_report(x, y)
    assert r == {"rows": 6, "missing": 2, "duplicates": 1, "label_counts": {"0": 5, "1": 1}}
    # balance of 5:1 = -(5/6 ln 5/6 + 1/6 ln 1/6) / ln 2 = 0.650022
    assert q.data_quality_score(r) == pytest.approx(100 * (4 / 6) * (5 / 6) * 0.650022, abs=1e-3)
    json.dumps(r)


def test_data_report_details() -> None:
    x = np.array([[0.0, 1.0], [-0.0, 1.0], [1.0, 1.0]])  # -0.0 equals 0.0
    y = np.array([1.0, 1.0, float("nan")])  # a NaN label is a missing row, not a label
    r = q.data_report(x, y)
    assert r == {"rows": 3, "missing": 1, "duplicates": 1, "label_counts": {"1": 2}}
    images = np.zeros((4, 2, 2))  # more than two dimensions: one row per sample
    assert q.data_report(images, np.arange(4))["duplicates"] == 3
    empty = q.data_report(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    assert empty == {"rows": 0, "missing": 0, "duplicates": 0, "label_counts": {}}
    assert q.data_quality_score(empty) == 0.0


def test_data_report_refuses_mismatched_arrays() -> None:
    with pytest.raises(ValidationError, match="shape"):
        q.data_report(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValidationError, match="numeric"):
        q.data_report(np.array([["a"], ["b"]]), np.zeros(2))


# --- anomalies ----------------------------------------------------------------------------------


def test_anomalous_finds_one_clear_outlier_among_ten() -> None:
    d = {f"p{i}": v for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99])}
    d["bad"] = 10.0
    assert q.anomalous(d) == {"bad"}


def test_anomalous_is_one_sided_and_respects_k() -> None:
    d = {f"p{i}": v for i, v in enumerate([1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99])}
    d["close"] = 0.0  # closer than everyone else: not an attack on the model
    assert q.anomalous(d) == set()
    # median 1.0, MAD 0.05 (by hand): 1.3 has z = 0.6745 * 0.3 / 0.05 = 4.047
    d["far"] = 1.3
    assert q.anomalous(d) == {"far"}
    assert q.anomalous(d, k=4.1) == set()


def test_anomalous_identical_values_none() -> None:
    assert q.anomalous({f"p{i}": 2.5 for i in range(10)}) == set()


def test_anomalous_non_finite_always_flagged() -> None:
    d = {f"p{i}": 2.5 for i in range(10)}
    d["nan"] = float("nan")
    d["inf"] = float("inf")
    assert q.anomalous(d) == {"nan", "inf"}
    assert q.anomalous({"a": 1.0, "b": float("nan")}) == {"b"}  # too few to judge the rest
    assert q.anomalous({"a": 1.0, "b": 100.0}) == set()
    assert q.anomalous({}) == set()


# --- session formulas ---------------------------------------------------------------------------


def session(**kw: Any) -> SessionObservation:
    return SessionObservation(session_id="S1", **kw)


def test_session_scores_by_hand() -> None:
    o = session(
        accuracies=[0.1, 0.5, 0.7, 0.8, 0.85, 0.9],
        rounds_run=6,
        first_selected=["a", "b"],
        last_contributors=["a", "c"],
        updates_accepted=9,
        updates_rejected_integrity=1,
        bytes_moved=200,
        bytes_ideal=100,
        privacy_required=True,
        rounds_privacy_ok=3,
        security_violations=1,
        participant_quality=80.0,
    )
    s = q.session_scores(o, SLA(min_convergence_rate=3))
    assert s.convergence_rate == 5  # first round within 0.01 of the best (0.9)
    assert s.convergence_score == pytest.approx(100 * 3 / 5)
    # changes 0.4 0.2 0.1 0.05 0.05: std 0.1319 > 0.05
    assert s.model_stability == pytest.approx(0.0)
    assert s.accuracy_improvement == pytest.approx(100 * 0.8 / 0.9)
    assert s.convergence == pytest.approx((60 + 0 + 88.8889) / 3, abs=1e-3)
    assert s.participant_retention == pytest.approx(50.0)
    assert s.data_integrity == pytest.approx(90.0)
    assert s.network_efficiency == pytest.approx(50.0)
    assert s.privacy_compliance == pytest.approx(50.0)
    assert s.security_score == pytest.approx(80.0)
    assert s.participant_quality == pytest.approx(80.0)
    expected = 0.25 * 49.6296 + 0.25 * 80 + 0.20 * 90 + 0.15 * 50 + 0.15 * 80  # 69.9074
    assert s.health == pytest.approx(expected, abs=1e-3)


def test_model_stability_by_hand() -> None:
    s = q.session_scores(session(accuracies=[0.5, 0.525, 0.5]), DEFAULT)
    assert s.model_stability == pytest.approx(50.0)  # changes +-0.025: std 0.025
    s = q.session_scores(session(accuracies=[0.5, 0.6, 0.7, 0.8]), DEFAULT)
    assert s.model_stability == pytest.approx(100.0)  # steady steps
    # Only the last 5 changes: the first big jump has dropped out.
    s = q.session_scores(session(accuracies=[0.1, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95]), DEFAULT)
    assert s.model_stability == pytest.approx(100.0)
    # One change has no spread to measure.
    assert q.session_scores(session(accuracies=[0.1, 0.5]), DEFAULT).model_stability is None


def test_convergence_cases() -> None:
    s = q.session_scores(session(accuracies=[0.5, 0.525, 0.5]), DEFAULT)
    assert (s.convergence_rate, s.convergence_score) == (1, 100.0)
    assert s.accuracy_improvement == pytest.approx(0.0)
    never = q.session_scores(session(accuracies=[0.5, 0.4, 0.45]), DEFAULT)
    assert never.convergence_score == 0.0  # never rose above round 0's
    assert never.accuracy_improvement == 0.0  # clamped, not negative
    only_initial = q.session_scores(session(accuracies=[0.3]), DEFAULT)
    assert only_initial.convergence_rate is None
    assert only_initial.convergence_score is None
    assert only_initial.accuracy_improvement is None
    assert only_initial.convergence is None
    perfect = q.session_scores(session(accuracies=[1.0, 1.0, 1.0]), DEFAULT)
    assert perfect.accuracy_improvement == 100.0  # nothing left to improve, nothing lost


def test_session_defaults_and_renormalised_health() -> None:
    s = q.session_scores(session(), DEFAULT)
    assert s.data_integrity == 100.0  # no updates
    assert s.network_efficiency == 100.0  # nothing moved
    assert s.privacy_compliance == 100.0  # not asked for
    assert s.security_score == 100.0
    assert s.participant_retention is None
    assert s.health == pytest.approx(100.0)
    s = q.session_scores(session(bytes_moved=400, bytes_ideal=200), DEFAULT)
    # only data_integrity (100), network (50), security (100): (20 + 7.5 + 15) / 0.5
    assert s.health == pytest.approx(85.0)
    s = q.session_scores(session(privacy_required=True), DEFAULT)
    assert s.privacy_compliance is None  # no round to judge yet


def test_session_scores_to_dict_keys() -> None:
    d = q.session_scores(session(), DEFAULT).to_dict()
    assert set(d) == {
        "convergence_rate",
        "convergence_score",
        "model_stability",
        "accuracy_improvement",
        "participant_retention",
        "data_integrity",
        "network_efficiency",
        "privacy_compliance",
        "security_score",
        "participant_quality",
        "convergence",
        "health",
    }


# --- participant alert rules ----------------------------------------------------------------


def _figure(field: str) -> Any:
    return lambda v: obs(**{field: v})


PARTICIPANT_RULES: list[tuple[str, str, Any, float, float, float]] = [
    # (alert_type, severity, obs for a value, at threshold, just under, just over)
    ("uptime", "critical", _figure("uptime_pct"), 90.0, 89.9, 90.1),
    ("heartbeat", "medium", _figure("heartbeat_consistency_pct"), 80.0, 79.9, 80.1),
    ("model_quality", "medium", _figure("model_quality"), 75.0, 74.9, 75.1),
    ("data_quality", "medium", _figure("data_quality"), 90.0, 89.9, 90.1),
    ("latency", "medium", _figure("latency_ms"), 500.0, 499.9, 500.1),
    ("training_time", "medium", _figure("training_time_ms"), 300_000.0, 299_999.9, 300_000.1),
    (
        "task_completion",
        "critical",
        lambda v: obs(tasks_selected=1000, tasks_completed=round(v * 10)),
        80.0,
        79.9,
        80.1,
    ),
    (
        "error_rate",
        "high",
        lambda v: obs(tasks_selected=1000, tasks_failed=round(v * 10)),
        10.0,
        9.9,
        10.1,
    ),
    (
        "quality_score",
        "high",
        lambda v: obs(cpu_efficiency_pct=v, memory_efficiency_pct=v),  # overall = resource
        70.0,
        69.9,
        70.1,
    ),
    (
        "resource_efficiency",
        "low",
        lambda v: obs(cpu_efficiency_pct=v, memory_efficiency_pct=v),
        60.0,
        59.9,
        60.1,
    ),
    (
        "connection_stability",
        "low",
        lambda v: obs(uptime_pct=100.0, disconnects=round((100 - v) / 20)),  # 20 per step
        80.0,
        60.0,
        100.0,
    ),
]
LOWER_IS_BAD = {
    "uptime",
    "heartbeat",
    "model_quality",
    "data_quality",
    "task_completion",
    "quality_score",
    "resource_efficiency",
    "connection_stability",
}


@pytest.mark.parametrize(
    ("alert_type", "severity", "make", "at", "under", "over"),
    PARTICIPANT_RULES,
    ids=[r[0] for r in PARTICIPANT_RULES],
)
def test_participant_rule_at_under_and_over_threshold(
    alert_type: str, severity: str, make: Any, at: float, under: float, over: float
) -> None:
    bad, good = (under, over) if alert_type in LOWER_IS_BAD else (over, under)
    assert alert_type not in alert_types(make(at)), "exactly at the threshold is fine"
    assert alert_type not in alert_types(make(good))
    o = make(bad)
    conds = [
        c for c in q.participant_alerts(o, scores(o), DEFAULT, "S1") if c.alert_type == alert_type
    ]
    assert len(conds) == 1
    c = conds[0]
    assert (c.severity, c.entity_id, c.session_id) == (severity, "peer-A", "S1")
    assert c.threshold == pytest.approx(at)
    assert c.value == pytest.approx(bad)
    assert f"({severity})" in c.message
    assert alerts.ALERT_SEVERITY[alert_type] == severity


def test_alert_messages_read_as_the_brief_says() -> None:
    o = obs(**FULL)
    by_type = {c.alert_type: c.message for c in q.participant_alerts(o, scores(o), DEFAULT)}
    assert by_type["uptime"] == (
        "uptime 72.0 % is under 90 % (critical): the peer was offline 28 % of the window"
    )
    assert by_type["latency"] == (
        "latency 1000 ms is over the SLA's 500 ms (medium): messages to and from the peer "
        "are slow; rounds may wait on it"
    )
    assert by_type["task_completion"].startswith("task completion 70.0 % is under 80 % (critical)")
    assert "7 of the 10 tasks" in by_type["task_completion"]
    assert "3 of the 10 tasks" in by_type["error_rate"]
    assert "disconnected 2 times" in by_type["connection_stability"]
    assert "weakest part is resource (45.0)" in by_type["quality_score"]
    assert set(by_type) == {
        "task_completion",
        "uptime",
        "quality_score",
        "error_rate",
        "latency",
        "heartbeat",
        "training_time",
        "resource_efficiency",
        "connection_stability",
        "model_quality",
        "data_quality",
    }


def test_sla_thresholds_drive_the_sla_rules() -> None:
    sla = SLA(max_latency=100, min_model_quality=50)
    o = obs(latency_ms=150.0, model_quality=60.0)
    types = {c.alert_type for c in q.participant_alerts(o, scores(o, sla), sla)}
    assert "latency" in types and "model_quality" not in types
    assert "latency" not in alert_types(o) and "model_quality" in alert_types(o)  # defaults


def test_unmeasured_figures_raise_no_alert() -> None:
    o = obs(latency_ms=float("nan"), uptime_pct=None, training_time_ms=float("inf"))
    assert alert_types(o) == set()


def test_alert_condition_to_dict() -> None:
    o = obs(uptime_pct=50.0)
    (c,) = [c for c in q.participant_alerts(o, scores(o), DEFAULT) if c.alert_type == "uptime"]
    assert isinstance(c, AlertCondition)
    assert c.to_dict() == {
        "alert_type": "uptime",
        "severity": "critical",
        "entity_id": "peer-A",
        "message": c.message,
        "value": 50.0,
        "threshold": 90.0,
        "session_id": None,
    }


# --- session alert rules ------------------------------------------------------------------------


@pytest.mark.parametrize(("ok", "alerted"), [(95, False), (94, True), (96, False)])
def test_privacy_compliance_rule(ok: int, alerted: bool) -> None:
    o = session(privacy_required=True, rounds_run=100, rounds_privacy_ok=ok)
    conds = q.session_alerts(o, q.session_scores(o, DEFAULT), DEFAULT)
    assert ("privacy_compliance" in {c.alert_type for c in conds}) is alerted
    if alerted:
        (c,) = conds
        assert (c.severity, c.entity_id, c.session_id) == ("high", "S1", "S1")
        assert c.value == pytest.approx(94.0) and c.threshold == 95.0
        assert "94 of 100 rounds" in c.message


@pytest.mark.parametrize(
    ("pct", "alerted"), [(10.0, False), (10.1, True), (9.9, False), (None, False)]
)
def test_anomaly_rule(pct: float | None, alerted: bool) -> None:
    o = session(anomalous_last_round_pct=pct)
    assert ("anomaly" in session_alert_types(o)) is alerted


@pytest.mark.parametrize(("violations", "alerted"), [(1, False), (2, True), (0, False)])
def test_security_score_rule(violations: int, alerted: bool) -> None:
    sla = SLA(min_security_score=80)  # 1 violation = 80: at the threshold
    o = session(security_violations=violations)
    types = session_alert_types(o, sla)
    assert ("security_score" in types) is alerted
    assert session_alert_types(session(security_violations=1)) == {"security_score"}  # 80 < 90


@pytest.mark.parametrize(
    ("accuracies", "alerted"),
    [
        ([0.1, 0.5, 0.7, 0.9, 0.9], False),  # converged at round 3 = the SLA's rounds
        ([0.1, 0.5, 0.7, 0.8, 0.9], True),  # best only at round 4: one round late
        ([0.1, 0.9, 0.9, 0.9], False),  # converged at round 1, well within
        ([0.1, 0.5, 0.7], False),  # fewer rounds than the SLA's so far
        ([0.5, 0.4, 0.45, 0.3], True),  # never beat the initial model
    ],
)
def test_convergence_rule(accuracies: list[float], alerted: bool) -> None:
    sla = SLA(min_convergence_rate=3)
    o = session(accuracies=accuracies)
    conds = [
        c
        for c in q.session_alerts(o, q.session_scores(o, sla), sla)
        if c.alert_type == "convergence"
    ]
    assert bool(conds) is alerted
    if alerted:
        assert conds[0].severity == "low" and conds[0].threshold == 3.0
        assert "not converged within 3 rounds" in conds[0].message


def test_healthy_session_raises_nothing() -> None:
    o = session(
        accuracies=[0.1, 0.8, 0.9, 0.9],
        rounds_run=3,
        privacy_required=True,
        rounds_privacy_ok=3,
        anomalous_last_round_pct=0.0,
    )
    assert session_alert_types(o) == set()


def test_alert_types_cover_the_table() -> None:
    assert set(alerts.ALERT_SEVERITY.values()) <= set(alerts.SEVERITIES)
    assert alerts.ALERT_SEVERITY["security_violation"] == "critical"
    assert alerts.ALERT_SEVERITY["model_divergence"] == "high"
    assert len(alerts.ALERT_SEVERITY) == 21
    assert alerts.ALERT_SEVERITY["privacy_budget"] == "medium"  # a warning: it still trains
    assert alerts.ALERT_SEVERITY["storage_unavailable"] == "critical"
    assert alerts.ALERT_SEVERITY["aggregate_rejected"] == "high"
    assert alerts.ALERT_SEVERITY["quarantined"] == "critical"  # it blocks selection


# --- properties ---------------------------------------------------------------------------------

any_float = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
any_int = st.one_of(
    st.integers(min_value=-10, max_value=10**9),
    st.integers(min_value=-(10**400), max_value=10**400),
)


def _in_range(v: object) -> bool:
    return v is None or (isinstance(v, float | int) and math.isfinite(v) and 0 <= v <= 100)


valid_sla = st.builds(
    SLA,
    max_training_time=st.floats(min_value=1e-3, max_value=86_400_000),
    max_latency=st.floats(min_value=1e-3, max_value=600_000),
    min_convergence_rate=st.integers(min_value=1, max_value=100_000),
    min_model_quality=st.floats(min_value=0, max_value=100),
)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        ParticipantObservation,
        peer_id=st.just("p"),
        training_time_ms=any_float,
        tasks_selected=any_int,
        tasks_completed=any_int,
        tasks_failed=any_int,
        model_quality=any_float,
        data_quality=any_float,
        uptime_pct=any_float,
        heartbeat_consistency_pct=any_float,
        latency_ms=any_float,
        bandwidth_mbps=any_float,
        disconnects=any_int,
        cpu_efficiency_pct=any_float,
        memory_efficiency_pct=any_float,
        security_violations=any_int,
    ),
    valid_sla,
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=8),
)
def test_participant_scores_always_in_range(
    o: ParticipantObservation, sla: SLA, history: list[float]
) -> None:
    s = q.participant_scores(o, sla, history)
    for f in fields(s):
        if f.name != "trend":
            assert _in_range(getattr(s, f.name)), f.name
    assert math.isfinite(s.overall)
    assert s.trend in {"improving", "stable", "declining"}
    for c in q.participant_alerts(o, s, sla):
        json.dumps(c.to_dict(), allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(
    st.builds(
        SessionObservation,
        session_id=st.just("S"),
        accuracies=st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12),
        rounds_run=any_int,
        first_selected=st.lists(st.sampled_from("abcd"), max_size=4),
        last_contributors=st.lists(st.sampled_from("abcde"), max_size=5),
        updates_accepted=any_int,
        updates_rejected_integrity=any_int,
        bytes_moved=any_int,
        bytes_ideal=any_int,
        privacy_required=st.booleans(),
        rounds_privacy_ok=any_int,
        security_violations=any_int,
        participant_quality=any_float,
        anomalous_last_round_pct=any_float,
    ),
    valid_sla,
)
def test_session_scores_always_in_range(o: SessionObservation, sla: SLA) -> None:
    s = q.session_scores(o, sla)
    for f in fields(s):
        if f.name != "convergence_rate":
            assert _in_range(getattr(s, f.name)), f.name
    assert math.isfinite(s.health)
    for c in q.session_alerts(o, s, sla):
        json.dumps(c.to_dict(), allow_nan=False)


@given(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True)
)
def test_model_quality_score_always_in_range(before: float, after: float) -> None:
    v = q.model_quality_score(before, after)
    assert math.isfinite(v) and 0 <= v <= 100


@st.composite
def reports(draw: st.DrawFn) -> dict[str, Any]:
    rows = draw(st.integers(min_value=0, max_value=10**6))
    counts = draw(st.lists(st.integers(min_value=0, max_value=10**6), max_size=12))
    if sum(counts) > rows:
        rows = sum(counts)
    return {
        "rows": rows,
        "missing": draw(st.integers(min_value=0, max_value=rows)),
        "duplicates": draw(st.integers(min_value=0, max_value=rows)),
        "label_counts": {str(i): c for i, c in enumerate(counts)},
    }


@given(reports())
def test_data_quality_score_always_in_range(r: dict[str, Any]) -> None:
    v = q.data_quality_score(r)
    assert math.isfinite(v) and 0 <= v <= 100


@given(st.dictionaries(st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True)))
def test_anomalous_flags_a_subset_with_every_non_finite(d: dict[str, float]) -> None:
    out = q.anomalous(d)
    assert out <= set(d)
    assert {k for k, v in d.items() if not math.isfinite(v)} <= out


def test_a_report_of_many_labels_fits_the_wire() -> None:
    """An honest participant with more labels than the wire takes folds the rarest under
    "(other)" instead of being refused at registration."""
    from protocol import messages

    y = np.concatenate([np.zeros(500), np.arange(1, 2501)])  # label 0 common, 2500 rare
    r = q.data_report(np.arange(3000, dtype=float).reshape(-1, 1), y)
    assert len(r["label_counts"]) == messages.MAX_LABELS
    assert r["label_counts"]["0"] == 500
    assert sum(r["label_counts"].values()) == 3000
    assert r["label_counts"][q.OTHER_LABELS] == 2500 - (messages.MAX_LABELS - 2)
    assert messages._data_report("data_report", r) == r
    long = q.data_report(np.zeros((2, 1)), np.array(["x" * 100 + "a", "x" * 100 + "b"]))
    assert long["label_counts"] == {"x" * messages.MAX_LABEL_CHARS: 2}
