"""fednode.bounds: how much one participant may weigh and move the model (pure rules)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode import bounds


def test_a_claim_is_bounded_by_the_registration_and_max_examples() -> None:
    kw = {"weighting": "examples", "max_examples": 0}
    assert bounds.bounded_weight(10**12, 479, **kw) == 479.0  # the probe's claim
    assert bounds.bounded_weight(100, 479, **kw) == 100.0  # fewer than registered: taken
    assert bounds.bounded_weight(10**12, None, **kw) == 10**12  # nothing registered
    assert bounds.bounded_weight(-5, 479, **kw) == 0.0
    assert bounds.bounded_weight(10**12, 479, weighting="examples", max_examples=50) == 50.0
    assert bounds.bounded_weight(10**12, 479, weighting="uniform", max_examples=50) == 1.0


def test_no_share_exceeds_the_cap_and_the_excess_goes_to_the_others() -> None:
    shares = bounds.capped_shares({"a": 10**12, "b": 479, "c": 479}, 0.5)
    assert shares["a"] == pytest.approx(0.5)
    assert shares["b"] == pytest.approx(0.25) and shares["c"] == pytest.approx(0.25)
    # b was over the cap alone; a and c keep their ratio 1:3 in what is left
    shares = bounds.capped_shares({"a": 100, "b": 10_000, "c": 300}, 0.5)
    assert shares == pytest.approx({"a": 0.125, "b": 0.5, "c": 0.375})


def test_a_cap_that_cannot_hold_shares_equally() -> None:
    assert bounds.capped_shares({"a": 1, "b": 100}, 0.4) == {"a": 0.5, "b": 0.5}
    assert bounds.capped_shares({"a": 0, "b": 0}, 0.5) == {"a": 0.5, "b": 0.5}
    assert bounds.capped_shares({}, 0.5) == {}


@given(
    st.lists(st.floats(0, 1e15, allow_nan=False), min_size=1, max_size=30),
    st.floats(0.01, 1.0),
)
def test_capped_shares_sum_to_one_and_respect_the_cap(w: list[float], cap: float) -> None:
    shares = bounds.capped_shares({f"p{i}": x for i, x in enumerate(w)}, cap)
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-9)
    if cap * len(w) >= 1.0:
        assert max(shares.values()) <= cap + 1e-9
    else:
        assert len(set(shares.values())) == 1


def test_integer_weights_keep_the_shares_within_max_weight() -> None:
    got = bounds.integer_weights({"a": 0.5, "b": 0.25, "c": 0.25}, 958.0, 65_536)
    assert got == {"a": 479, "b": 240, "c": 240} or got == {"a": 479, "b": 239, "c": 239}
    big = bounds.integer_weights({"a": 0.5, "b": 0.5}, 10**9, 1000)
    assert big == {"a": 1000, "b": 1000}
    assert min(bounds.integer_weights({"a": 0.999, "b": 0.001}, 10, 65_536).values()) >= 1


def _model(scale: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 4), scale, dtype=np.float32), "b": np.full(4, scale, np.float32)}


def test_an_update_beyond_the_norm_is_scaled_down_to_it() -> None:
    base, w = _model(1.0), _model(1001.0)  # update of 1000 per value, 16 values: norm 4000
    out, norm, scale = bounds.clip_update(w, base, 10.0)
    assert norm == pytest.approx(4000.0)
    assert scale == pytest.approx(10.0 / 4000.0)
    assert bounds.update_norm(out, base) == pytest.approx(10.0, rel=1e-5)
    assert out["w"].dtype == np.float32


def test_an_update_within_the_norm_or_with_no_bound_is_untouched() -> None:
    base, w = _model(1.0), _model(1.5)
    assert bounds.clip_update(w, base, 10.0)[0] is w
    assert bounds.clip_update(_model(1001.0), base, 0.0)[2] == 1.0


def test_loss_jumps() -> None:
    assert bounds.loss_jumped(68_274_676.0, 0.4, 3.0)  # the probe's published model
    assert bounds.loss_jumped(float("nan"), 0.4, 3.0)
    assert bounds.loss_jumped(float("inf"), 0.4, 0.0)  # factor 0 still checks finiteness
    assert not bounds.loss_jumped(1.19, 0.4, 3.0)
    assert not bounds.loss_jumped(50.0, 0.4, 0.0)
    assert not bounds.loss_jumped(50.0, float("nan"), 3.0)  # no finite reference: no ratio
