"""The round engine's pure core (fednode.rounds, fednode.resume): each decision on plain data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fednode import rounds
from fednode.codecs import CodecParams, get_codec
from fednode.resume import resume_point
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate
from fednode.weights import to_bytes
from protocol import messages
from protocol import spec as specmod
from protocol.cid import file_cid
from protocol.errors import ValidationError
from protocol.lifecycle import RoundPhase

AGG = specmod.defaults()["aggregation"]
BASE = {"w": np.zeros(4, dtype=np.float32)}


def collecting(selected: list[str]) -> rounds.RoundRun:
    rnd = rounds.RoundRun(3, "bafyround", selected, started_at=100.0)
    rnd.phase = RoundPhase.TRAINING
    return rnd


def update(w: np.ndarray, *, round_no: int = 3, base: str = "bafyround") -> messages.Update:
    data = to_bytes({"w": w})
    return messages.Update(
        round=round_no,
        base_cid=base,
        update_cid=file_cid(data),
        data=data,
        num_examples=10,
        loss=0.5,
        train_s=0.1,
    )


def decode(data: bytes) -> dict[str, np.ndarray]:
    return get_codec("identity").decode(data, {"w": (4,)}, CodecParams())


# --- selection -----------------------------------------------------------------------------


def test_eligible_keeps_admitted_online_peers_not_excluded_in_order() -> None:
    names = {"a": {"a"}, "b": {"b", "invite:x"}, "c": {"c"}, "d": {"d"}}
    got = rounds.eligible(["d", "a", "b", "c"], names.__getitem__, {"a", "invite:x", "c"}, {"c"})
    assert got == ["a", "b"]  # d not admitted, c excluded; online order kept


def test_select_waits_below_the_minimum_and_caps_at_the_maximum() -> None:
    assert rounds.select(["a"], 2, 0) is None
    assert rounds.select(["a", "b", "c"], 2, 0) == ["a", "b", "c"]
    assert rounds.select(["a", "b", "c"], 2, 2) == ["a", "b"]


def test_after_a_restart_the_first_round_waits_for_the_cut_rounds_peers_until_the_grace() -> None:
    assert not rounds.regathered(["a", "b"], ("a", "b", "c"), now=1.0, until=5.0)
    assert rounds.regathered(["c", "a", "b", "d"], ("a", "b", "c"), now=1.0, until=5.0)
    assert rounds.regathered(["a"], ("a", "b", "c"), now=5.0, until=5.0)  # not forever


# --- acceptance ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "round_no", "phase", "code"),
    [
        ("a", 2, RoundPhase.TRAINING, "STALE_UPDATE"),  # an earlier round
        ("a", 3, RoundPhase.AGGREGATING, "STALE_UPDATE"),  # no longer collecting
        ("z", 3, RoundPhase.TRAINING, "NOT_SELECTED"),
        ("b", 3, RoundPhase.TRAINING, "DUPLICATE_UPDATE"),  # b already answered
    ],
)
def test_turn_refusals_name_their_code_and_leave_the_round_alone(
    peer: str, round_no: int, phase: RoundPhase, code: str
) -> None:
    rnd = collecting(["a", "b"])
    rnd.phase = phase
    rnd.received["b"] = (update(np.ones(4, np.float32)), 1.0)
    with pytest.raises(ValidationError) as err:
        rounds.check_turn(rnd, "s1", peer, round_no)
    assert err.value.code == code
    assert rnd.failed == {} and set(rnd.received) == {"b"}


def test_no_round_at_all_is_stale() -> None:
    with pytest.raises(ValidationError) as err:
        rounds.check_turn(None, "s1", "a", 1)
    assert err.value.code == "STALE_UPDATE"


def test_a_good_update_passes_both_checks() -> None:
    rnd = collecting(["a"])
    rounds.check_turn(rnd, "s1", "a", 3)
    rounds.check_content(rnd, update(np.ones(4, np.float32)), decode)


def test_content_refusals() -> None:
    rnd = collecting(["a"])
    with pytest.raises(ValidationError) as err:
        rounds.check_content(rnd, update(np.ones(4, np.float32), base="bafyother"), decode)
    assert err.value.code == "WRONG_BASE"
    forged = dataclasses.replace(update(np.ones(4, np.float32)), update_cid=file_cid(b"x"))
    with pytest.raises(ValidationError) as err:
        rounds.check_content(rnd, forged, decode)
    assert err.value.code == "CID_MISMATCH"
    with pytest.raises(ValidationError) as err:
        rounds.check_content(rnd, update(np.full(4, np.nan, np.float32)), decode)
    assert "finite" in err.value.message


def test_a_compressed_update_a_codec_refuses_is_left_out() -> None:
    """The session decodes an update through the round's codec after checking its CID; a
    payload the codec refuses (bytes a hostile participant wrote and then named by their
    CID) fails the update with BAD_UPDATE."""
    p = CodecParams(fraction=0.5)
    topk = get_codec("topk")
    good = topk.encode({"w": np.array([0.0, 3.0, 0.0, -4.0], np.float32)}, p)
    assert np.array_equal(topk.decode(good, {"w": (4,)}, p)["w"], [0, 3.0, 0, -4.0])
    # byte 10 is the index bitmap (d = 4: bitmap beats varints): 0x0a = indices 1 and 3
    assert good[10] == 0x0A
    out_of_range, three = good[:10] + b"\x1a" + good[11:], good[:10] + b"\x0b" + good[11:]
    nan = good[:-4] + np.array([np.nan], "<f4").tobytes()
    rnd = collecting(["a"])
    for bad in (good[:-1], good + b"\0", out_of_range, three, nan):
        msg = dataclasses.replace(
            update(np.ones(4, np.float32)), data=bad, update_cid=file_cid(bad)
        )
        with pytest.raises(ValidationError) as err:
            rounds.check_content(rnd, msg, lambda d: topk.decode(d, {"w": (4,)}, p))
        assert err.value.code == "BAD_UPDATE", err.value.message


def test_the_round_closes_when_all_answered_or_at_the_deadline() -> None:
    rnd = collecting(["a", "b", "c"])
    assert not rnd.closed(now=5.0, end=10.0)
    rnd.received["a"] = (update(np.ones(4, np.float32)), 1.0)
    rnd.failed["b"] = "left"
    assert not rnd.closed(now=5.0, end=10.0)
    assert rnd.closed(now=10.0, end=10.0)
    rnd.time_out()
    assert rnd.failed["c"] == "no update before the round timeout"
    assert rnd.closed(now=0.0, end=10.0) and rnd.dropped == ["b", "c"]


# --- the aggregate -------------------------------------------------------------------------


def test_bounded_updates_cap_a_claim_and_clip_a_step() -> None:
    agg = {**AGG, "max_update_norm": 1.0, "max_weight_share": 0.5}
    big = ClientUpdate("evil", {"w": np.full(4, 1000.0, np.float32)}, 10**12, 0.1)
    ok = [ClientUpdate(p, {"w": np.full(4, 0.1, np.float32)}, 100, 0.1) for p in ("a", "b")]
    out, figures = rounds.bound_updates([big, *ok], BASE, {"evil": 100, "a": 100, "b": 100}, agg)
    assert figures["evil"]["weight"] == figures["a"]["weight"]  # counted as registered
    assert max(f["share"] for f in figures.values()) <= 0.5
    assert figures["evil"]["scale"] < 1e-3
    assert np.linalg.norm(out[0].weights["w"]) == pytest.approx(1.0, rel=1e-5)
    new, _ = get_strategy("fedavg").aggregate(BASE, out, {})
    assert np.linalg.norm(new["w"]) < 1.0  # one peer cannot move the model further


def test_secure_weights_are_whole_numbers_bounded_like_a_claim() -> None:
    w = rounds.secure_weights(["a", "b", "c"], {"a": 10, "b": 10, "c": 10**9}, AGG, 1000)
    assert all(isinstance(v, int) and 1 <= v <= 1000 for v in w.values())
    assert w["a"] == w["b"]
    assert w["c"] / sum(w.values()) <= AGG["max_weight_share"] + 0.01  # the cap holds


# --- publish, roll back --------------------------------------------------------------------


def test_verdict() -> None:
    good = {"w": np.ones(4, np.float32)}
    assert rounds.verdict(good, 0.5, 0.9, 0.6, 3.0).publish
    jumped = rounds.verdict(good, 5.0, 0.1, 0.6, 3.0)
    assert not jumped.publish and "over 3 x" in jumped.reason
    assert not rounds.verdict(good, float("nan"), 0.1, 0.6, 3.0).publish
    nan = rounds.verdict({"w": np.full(4, np.nan, np.float32)}, 0.5, 0.9, 0.6, 3.0)
    assert not nan.publish and "non-finite" in nan.reason


def test_divergence_goes_back_to_the_best_version() -> None:
    rb = {"enabled": True, "margin": 0.05, "rounds": 2}
    history = [(0, 0.1), (1, 0.8), (2, 0.9), (3, 0.7), (4, 0.6)]
    back = rounds.divergence(history, rb, 4)
    assert back is not None and back.to_round == 2 and "round 4" in back.reason
    assert rounds.divergence(history[:4], rb, 3) is None  # one fall, two needed
    assert rounds.divergence(history, {**rb, "enabled": False}, 4) is None


# --- resume --------------------------------------------------------------------------------


def test_resume_point_reruns_the_aborted_round_from_the_newest_live_version() -> None:
    rows = [
        {"round": 1, "status": "completed", "selected": ["a", "b", "c"]},
        {"round": 2, "status": "rejected", "selected": ["a", "b"]},  # counted, no version
        {"round": 3, "status": "aborted", "selected": ["a", "c"]},  # cut: runs again
    ]
    models = [
        {"round": 0, "cid": "c0", "loss": 2.0, "state_cid": None},
        {"round": 1, "cid": "c1", "loss": 1.0, "state_cid": "s1"},
    ]
    point = resume_point(rows, models)
    assert point is not None
    assert (point.rounds_done, point.model_round, point.model_cid) == (2, 1, "c1")
    assert (point.loss, point.state_cid) == (1.0, "s1")
    assert point.regather == ("a", "c")  # who the first round waits for
    assert resume_point([], []) is None  # no initial model yet: start over
    with pytest.raises(ValueError, match="still running"):
        resume_point([{"round": 4, "status": "running"}], models)


# --- a secure round run again ----------------------------------------------------------------


def test_a_secure_round_run_again_never_derives_the_same_masks() -> None:
    """A round cut by a coordinator restart runs again under its number: its round tag (in
    every KDF input of the masks and the share encryption) and its graph seed are new, and
    every participant's keys are new (protocol.secagg.Client makes fresh X25519 pairs)."""
    from types import SimpleNamespace

    from fednode.secure_round import SecureRound
    from fednode.strategies import get_strategy
    from protocol.secagg import Client, params_from_wire

    spec = specmod.validate({"aggregation": {"secure": True, "neighbours": 2}})
    w = {"w": np.zeros(4, np.float32)}
    run = SimpleNamespace(
        strategy=get_strategy("fedavg"),
        session_id="s1",
        spec=spec,
        shapes={"w": (4,)},
        global_weights=w,
        global_cid="bafyround",
        assigned_weights=lambda selected, max_weight: dict.fromkeys(selected, 1),
    )
    first = SecureRound(run, collecting(["a", "b", "c", "d"]))
    again = SecureRound(run, collecting(["a", "b", "c", "d"]))  # the same round, run again
    assert first.params.round_tag != again.params.round_tag
    assert first.params.graph_seed != again.params.graph_seed
    p = params_from_wire(first.wire("a"))
    assert Client("a", p).advertise() != Client("a", p).advertise()


# --- evaluation on the participants ---------------------------------------------------------


def test_who_evaluates_follows_evaluation_on() -> None:
    assert [rounds.coordinator_evaluates(on) for on in specmod.EVALUATION_PLACES] == [
        True,
        False,
        True,
    ]
    assert [rounds.participants_evaluate(on) for on in specmod.EVALUATION_PLACES] == [
        False,
        True,
        True,
    ]


def test_weighted_eval_is_the_example_weighted_mean_of_the_reports() -> None:
    reports = {
        "a": rounds.EvalReport(10, 1.0, {"accuracy": 0.5}),
        "b": rounds.EvalReport(30, 0.2, {"accuracy": 0.9, "roc_auc": 0.8}),
    }
    got = rounds.weighted_eval(reports, {})
    assert got is not None
    assert got.examples == 40 and got.reports == 2
    assert got.loss == pytest.approx((10 * 1.0 + 30 * 0.2) / 40)
    assert got.accuracy == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert got.metrics["roc_auc"] == pytest.approx(0.8)  # only b reports it: b's figure
    assert rounds.weighted_eval({}, {}) is None
    regression = rounds.weighted_eval({"a": rounds.EvalReport(5, 2.0, {"mae": 1.0, "r2": 0.7})}, {})
    assert regression is not None and regression.accuracy == 0.7  # the score: R²


def test_a_report_weighs_at_most_what_its_participant_registered() -> None:
    # b claims a test split of a million examples but registered 30: it weighs 30
    reports = {
        "a": rounds.EvalReport(10, 1.0, {"accuracy": 0.5}),
        "b": rounds.EvalReport(1_000_000, 0.0, {"accuracy": 1.0}),
    }
    got = rounds.weighted_eval(reports, {"a": 50, "b": 30})
    assert got is not None and got.examples == 40
    assert got.accuracy == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)


def test_round_figures_come_from_the_coordinator_whenever_it_evaluates() -> None:
    mean = rounds.EvalFigures(40, 0.3, {"accuracy": 0.8}, 2)
    assert rounds.round_figures("coordinator", (0.9, 0.2), None) == (0.9, 0.2)
    assert rounds.round_figures("both", (0.9, 0.2), mean) == (0.9, 0.2)
    assert rounds.round_figures("participants", None, mean) == (0.8, 0.3)
    assert rounds.round_figures("participants", None, None) == (None, None)
    with pytest.raises(ValueError):
        rounds.round_figures("both", None, mean)


def test_report_of_an_update() -> None:
    plain = update(np.ones(4, np.float32))
    assert rounds.report_of(plain) is None  # no eval_* fields: no report
    with_report = dataclasses.replace(
        plain, eval_examples=12, eval_loss=0.4, eval_metrics={"accuracy": 0.75}
    )
    assert rounds.report_of(with_report) == rounds.EvalReport(12, 0.4, {"accuracy": 0.75})


def test_verdict_without_coordinator_data_checks_finiteness_only() -> None:
    good = {"w": np.ones(4, np.float32)}
    assert rounds.verdict(good, None, None, float("nan"), 3.0).publish
    nan = rounds.verdict({"w": np.full(4, np.nan, np.float32)}, None, None, float("nan"), 3.0)
    assert not nan.publish and "non-finite" in nan.reason


def test_divergence_ignores_the_newest_versions_not_yet_measured() -> None:
    # with the participants evaluating, the newest version's figures come a round later
    rb = {"enabled": True, "margin": 0.05, "rounds": 2}
    history = [(0, 0.1), (1, 0.8), (2, 0.9), (3, 0.7), (4, 0.6), (5, None)]
    back = rounds.divergence(history, rb, 5)
    assert back is not None and back.to_round == 2
    assert rounds.divergence([(0, None), (1, None)], rb, 1) is None
