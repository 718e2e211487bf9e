"""The strategies wired to the interface (fednode/strategies/*.py): built from the spec's
[aggregation] section, their state (the server optimizers' moments) carried from round to
round, stored with each model version, given back by rollback and after a coordinator
restart; the spec's checks of their settings. The arithmetic itself is tested by hand in
tests/test_aggregate.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednode import weights
from fednode.coordinator import Coordinator
from fednode.data import Dataset
from fednode.ledger import Ledger
from fednode.resume import resume_point
from fednode.rounds import RoundRun
from fednode.session import SessionRun
from fednode.store import BlockStore
from fednode.strategies import (
    STRATEGIES,
    Bulyan,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    get_strategy,
)
from fednode.strategies import aggregate as arith
from fednode.strategies.base import Weights
from protocol import modelspec, plugins
from protocol import spec as specmod
from protocol.errors import SpecError, ValidationError
from protocol.identity import Identity


def model(*values: float) -> Weights:
    return {"w": np.array(values, np.float32), "b": np.zeros((), np.float32)}


def ups(*models: Weights, examples: int = 1) -> list[ClientUpdate]:
    return [ClientUpdate(f"p{i}", m, examples, 0.0) for i, m in enumerate(models)]


def agg(**over: Any) -> dict[str, Any]:
    """A validated [aggregation] section with ``over`` set."""
    return specmod.validate({"min_participants": 7, "aggregation": over})["aggregation"]


# --- built from the spec ---------------------------------------------------------------------


def test_every_strategy_is_built_from_its_section_with_its_settings() -> None:
    expected = {
        "fedavgm": FedAvgM,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
        "median": Median,
        "trimmed_mean": TrimmedMean,
        "krum": Krum,
        "multikrum": MultiKrum,
        "bulyan": Bulyan,
    }
    for name, cls in expected.items():
        s = get_strategy(agg(strategy=name, beta=0.3))
        assert type(s) is cls and s.params["beta"] == 0.3
        # secure aggregation: the server optimizers step from the mean, the robust ones cannot
        assert s.supports_secure == (name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"))
    assert STRATEGIES.names() == plugins.STRATEGIES.names()
    # a bare name (and an older spec's section, lacking the new keys) takes the defaults
    assert get_strategy("fedadam").params["beta1"] == 0.9
    assert get_strategy({"strategy": "fedavgm"}).params["server_momentum"] == 0.9


def test_the_session_builds_its_strategy_from_the_spec(tmp_path: Path) -> None:
    run = session_run(tmp_path, {"strategy": "fedadam", "server_lr": 0.05, "beta2": 0.9})
    try:
        assert isinstance(run.strategy, FedAdam)
        assert run.strategy.settings() == {"lr": 0.05, "beta1": 0.9, "beta2": 0.9, "tau": 1e-9}
    finally:
        run.coord.ledger.close()


# --- server optimizers: state is the moments -------------------------------------------------


def test_fedavgm_state_is_its_velocity_and_carries_over() -> None:
    s = get_strategy(agg(strategy="fedavgm", server_lr=2.0, server_momentum=0.5))
    g0 = model(1.0, 0.0)
    g1, st1 = s.aggregate(g0, ups(model(0.5, 1.0)), {})
    assert sorted(st1) == ["momentum/b", "momentum/w"]
    assert st1["momentum/w"].tolist() == [0.5, -1.0] and g1["w"].tolist() == [0.0, 2.0]
    g2, st2 = s.aggregate(g1, ups(model(0.0, 2.0)), st1)  # as in test_aggregate, by hand
    assert st2["momentum/w"].tolist() == [0.25, -0.5] and g2["w"].tolist() == [-0.5, 3.0]
    # server_lr 0 stands for FedAvgM's default 1; with momentum 0 that is FedAvg's mean
    plain = get_strategy(agg(strategy="fedavgm", server_momentum=0.0))
    mean, _ = FedAvg().aggregate(g0, ups(model(3.0, 5.0), model(1.0, 1.0)), {})
    got, _ = plain.aggregate(g0, ups(model(3.0, 5.0), model(1.0, 1.0)), {})
    assert got["w"].tolist() == mean["w"].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_state_round_trips_through_the_store_format(name: str) -> None:
    """Two rounds in memory equal round 1, its state written as the content store keeps it
    (safetensors bytes), read back, then round 2: the state is all a step needs."""
    s = get_strategy(agg(strategy=name))
    g0 = model(0.5, -0.25)
    rounds = [ups(model(0.7, -0.2), model(0.1, 0.0)), ups(model(0.9, 0.3))]
    g1, st1 = s.aggregate(g0, rounds[0], {})
    keys = {"v/w", "v/b", "step"} | ({"m/w", "m/b"} if name != "fedadagrad" else set())
    assert set(st1) == keys and st1["step"].tolist() == [1]
    direct, st2 = s.aggregate(g1, rounds[1], st1)
    stored = weights.from_bytes(weights.to_bytes(st1))
    again, st2b = s.aggregate(g1, rounds[1], stored)
    assert st2["step"].tolist() == [2] and np.array_equal(direct["w"], again["w"])
    assert all(np.array_equal(st2[k], st2b[k]) for k in st2)
    # without its state, round 2 is another step (the moments start again)
    fresh, _ = s.aggregate(g1, rounds[1], {})
    assert not np.array_equal(fresh["w"], direct["w"])


def test_fedadam_steps_from_the_mean_as_the_arithmetic_says() -> None:
    s = get_strategy(agg(strategy="fedadam", server_lr=0.5, beta1=0.5, beta2=0.75, tau=1.0))
    g0 = model(0.0)
    g1, st = s.aggregate(g0, ups(model(1.0), model(3.0)), {})  # mean 2: Δ = 2
    assert g1["w"].tolist() == [0.25] and st["m/w"].tolist() == [1.0]  # 0.5·1 / (1 + 1)
    # a secure round hands the mean to from_mean: the same step, the same state
    g1s, sts = s.from_mean(g0, model(2.0), {})
    assert g1s["w"].tolist() == [0.25] and all(np.array_equal(st[k], sts[k]) for k in st)
    # plain FedAvg's from_mean is the mean itself, the state untouched
    same = {"x": np.ones(1, np.float32)}
    mean = model(4.0)
    assert FedAvg().from_mean(g0, mean, same) == (mean, same)


def test_a_state_that_is_not_this_models_is_refused() -> None:
    s = get_strategy(agg(strategy="fedadam"))
    _, st = s.aggregate(model(0.0, 1.0), ups(model(1.0, 1.0)), {})
    with pytest.raises(ValidationError, match=r"fedadam: the stored state's 'm/w' has shape"):
        s.aggregate(model(0.0, 1.0, 2.0), ups(model(1.0, 1.0, 1.0)), st)
    partial = {k: v for k, v in st.items() if k != "v/b"}
    with pytest.raises(ValidationError, match="fedadam: the stored state lacks 'v/b'"):
        s.aggregate(model(0.0, 1.0), ups(model(1.0, 1.0)), partial)
    no_step = {k: v for k, v in st.items() if k != "step"}
    with pytest.raises(ValidationError, match="moments but no 'step'"):
        s.aggregate(model(0.0, 1.0), ups(model(1.0, 1.0)), no_step)


# --- robust strategies ---------------------------------------------------------------------


def test_robust_strategies_leave_out_the_outlier() -> None:
    honest = [model(v) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 1.5)]
    updates = ups(*honest, model(1000.0))
    g = model(0.0)

    def w(name: str, **kw: Any) -> list[float]:
        new, state = get_strategy(agg(strategy=name, **kw)).aggregate(g, updates, {"k": g["w"]})
        assert list(state) == ["k"] and new["w"].dtype == np.float32  # state passes through
        return new["w"].tolist()

    assert w("median") == [2.0]
    assert w("trimmed_mean", beta=0.2) == [pytest.approx((1 + 1.5 + 2 + 3 + 4) / 5)]
    assert w("krum", num_malicious=1) == [1.5]
    # multikrum's default keeps n - f = 6: all the honest ones, in the weighted mean
    assert w("multikrum", num_malicious=1) == [pytest.approx(11.5 / 6)]
    # bulyan: Krum keeps 1.5, 1, 3, 0, 2 (θ = n - 2f = 5); their median is 1.5, and the
    # β = θ - 2f = 3 values nearest it are 1, 1.5, 2
    assert w("bulyan", num_malicious=1) == [1.5]
    with pytest.raises(ValidationError, match="krum: 7 updates, but num_malicious = 3"):
        get_strategy(agg(strategy="krum", num_malicious=2) | {"num_malicious": 3}).aggregate(
            g, updates, {}
        )


# --- the spec's checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {"min_participants": 4, "aggregation": {"strategy": "krum", "num_malicious": 1}},
            r"'krum' with aggregation.num_malicious = 1 needs min_participants >= "
            r"2·num_malicious \+ 3 = 5, but min_participants = 4",
        ),
        (
            {"min_participants": 9, "aggregation": {"strategy": "bulyan", "num_malicious": 2}},
            r"needs min_participants >= 4·num_malicious \+ 3 = 11",
        ),
        (
            {"min_participants": 5, "aggregation": {"strategy": "krum", "num_selected": 2}},
            "num_selected = 2 with strategy 'krum'",
        ),
        (
            {"min_participants": 5, "aggregation": {"strategy": "multikrum", "num_selected": 6}},
            "num_selected = 6 is more than a round of min_participants = 5",
        ),
        (
            {"min_participants": 9, "aggregation": {"strategy": "bulyan", "num_selected": 8}},
            r"num_selected = 8 for bulyan",
        ),
        ({"aggregation": {"strategy": "trimmed_mean", "beta": 0.5}}, "beta = 0.5 would cut"),
        ({"aggregation": {"beta": 0.6}}, r"aggregation\.beta = 0\.6 is not accepted"),
        ({"aggregation": {"server_lr": -1}}, r"aggregation\.server_lr"),
        ({"aggregation": {"beta2": 1.0}}, r"aggregation\.beta2"),
        ({"aggregation": {"strategy": "median", "secure": True}}, "cannot compute strategy"),
    ],
)
def test_spec_refuses_strategy_settings(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        specmod.validate(raw)


def test_spec_hints_what_would_fit() -> None:
    with pytest.raises(SpecError) as ei:
        specmod.validate(
            {"min_participants": 7, "aggregation": {"strategy": "krum", "num_malicious": 3}}
        )
    assert ei.value.hint == "raise min_participants to 9, or lower num_malicious to 2"


def test_spec_accepts_the_strategies_it_can_run() -> None:
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):  # the mean is all they need
        specmod.validate({"aggregation": {"strategy": name, "secure": True}})
    ok = {"min_participants": 7, "aggregation": {"strategy": "bulyan", "num_malicious": 1}}
    assert specmod.validate(ok)["aggregation"]["num_selected"] == 0
    specmod.validate({"min_participants": 5, "aggregation": {"strategy": "krum"}})
    specmod.validate({"aggregation": {"strategy": "median"}})  # the defaults fit 3 participants


# --- the session: stored with each version, rollback, restart ----------------------------------


def session_run(tmp_path: Path, aggregation: dict[str, Any]) -> SessionRun:
    ledger = Ledger(tmp_path / "ledger.db")
    coord = Coordinator(
        Identity.generate(), ledger, BlockStore(tmp_path / "store"), operators=set()
    )
    spec = specmod.validate(
        {"model": {"kind": "logreg", "inputs": 4, "classes": 2}, "aggregation": aggregation}
    )
    if not ledger.rounds("s1") and not ledger.models("s1"):
        ledger.create_session(
            "s1",
            name="n",
            spec=spec,
            strategy=aggregation["strategy"],
            secure_aggregation=False,
            rounds=9,
            created_at=0.0,
        )
    return SessionRun(coord, "s1", spec)


def _lr(v: float) -> Weights:
    return {"0.weight": np.full((2, 4), v, np.float32), "0.bias": np.zeros(2, np.float32)}


@pytest.fixture
def adam_run(tmp_path: Path) -> Iterator[SessionRun]:
    run = session_run(tmp_path, {"strategy": "fedadam", "server_lr": 0.01})
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    run.eval_data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    run.shapes = modelspec.shapes(run.spec["model"])
    run.global_weights, run.global_cid = _lr(0.0), "bafy-initial"
    run.base_loss = float("nan")
    run.coord.ledger.record_model(
        "s1", 0, cid=run.global_cid, parent_cid=None, accuracy=0.5, loss=0.7, size=1, created_at=0
    )
    yield run
    run.coord.ledger.close()


def _one_round(run: SessionRun, number: int) -> None:
    """A plain round through the session's own strategy and _complete (which stores the
    model and its state and writes the version's state_cid)."""
    led = run.coord.ledger

    async def go() -> None:
        assert run.global_weights is not None
        rnd = run.round = RoundRun(number, run.global_cid, ["p"], time.time())
        led.start_round("s1", number, selected=["p"], model_cid_in=run.global_cid, started_at=0)
        update = [ClientUpdate("p", _lr(0.1 * number), 10, 0.5)]
        new, rnd.next_state = run.strategy.aggregate(run.global_weights, update, run.strategy_state)
        assert await run._complete(rnd, new, ["p"])

    asyncio.run(go())


def test_fedadam_moments_are_stored_rolled_back_and_resumed(
    adam_run: SessionRun, tmp_path: Path
) -> None:
    run, led = adam_run, adam_run.coord.ledger
    for n in (1, 2, 3):
        _one_round(run, n)
        assert run.strategy_state["step"].tolist() == [n]  # the published round's moments
    states = {
        m["round"]: weights.from_bytes(run.coord.store.get(m["state_cid"]))
        for m in led.models("s1")
        if m["state_cid"] is not None
    }
    assert sorted(states) == [1, 2, 3] and states[2]["step"].tolist() == [2]
    assert set(states[2]) == {"m/0.weight", "m/0.bias", "v/0.weight", "v/0.bias", "step"}

    # rollback to round 1: round 1's moments are the strategy's again, and the next round
    # steps from them (step 2 again, not 4)
    run._rollback(1, reason="test", trigger="operator", round_=3, by="op")
    assert all(np.array_equal(run.strategy_state[k], states[1][k]) for k in states[1])
    g1 = run.global_weights
    assert g1 is not None
    _one_round(run, 4)
    order = list(g1)
    m = [states[1][f"m/{k}"] for k in order]
    v = [states[1][f"v/{k}"] for k in order]
    want, _, _ = arith.adaptive_step(
        "adam", [g1[k] for k in order], [_lr(0.4)[k] for k in order], m, v, 2,
        **{"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9},
    )  # fmt: skip
    assert run.global_weights is not None and run.strategy_state["step"].tolist() == [2]
    assert np.array_equal(run.global_weights["0.weight"], want[0])

    # a coordinator restart: a new run of the session finds the version to resume from in
    # the ledger, and its state (state_cid) in the store: round 4's moments
    cids = {m["round"]: m["state_cid"] for m in led.live_models("s1")}
    resumed = session_run(tmp_path, {"strategy": "fedadam", "server_lr": 0.01})
    point = resume_point(led.rounds("s1"), led.live_models("s1"))
    assert point is not None and point.state_cid == cids[4]
    resumed.restore_strategy_state(point.state_cid)
    assert resumed.strategy_state["step"].tolist() == [2]
    state = run.strategy_state
    assert all(np.array_equal(resumed.strategy_state[k], state[k]) for k in state)
    resumed.coord.ledger.close()


# --- a secure round: the strategy steps from the unmasked mean ---------------------------------


def test_a_secure_fedadam_round_steps_from_the_mean_and_keeps_its_moments() -> None:
    """SecureRound driven in memory with real protocol clients (no network): the coordinator
    decodes only the mean, hands it to FedAdam.from_mean, and the round carries the moments
    (RoundRun.next_state) that a plain round with the same updates makes."""
    from types import SimpleNamespace

    from fednode.secure_round import SecureRound
    from protocol import messages as m
    from protocol.secagg import Client, encode_update, pack, params_from_wire

    spec = specmod.validate(
        {
            "aggregation": {
                "secure": True,
                "strategy": "fedadam",
                "server_lr": 0.5,
                "beta1": 0.5,
                "beta2": 0.75,
                "tau": 1.0,
            }
        }
    )
    g = {"w": np.array([0.5, -0.25, 0.0], np.float32)}
    trained = {
        "a": np.array([0.6, -0.2, 0.1], np.float32),
        "b": np.array([0.4, -0.3, 0.3], np.float32),
        "c": np.array([0.8, -0.1, -0.1], np.float32),
    }
    run = SimpleNamespace(
        strategy=get_strategy(spec["aggregation"]),
        strategy_state={},
        session_id="s1",
        spec=spec,
        shapes={"w": (3,)},
        global_weights=g,
        global_cid="bafyround",
        assigned_weights=lambda selected, max_weight: dict.fromkeys(selected, 1),
        record_masked=lambda *a: None,
        coord=SimpleNamespace(record=lambda *a, **k: None),
    )
    rnd = RoundRun(3, "bafyround", sorted(trained), started_at=0.0)
    sr = SecureRound(run, rnd)  # type: ignore[arg-type]
    p = params_from_wire(sr.wire("a"))
    clients = {u: Client(u, p) for u in trained}
    inbox: dict[str, Any] = {}

    async def send(peer: str, msg: Any) -> bool:
        inbox[peer] = msg
        return True

    async def wait(_left: float) -> None:  # each participant answers the stage at once
        for u, c in clients.items():
            if sr.stage == "keys":
                msg: Any = m.SecaggKeys(round=3, **c.advertise())
            elif sr.stage == "shares":
                msg = m.SecaggShares(round=3, shares=c.share_keys(inbox[u].roster))
            elif sr.stage == "masked":
                x, _ = encode_update(trained[u], g["w"], 1, p)
                y = c.masked_input(inbox[u].shares, x)
                msg = m.SecaggMasked(round=3, data=pack(y, p), loss=0.1, train_s=0.1)
            else:
                shares = c.unmask(inbox[u].survivors, inbox[u].dropped)
                msg = m.SecaggUnmask(round=3, b=shares["b"], s=shares["s"])
            sr.on_message(u, msg, 0)

    new, contributors = asyncio.run(sr.run_round(send, wait, time.monotonic() + 60))
    assert contributors == ["a", "b", "c"]
    plain, state = run.strategy.aggregate(
        g, [ClientUpdate(u, {"w": w}, 1, 0.0) for u, w in trained.items()], {}
    )
    assert rnd.next_state is not None and rnd.next_state["step"].tolist() == [1]
    np.testing.assert_allclose(new["w"], plain["w"], atol=1e-4)  # fixed point's rounding
    for k in ("m/w", "v/w"):
        np.testing.assert_allclose(rnd.next_state[k], state[k], atol=1e-4)
    # and it is a server step, not the mean: the mean would be 0.6, -0.2, 0.1
    assert not np.allclose(new["w"], [0.6, -0.2, 0.1], atol=1e-2)
