"""The plug points: the aggregation arithmetic, strategies and their state, codecs, privacy
mechanisms, model kinds, data sources, and the registries that find each by name."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fednode import codecs, privacy, round_config, training, weights
from fednode.coordinator import Coordinator
from fednode.data import SOURCES, Dataset, load_eval, parse_dataset_spec
from fednode.ledger import Ledger
from fednode.rounds import RoundRun
from fednode.session import SessionRun
from fednode.store import BlockStore
from fednode.strategies import STRATEGIES, ClientUpdate, FedAvg, FedProx, get_strategy
from fednode.strategies import aggregate as arith
from fednode.strategies.base import State, Strategy, Weights
from protocol import messages, modelspec, plugins
from protocol import spec as specmod
from protocol.errors import DataError, SpecError, Unsupported, ValidationError
from protocol.identity import Identity

# --- the arithmetic, against values computed by hand -------------------------------------------


def test_weighted_sum_and_mean_by_hand() -> None:
    a = [np.array([1.0, 2.0], np.float32), np.array([[0.0]], np.float32)]
    b = [np.array([4.0, -1.0], np.float32), np.array([[3.0]], np.float32)]
    results = [(a, 1.0), (b, 2.0)]
    s = arith.weighted_sum(results)
    assert np.array_equal(s[0], [9.0, 0.0]) and np.array_equal(s[1], [[6.0]])  # 1a + 2b
    assert arith.total_weight(results) == 3.0
    mean = arith.weighted_mean(results)
    assert np.array_equal(mean[0], [3.0, 0.0]) and np.array_equal(mean[1], [[2.0]])
    assert all(m.dtype == np.float32 for m in mean)
    # a zero weight contributes nothing; one result alone is its own mean
    assert np.array_equal(arith.weighted_mean([(a, 5.0), (b, 0.0)])[0], a[0])
    assert np.array_equal(arith.weighted_mean([(b, 0.25)])[0], b[0])


def test_weighted_mean_does_not_drift_with_the_number_of_updates() -> None:
    # 20,000 updates of 0.1: a float32 running sum drifts far (each add rounds at the sum's
    # scale); blocks of _FOLD float32 terms folded into float64 keep float32's own precision
    tenth = [np.array([0.1], np.float32)]
    results = [(tenth, 1.0)] * 20_000
    drift = np.float32(0)
    for _ in results:
        drift += np.float32(0.1)
    exact = 20_000 * float(np.float32(0.1))
    assert abs(float(drift) - exact) / exact > 1e-4  # the naive sum is visibly off
    assert abs(arith.weighted_sum(results)[0][0] - exact) / exact < 1e-6


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ([], "no updates"),
        ([([np.zeros(2)], 0.0)], "zero"),
        ([([np.zeros(2)], -1.0)], "weight"),
        ([([np.zeros(2)], float("nan"))], "weight"),
        ([([np.zeros(2)], 1.0), ([np.zeros(2), np.zeros(1)], 1.0)], "tensors"),
        ([([np.zeros(2)], 1.0), ([np.zeros(3)], 1.0)], "shape"),
    ],
)
def test_weighted_mean_refuses(results: list[Any], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        arith.weighted_mean(results)


def test_arrays_round_trip_in_the_global_order() -> None:
    w = {"b": np.ones(2, np.float32), "a": np.zeros(1, np.float32)}
    arrays = arith.to_arrays(w, ["a", "b"])
    assert [x.shape for x in arrays] == [(1,), (2,)]
    assert list(arith.from_arrays(arrays, ["a", "b"])) == ["a", "b"]


# --- strategies ------------------------------------------------------------------------------


def _w(v: float) -> Weights:
    return {"t": np.full(3, v, np.float32)}


def test_fedprox_aggregates_as_fedavg_and_sends_mu() -> None:
    updates = [ClientUpdate("p", _w(1.0), 1, 0.0), ClientUpdate("q", _w(4.0), 2, 0.0)]
    avg, _ = FedAvg().aggregate(_w(0.0), updates, {})
    prox, state = FedProx().aggregate(_w(0.0), updates, {})
    assert np.array_equal(prox["t"], avg["t"]) and np.all(prox["t"] == 3.0) and state == {}
    spec = specmod.validate({"aggregation": {"strategy": "fedprox", "proximal_mu": 0.25}})
    assert FedProx().round_config(1, spec) == {"mu": 0.25}
    assert FedAvg().round_config(1, spec) == {}  # fedavg has nothing to tell participants
    assert specmod.defaults()["aggregation"]["proximal_mu"] == 0.01
    with pytest.raises(ValidationError, match="fedprox: no updates"):
        FedProx().aggregate(_w(0.0), [], {})


def test_strategy_registry_and_secure_support() -> None:
    assert isinstance(get_strategy("fedprox"), FedProx)
    assert get_strategy("fedavg").supports_secure and get_strategy("fedprox").supports_secure
    with pytest.raises(Unsupported, match=r"unknown strategy 'fedsgd'.*fedavg, fedprox"):
        get_strategy("fedsgd")
    # every strategy a spec may name has its code here, and the other way round
    assert STRATEGIES.names() == plugins.STRATEGIES.names()
    assert codecs.CODECS.names() == plugins.CODECS.names()
    assert privacy.MECHANISMS.names() == plugins.PRIVACY.names()
    assert training.MODELS.names() == modelspec.KINDS.names()


def test_spec_checks_secure_support_not_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    ok = specmod.validate({"aggregation": {"strategy": "fedprox", "secure": True}})
    assert ok["aggregation"]["strategy"] == "fedprox"  # fedprox's mean is what a sum gives
    # a strategy the sum cannot give (say, a median) is refused with secure = true
    monkeypatch.setitem(plugins.STRATEGIES._items, "median", plugins.StrategyInfo(False))
    assert specmod.validate({"aggregation": {"strategy": "median"}})["aggregation"]["strategy"]
    with pytest.raises(SpecError, match="cannot compute strategy 'median'") as ei:
        specmod.validate({"aggregation": {"strategy": "median", "secure": True}})
    assert "fedavg, fedprox" in ei.value.hint


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"aggregation": {"strategy": "fedsgd"}}, "aggregation.strategy"),
        ({"aggregation": {"proximal_mu": -0.1}}, "aggregation.proximal_mu"),
        ({"aggregation": {"proximal_mu": 101}}, "aggregation.proximal_mu"),
        ({"compression": {"codec": "zip"}}, "compression.codec"),
        ({"aggregation": {"codec": "zip"}}, "compression.codec"),  # its old place
        ({"compression": {"codec": "topk", "bits": 4}}, "compression.bits"),  # not topk's
        ({"compression": {"codec": "quantize", "bits": 3}}, "compression.bits"),
        ({"compression": {"codec": "topk"}, "aggregation": {"secure": True}}, "compression.codec"),
        ({"privacy": {"mode": "dp"}}, "privacy.mode"),
        ({"privacy": {"epsilon": 1}}, "privacy.epsilon"),
        ({"model": {"kind": "cnn"}}, "model.kind"),
    ],
)
def test_spec_refuses_unknown_plugins(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        specmod.validate(raw)


def test_template_lists_the_registered_names() -> None:
    text = specmod.template()
    assert "fedavg | fedprox" in text and 'mode = "none"' in text
    assert 'codec = "identity"' in text and "proximal_mu = 0.01" in text


# --- a strategy's state: stored with each version, restored by rollback and resume -----------


class Counting(Strategy):
    """A strategy with state: FedAvg's mean, and a count of the rounds it aggregated."""

    name = "fedavg"  # spec vocabulary; the class itself is never registered

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        new, _ = FedAvg().aggregate(global_weights, updates, {})
        count = state.get("rounds", np.zeros(1, np.float32))
        return new, {"rounds": count + 1}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[SessionRun]:
    ledger = Ledger(tmp_path / "ledger.db")
    coord = Coordinator(
        Identity.generate(), ledger, BlockStore(tmp_path / "store"), operators=set()
    )
    spec = specmod.validate({"model": {"kind": "logreg", "inputs": 4, "classes": 2}})
    ledger.create_session(
        "s1",
        name="n",
        spec=spec,
        strategy="fedavg",
        secure_aggregation=False,
        rounds=5,
        created_at=0.0,
    )
    r = SessionRun(coord, "s1", spec)
    r.strategy = Counting()
    r.shapes = modelspec.shapes(r.spec["model"])
    yield r
    ledger.close()


def _model(v: float) -> Weights:
    return {"0.weight": np.full((2, 4), v, np.float32), "0.bias": np.zeros(2, np.float32)}


def test_state_round_trips_through_the_store(run: SessionRun) -> None:
    state = {"m": np.arange(3, dtype=np.float32), "v": np.ones((2, 2), np.float32)}
    cid = asyncio.run(run._store_state(state))
    assert cid is not None and run.coord.store.get(cid) == weights.to_bytes(state)
    assert asyncio.run(run._store_state({})) is None  # no state: state_cid stays NULL
    run.strategy_state = {}
    back = run.restore_strategy_state(cid)
    assert back is run.strategy_state and list(back) == ["m", "v"]
    assert all(np.array_equal(back[k], state[k]) for k in state)
    assert run.restore_strategy_state(None) == {}


def test_rounds_store_state_and_rollback_restores_it(run: SessionRun) -> None:
    """Three rounds through the real _complete: each version gets the state its aggregate
    made; a rollback to round 1 gives back round 1's state, not the latest."""
    led = run.coord.ledger
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    run.eval_data = Dataset(x, (x[:, 0] > 0).astype(np.int64))
    run.global_weights, run.global_cid = _model(0.0), "bafy-initial"
    run.base_loss = float("nan")
    led.record_model(
        "s1", 0, cid=run.global_cid, parent_cid=None, accuracy=0.5, loss=0.7, size=1, created_at=0
    )

    async def one_round(number: int) -> None:
        assert run.global_weights is not None
        rnd = run.round = RoundRun(number, run.global_cid, ["p"], time.time())
        led.start_round("s1", number, selected=["p"], model_cid_in=run.global_cid, started_at=0)
        update = [ClientUpdate("p", _model(0.01 * number), 10, 0.5)]
        new, rnd.next_state = run.strategy.aggregate(run.global_weights, update, run.strategy_state)
        assert await run._complete(rnd, new, ["p"])

    for n in (1, 2, 3):
        asyncio.run(one_round(n))
        assert run.strategy_state["rounds"][0] == n  # the published round's state is current
    cids = {m["round"]: m["state_cid"] for m in led.models("s1")}
    assert cids[0] is None and len({cids[1], cids[2], cids[3]}) == 3
    assert weights.from_bytes(run.coord.store.get(cids[2]))["rounds"][0] == 2

    run._rollback(1, reason="test", trigger="operator", round_=3, by="op")
    assert run.strategy_state["rounds"][0] == 1
    # and resuming from a version (the lead's resume path) takes that version's state
    run.restore_strategy_state(cids[3])
    assert run.strategy_state["rounds"][0] == 3


# --- codecs, privacy and the participant's reading of round_start ------------------------------


def test_identity_codec_is_byte_identical() -> None:
    w = _model(0.5)
    ident = codecs.get_codec("identity")
    p = codecs.CodecParams()
    data = ident.encode(w, p)
    assert data == weights.to_bytes(w)  # the wire format of an update is unchanged
    back = ident.decode(data, weights.shapes(w), p)
    assert list(back) == list(w) and all(np.array_equal(back[k], w[k]) for k in w)
    with pytest.raises(ValidationError, match="shape"):
        ident.decode(data, {"0.weight": (3, 4), "0.bias": (2,)}, p)
    with pytest.raises(Unsupported, match="unknown update codec 'zstd'; registered here: identity"):
        codecs.get_codec("zstd")


def test_no_privacy_runs_training_as_is() -> None:
    assert privacy.get_mechanism("none").wrap(training.train) is training.train
    with pytest.raises(Unsupported, match="privacy mechanism 'dpsgd'"):
        privacy.get_mechanism("dpsgd")


def _task(**kw: Any) -> messages.RoundStart:
    return messages.RoundStart(round=1, model_cid="c", spec={}, deadline_s=9.0, **kw)


def test_participant_applies_mu_and_refuses_what_it_does_not_know() -> None:
    plan = round_config.plan(_task(strategy={"mu": 0.5}))
    assert plan.training == {"proximal_mu": 0.5}
    assert plan.describe() == {
        "training": {"proximal_mu": 0.5},
        "codec": "identity",
        "privacy": "none",
    }
    assert round_config.plan(_task()).training == {}  # fedavg: nothing to apply
    with pytest.raises(Unsupported, match=r"round_start\.strategy\.beta .*knows: mu"):
        round_config.plan(_task(strategy={"beta": 0.9}))
    with pytest.raises(SpecError, match=r"strategy\.mu = 500 .*\[0, 100\]"):
        round_config.plan(_task(strategy={"mu": 500}))
    with pytest.raises(Unsupported, match="update codec"):
        round_config.plan(_task(codec="zstd"))
    with pytest.raises(Unsupported, match="privacy mechanism"):
        round_config.plan(_task(privacy="dpsgd"))


def test_round_start_bounds_the_strategy_settings() -> None:
    base = {"round": 1, "model_cid": "c", "spec": {}, "deadline_s": 9.0}
    msg = messages.parse("round_start", {**base, "strategy": {"mu": 0.5, "on": True}})
    assert isinstance(msg, messages.RoundStart) and msg.strategy == {"mu": 0.5, "on": True}
    assert (msg.codec, msg.privacy) == ("identity", "none")  # the defaults: today's behaviour
    for bad, match in [
        ({"strategy": {"Mu": 1}}, "not a setting name"),
        ({"strategy": {"mu": [1]}}, "strategy.mu"),
        ({"strategy": {"mu": float("inf")}}, "strategy.mu"),
        ({"strategy": {"s": "x" * 300}}, "strategy.s"),
        ({"strategy": {f"k{i}": 1 for i in range(17)}}, "more than 16"),
        ({"codec": "../../evil"}, "not a plug-in name"),
    ]:
        with pytest.raises(ValidationError, match=match):
            messages.parse("round_start", {**base, **bad})


# --- registries: model kinds, data sources, the Registry itself ---------------------------------


def test_model_kinds_found_by_name() -> None:
    assert list(training.build_model("logreg", 4, [99], 3).state_dict()) == ["0.weight", "0.bias"]
    with pytest.raises(Unsupported, match="unknown model kind 'cnn'; registered here: mlp, logreg"):
        training.build_model("cnn", 4, [], 3)
    with pytest.raises(Unsupported, match="model kind"):
        modelspec.shapes({"kind": "cnn", "inputs": 4, "classes": 3})


def test_a_registered_model_kind_works_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """What docs/architecture.md shows: one call, then specs, pricing and training take it."""
    for reg in (modelspec.KINDS, training.MODELS):  # registered for this test only
        monkeypatch.setattr(reg, "_items", dict(reg._items))
    deep = lambda m: [16, 16, 16]  # noqa: E731
    training.register_model("deep", deep, training.MODELS.get("mlp"))
    spec = specmod.validate({"model": {"kind": "deep", "inputs": 4, "classes": 3}})
    m = {k: spec["model"][k] for k in ("kind", "inputs", "hidden", "classes")}
    w = training.init_weights(m, 0)
    assert weights.shapes(w) == modelspec.shapes(m)  # the arithmetic agrees with torch
    assert modelspec.param_count(m) == sum(v.size for v in w.values())


def test_data_sources_found_by_name() -> None:
    assert SOURCES.names() == ("digits", "npz", "csv", "parquet", "idx", "images")
    assert str(parse_dataset_spec("digits:1/3")) == "digits:1/3"
    with pytest.raises(DataError, match=r"'mnist:0/1' is not understood.*digits:K/N"):
        parse_dataset_spec("mnist:0/1")
    with pytest.raises(DataError, match="'mnist' is not understood"):
        load_eval("mnist", features="none", seed=0)


def test_registry_rules() -> None:
    reg: plugins.Registry[int] = plugins.Registry("widget", "use a known widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="registered already"):
        reg.register("a", 2)
    reg.register("a", 3, replace=True)
    with pytest.raises(ValueError, match="must match"):
        reg.register("fednode.evil:Class", 4)  # a name, never an import path
    with pytest.raises(Unsupported) as ei:
        reg.get("os.system")
    assert ei.value.code == "UNSUPPORTED" and ei.value.hint == "use a known widget"
    assert "registered here: a" in ei.value.message
    assert reg.get("a") == 3 and "a" in reg and "b" not in reg and len(reg) == 1
    with pytest.raises(ValueError, match=r"not in protocol\.plugins\.STRATEGIES"):
        from fednode.strategies import register

        class Other(FedAvg):
            name = "other"

        register(Other)
