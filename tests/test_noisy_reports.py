"""Noisy reports (fednode.noisy_reports): a participant's data report released through the
Laplace mechanism: the stated scale (statistical), and outputs that stay valid reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fednode import quality
from fednode.noisy_reports import REPORT_SENSITIVITY, ReportPrivacy, noisy_report
from protocol import messages
from protocol import spec as specmod


def test_each_figure_gets_laplace_noise_of_scale_sensitivity_over_epsilon() -> None:
    """Laplace(b) has std b·sqrt(2); b = 2 / ε. 4000 reports with counts far from the
    clamps: the std of each figure within 5 % (a std from 4000 draws of a Laplace is off by
    about 2.7 % at one sd), the mean unbiased."""
    exact = {
        "rows": 1_000_000,
        "missing": 5000,
        "duplicates": 7000,
        "label_counts": {str(k): 50_000 + k for k in range(10)},
    }
    priv = ReportPrivacy(epsilon=0.5, classes=10)
    assert priv.scale == REPORT_SENSITIVITY / 0.5 == 4.0
    rng = np.random.default_rng(11)
    out = [noisy_report(exact, priv, rng) for _ in range(4000)]
    want = priv.scale * math.sqrt(2)
    for name, get in [
        ("missing", lambda r: r["missing"]),
        ("duplicates", lambda r: r["duplicates"]),
        ("label 3", lambda r: r["label_counts"]["3"]),
    ]:
        values = np.array([get(r) for r in out], dtype=float)
        truth = get(exact)
        assert values.std() == pytest.approx(want, rel=0.05), name
        assert abs(values.mean() - truth) < 4 * want / math.sqrt(len(values)), name
    assert all(r["rows"] == exact["rows"] for r in out)  # released as is (num_examples)


def test_outputs_stay_valid_reports_with_every_class_listed() -> None:
    """Tiny counts and a small ε: the noise is much larger than the figures, yet every
    output is a report the wire and fednode.quality accept, with the spec's classes as
    keys (zeros too), counts in [0, rows] summing to at most rows."""
    exact = {"rows": 3, "missing": 0, "duplicates": 1, "label_counts": {"1": 3}}
    priv = ReportPrivacy(epsilon=0.1, classes=4)
    rng = np.random.default_rng(5)
    for _ in range(500):
        r = noisy_report(exact, priv, rng)
        assert set(r["label_counts"]) == {"0", "1", "2", "3"}
        assert 0 <= r["missing"] <= 3 and 0 <= r["duplicates"] <= 3
        assert all(0 <= c <= 3 for c in r["label_counts"].values())
        assert sum(r["label_counts"].values()) <= 3
        assert messages.Register("digits:0/1", 3, "1", data_report=r).data_report == r
        assert 0.0 <= quality.data_quality_score(r) <= 100.0
    assert noisy_report({}, priv, rng) == {}


def test_which_specs_ask_for_noisy_reports() -> None:
    assert ReportPrivacy.of_spec(specmod.validate({})) is None
    on = specmod.validate({"privacy": {"noisy_reports": True, "report_epsilon": 2.0}})
    assert ReportPrivacy.of_spec(on) == ReportPrivacy(2.0, 10)
    reg = specmod.validate(
        {
            "model": {"kind": "mlp", "task": "regression", "inputs": 4, "classes": 1},
            "data": {"dataset": "none"},
            "evaluation": {"on": "participants"},
            "privacy": {"noisy_reports": True},
        }
    )
    priv = ReportPrivacy.of_spec(reg)
    assert priv is not None and priv.classes is None
    rep = noisy_report({"rows": 9, "missing": 0, "duplicates": 0, "label_counts": {"0.5": 9}}, priv)
    assert rep["label_counts"] == {}  # real-valued labels have no fixed keys to release
