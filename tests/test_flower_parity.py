"""fednode's aggregation arithmetic equals Flower 1.41's on the same inputs (float32 tolerance).

flwr is not a dependency: the comparison needs its own venv (tests/compat/README.md). Where
that venv is absent the comparisons are skipped, saying how to create it; FEDNODE_FLWR_VENV
names a venv elsewhere. Each comparison takes about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fednode.strategies import aggregate
from tests.compat import flower_parity


@pytest.fixture
def flwr_venv() -> Path:
    venv = Path(os.environ.get("FEDNODE_FLWR_VENV", flower_parity.DEFAULT_VENV))
    if not flower_parity.venv_ready(venv):
        pytest.skip("flwr venv not found: run python tests/compat/flower_parity.py --setup")
    return venv


def test_aggregation_matches_flower(flwr_venv: Path) -> None:
    report = flower_parity.run(flwr_venv, seed=0)
    assert report.flwr_version.startswith("1.")
    # every function is compared, each on several cases
    for group in flower_parity.FLOWER_NAME:
        assert sum(o.case.group == group for o in report.outcomes) >= 8, group
    assert report.ok, flower_parity.table(report)


def test_a_wrong_rule_is_caught(flwr_venv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: Krum counting one attacker too few, a trimmed mean that
    rounds the cut instead of flooring it, and an unweighted mean each differ from Flower."""
    real = flower_parity.ours_functions()
    wrong = dict(real)
    wrong["krum"] = lambda r, num_malicious, num_selected: aggregate.krum(
        r, max(0, num_malicious - 1), num_selected
    )
    wrong["trimmed_mean"] = lambda r, beta: aggregate.trimmed_mean(
        r, min(0.49, (round(beta * len(r)) + 0.01) / len(r))
    )
    wrong["weighted_mean"] = lambda r: aggregate.weighted_mean([(a, 1.0) for a, _ in r])
    monkeypatch.setattr(flower_parity, "ours_functions", lambda: wrong)
    report = flower_parity.run(flwr_venv, seed=0)
    failed = {o.case.group for o in report.outcomes if not o.ok}
    assert failed == {"krum", "trimmed_mean", "weighted_mean"}
    assert "FAIL" in flower_parity.table(report)


def test_tolerance_is_float32(tmp_path: Path) -> None:
    """Without Flower: a float32 rounding of the answer passes, a 1e-3 error fails, and a
    refusal on one side only fails."""
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    case = flower_parity.Case("c", "median", [([x], 1), ([x], 2)], {}, "aggregate_median", {})
    ref = tmp_path / "flwr_c.npz"

    def outcome(theirs: np.ndarray, error: str | None = None) -> flower_parity.Outcome:
        np.savez(ref, a0=theirs)
        return flower_parity.compare(case, aggregate.median, error, ref)

    assert outcome(np.nextafter(x, np.float32(2))).ok
    assert not outcome(x + np.float32(1e-3)).ok
    assert not outcome(x, error="ValueError: refused").ok
    refused = flower_parity.Case(
        "c", "median", [([x], 1)], {}, "aggregate_median", {}, expect_error=True
    )
    assert not flower_parity.compare(refused, aggregate.median, "ValueError: x", ref).ok
