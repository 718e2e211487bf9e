"""Sampling participants per round ([selection]): the pure decisions of fednode.rounds
(plan_selection, sample, RoundRun's over-selection close) on plain data, the spec's
cross-checks, and how a spare that was not needed reaches the quality history (a real
Ledger on tmp_path, no network)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fednode import rounds
from fednode.ledger import Ledger
from fednode.monitor import QualityMonitor
from fednode.quality import SLA
from fednode.rounds import RoundRun, SelectionPlan, plan_selection, round_rng, sample
from protocol import selection
from protocol import spec as specmod
from protocol.errors import SpecError
from protocol.lifecycle import RoundPhase

PEERS = [f"peer{i:02d}" for i in range(20)]


def plan(eligible: int, **kw: float) -> SelectionPlan | None:
    args = {"min_participants": 1, "max_participants": 0, "fraction": 0.0, "over_selection": 0.0}
    return plan_selection(eligible, **{**args, **kw})  # type: ignore[arg-type]


# --- how many ------------------------------------------------------------------------------


def test_fraction_rounds_up_and_is_bounded_by_min_and_max() -> None:
    assert plan(30, fraction=0.1) == SelectionPlan(3, 3)  # 0.1 x 30 is 3.0000000000000004
    assert plan(10, fraction=0.25) == SelectionPlan(3, 3)  # ceil(2.5)
    assert plan(10, fraction=0.1, min_participants=4) == SelectionPlan(4, 4)
    assert plan(1000, fraction=0.5, max_participants=100) == SelectionPlan(100, 100)
    assert plan(10, fraction=1.0) == SelectionPlan(10, 10)
    # without a fraction: as before, max_participants, else every eligible peer
    assert plan(7) == SelectionPlan(7, 7)
    assert plan(7, max_participants=5) == SelectionPlan(5, 5)
    # fewer eligible than min_participants: wait (the driver's None)
    assert plan(2, min_participants=3, fraction=0.5) is None


def test_over_selection_asks_more_never_more_than_are_eligible() -> None:
    p = plan(10, max_participants=3, over_selection=0.25)
    assert p == SelectionPlan(3, 4) and p.spares  # ceil(3 x 1.25)
    assert plan(100, max_participants=10, over_selection=0.3) == SelectionPlan(10, 13)
    assert plan(4, max_participants=3, over_selection=1.0) == SelectionPlan(3, 4)  # capped
    assert not plan(3, max_participants=3, over_selection=1.0).spares  # nobody to spare
    assert plan(50, fraction=0.1, over_selection=0.2) == SelectionPlan(5, 6)


# --- who -----------------------------------------------------------------------------------


def test_first_keeps_todays_order() -> None:
    assert sample(["c", "a", "b"], {}, 2, "first", round_rng(0, 1)) == ["c", "a"]
    assert sample(["c", "a"], {}, 5, "first", round_rng(0, 1)) == ["c", "a"]


def test_random_draws_are_reproducible_and_differ_across_rounds() -> None:
    def draw(seed: int, number: int, order: list[str] = PEERS) -> list[str]:
        return sample(order, {}, 5, "random", round_rng(seed, number))

    assert draw(7, 1) == draw(7, 1)  # the same session replays the same selections
    assert draw(7, 1) == draw(7, 1, list(reversed(PEERS)))  # not who connected first
    per_round = {tuple(draw(7, n)) for n in range(1, 11)}
    assert len(per_round) >= 9  # C(20, 5) = 15504: ten rounds hardly ever repeat
    assert draw(7, 1) != draw(8, 1)
    assert all(len(set(d)) == 5 and set(d) <= set(PEERS) for d in per_round)


def test_random_is_uniform() -> None:
    """Each of 20 peers is picked 5/20 of the time (2000 rounds: 500 each, sd about 19)."""
    counts = Counter(
        p for n in range(2000) for p in sample(PEERS, {}, 5, "random", round_rng(3, n))
    )
    assert all(420 < counts[p] < 580 for p in PEERS), counts


def test_quality_weighting_prefers_high_scores_and_shuts_nobody_out() -> None:
    """10 peers scored 90, 10 scored 0 (weight QUALITY_FLOOR = 5): picking 3 of 20 in 2000
    seeded rounds, a 90 peer comes out many times as often as a 0 one, and a 0 one still
    comes out."""
    scores: dict[str, float | None] = {p: (90.0 if i < 10 else 0.0) for i, p in enumerate(PEERS)}
    counts = Counter(
        p for n in range(2000) for p in sample(PEERS, scores, 3, "quality", round_rng(1, n))
    )
    high = sum(counts[p] for p in PEERS[:10])
    low = sum(counts[p] for p in PEERS[10:])
    assert high + low == 6000
    assert high > 8 * low, (high, low)  # weights 90 : 5 = 18 : 1 per draw
    assert min(counts[p] for p in PEERS[10:]) > 0  # the floor: everyone may be picked
    # reproducible as random is
    assert sample(PEERS, scores, 3, "quality", round_rng(1, 4)) == sample(
        list(reversed(PEERS)), scores, 3, "quality", round_rng(1, 4)
    )


def test_quality_weight_floor_and_unscored() -> None:
    assert rounds.quality_weight(None) == selection.QUALITY_UNSCORED
    assert rounds.quality_weight(float("nan")) == selection.QUALITY_UNSCORED
    assert rounds.quality_weight(0.0) == selection.QUALITY_FLOOR
    assert rounds.quality_weight(80.0) == 80.0
    # an unscored newcomer (50) against a peer scored 100: picked about a third of the time
    picks = Counter(
        sample(["new", "good"], {"good": 100.0}, 1, "quality", round_rng(0, n))[0]
        for n in range(3000)
    )
    assert 850 < picks["new"] < 1150, picks


def test_sample_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="bogus"):
        sample(PEERS, {}, 2, "bogus", np.random.default_rng(0))


# --- when the round closes -----------------------------------------------------------------


def _round(needed: int) -> RoundRun:
    rnd = RoundRun(1, "bafy", ["a", "b", "c", "slow"], 0.0, RoundPhase.TRAINING)
    rnd.needed = needed
    return rnd


def test_over_selection_closes_at_the_needed_count_and_spares_are_not_dropped() -> None:
    rnd = _round(needed=3)
    for i, peer in enumerate(["a", "b"]):
        rnd.received[peer] = (None, float(i))  # type: ignore[assignment]
    assert not rnd.closed(now=1.0, end=100.0)
    rnd.received["c"] = (None, 2.0)  # type: ignore[assignment]
    assert rnd.closed(now=2.0, end=100.0)  # long before the deadline
    rnd.cut()
    rnd.time_out()  # what the driver calls next: nobody is left to time out
    assert rnd.not_needed == ["slow"]
    assert rnd.failed == {} and rnd.dropped == [] and not rnd.outstanding


def test_a_failure_does_not_count_toward_the_needed_updates() -> None:
    rnd = _round(needed=3)
    rnd.received["a"] = (None, 0.0)  # type: ignore[assignment]
    rnd.received["b"] = (None, 0.0)  # type: ignore[assignment]
    rnd.failed["c"] = "rejected: CID_MISMATCH"
    assert not rnd.closed(now=1.0, end=100.0)  # still waits for the spare
    assert rnd.closed(now=100.0, end=100.0)
    rnd.cut()  # not enough: no-op
    rnd.time_out()
    assert rnd.not_needed == [] and rnd.dropped == ["c", "slow"]


def test_without_over_selection_a_round_waits_for_everyone() -> None:
    rnd = _round(needed=0)
    for peer in ["a", "b", "c"]:
        rnd.received[peer] = (None, 0.0)  # type: ignore[assignment]
    assert not rnd.closed(now=1.0, end=100.0)
    rnd.cut()
    assert rnd.not_needed == []


# --- the spec ------------------------------------------------------------------------------


def test_selection_defaults_select_as_before() -> None:
    assert specmod.validate({})["selection"] == {
        "fraction": 0.0,
        "method": "first",
        "seed": 0,
        "over_selection": 0.0,
    }


def test_quality_weighting_is_refused_with_central_dp() -> None:
    with pytest.raises(SpecError, match="uniform sample") as err:
        specmod.validate({"selection": {"method": "quality"}, "privacy": {"mode": "central_dp"}})
    assert "selection.method" in err.value.message
    specmod.validate({"selection": {"method": "random"}, "privacy": {"mode": "central_dp"}})


def test_over_selection_is_refused_with_secure_aggregation() -> None:
    with pytest.raises(SpecError, match="roster") as err:
        specmod.validate({"selection": {"over_selection": 0.2}, "aggregation": {"secure": True}})
    assert "selection.over_selection" in err.value.message


@pytest.mark.parametrize(
    ("field", "value"), [("fraction", 1.5), ("over_selection", -0.1), ("method", "fastest")]
)
def test_bad_selection_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SpecError, match=f"selection.{field}"):
        specmod.validate({"selection": {field: value}})


# --- the spare's quality history -----------------------------------------------------------

SID = "s1"


@pytest.fixture
def led(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(tmp_path / "node" / "ledger.db") as ledger:
        ledger.create_session(
            SID,
            name="n",
            spec={},
            strategy="fedavg",
            secure_aggregation=False,
            rounds=9,
            created_at=1.0,
        )
        yield ledger


def test_a_spare_not_needed_is_no_task_in_the_quality_history(led: Ledger) -> None:
    """Round 1 asked a and slow, needed one update: a's arrived, slow was not needed. The
    ledger's history (a restarted coordinator starts from it) and the monitor's own count
    leave slow's selection out; a's counts as completed."""
    led.start_round(SID, 1, selected=["a", "slow"], model_cid_in="bafy", started_at=1.0)
    led.record_update(
        SID,
        1,
        participant="a",
        samples=10,
        loss=0.5,
        bytes=100,
        duration_s=0.1,
        arrival_s=0.2,
        update_cid="bafyu",
        received_at=1.5,
    )
    led.finish_round(SID, 1, status="failed", ended_at=1.9)
    data = {"round": 1, "participants": ["a"], "dropped": [], "not_needed": ["slow"]}
    led.append_event("round_completed", session_id=SID, data=data)
    assert led.recent_task_outcomes("slow", 20) == []
    assert led.recent_task_outcomes("a", 20) == [(SID, 1, "completed")]

    mon = QualityMonitor(led, SLA(), heartbeat_s=1.0)
    rnd = RoundRun(2, "bafy", ["a", "slow"], time.time(), RoundPhase.DONE)
    rnd.not_needed = ["slow"]
    mon.on_connect("slow", time.time(), {})
    mon.after_round(_Run(), rnd, None)
    obs = mon.observation("slow", time.time())
    assert (obs.tasks_selected, obs.tasks_failed) == (0, 0)
    assert mon.observation("a", time.time()).tasks_failed == 1  # a was waited for, and failed


class _Run:
    """The little of a session run that the monitor's after_round reads."""

    def __init__(self) -> None:
        self.session_id = SID
        self.spec = specmod.validate({})
        self.shapes: dict[str, tuple[int, ...]] = {"w": (2,)}
