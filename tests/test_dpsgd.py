"""Local DP-SGD (fednode.dpsgd, Opacus): the ε reported is Opacus's, σ meets the target,
BatchNorm is refused, the figures are bounded on the wire, the budget's arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from fednode import dpsgd, privacy, quality, training
from fednode.data import load_partition
from fednode.ledger import Ledger
from fednode.session import model_spec
from protocol import messages
from protocol import spec as specmod
from protocol.errors import SpecError, Unsupported, ValidationError


def _spec(**privacy_: object) -> dict:
    return specmod.validate(
        {
            "rounds": 4,
            "training": {"local_epochs": 1, "batch_size": 64},
            "privacy": {"mode": "local_dp", "target_epsilon": 3.0, **privacy_},
        }
    )


def _cfg(s: dict) -> training.TrainConfig:
    t = s["training"]
    return training.TrainConfig(
        local_epochs=t["local_epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        optimizer=t["optimizer"],
        momentum=t["momentum"],
    )


@pytest.fixture(scope="module")
def digits():
    return load_partition("digits:0/3", features="none", partition="iid", seed=0)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_reported_epsilon_is_opacus_accountant(digits, accountant: str) -> None:
    s = _spec(accountant=accountant, noise_multiplier=1.1)  # derived σ: the next test
    m = model_spec(s)
    w = training.init_weights(m, 0)
    history: list[dpsgd.Entry] = []
    for _round in range(2):  # the second round's report covers both
        dp = dpsgd.plan_round(
            s["privacy"],
            s["training"],
            s["rounds"],
            len(digits),
            session_history=history,
            dataset_history=history,
            seed=7,
        )
        run = privacy.get_mechanism("local_dp").wrap(training.train, dp)
        result = run(m, w, digits, _cfg(s))
        history.append(dp.entry)
        w = result.weights
    rep = result.privacy
    assert rep is not None
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(rep["dp_noise_multiplier"], rep["dp_sample_rate"], rep["dp_steps"])]
    assert rep["dp_epsilon"] == pytest.approx(acc.get_epsilon(delta=rep["dp_delta"]), rel=1e-6)
    assert rep["dp_accountant"] == accountant and rep["dp_delta"] == 1e-5
    assert rep["dp_steps"] == 2 * dpsgd.batches_per_epoch(len(digits), 64)
    assert rep["dp_sample_rate"] == 1 / dpsgd.batches_per_epoch(len(digits), 64)
    # the model's own tensor names on the wire, not GradSampleModule's "_module."
    assert set(result.weights) == set(training.expected_shapes(m))
    messages.Update(  # the figures pass the wire's bounds
        round=2,
        base_cid="b",
        num_examples=result.num_examples,
        loss=result.loss,
        train_s=1.0,
        update_cid="c",
        data=b"x",
        **rep,
    ).validate()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_derived_noise_meets_the_target_after_the_planned_rounds(accountant: str) -> None:
    s = _spec(accountant=accountant, target_epsilon=2.0)
    dp = dpsgd.plan_round(s["privacy"], s["training"], s["rounds"], 600)
    planned = dpsgd.epsilon([dp.entry] * s["rounds"], dp.delta, accountant)
    assert 1.95 <= planned <= 2.0  # Opacus's search stops within 0.01 below the target
    # and one more round than planned passes it
    assert dpsgd.epsilon([dp.entry] * (s["rounds"] + 1), dp.delta, accountant) > 2.0
    given = dpsgd.plan_round({**s["privacy"], "noise_multiplier": 5.0}, s["training"], 4, 600)
    assert given.noise_multiplier == 5.0


def test_noise_and_clipping_are_applied(digits) -> None:
    """Two runs differing only in the noise's seed differ; huge noise wrecks the model."""
    s = _spec(noise_multiplier=1.0)
    m = model_spec(s)
    w = training.init_weights(m, 0)
    dp = dpsgd.plan_round(s["privacy"], s["training"], 4, len(digits), seed=1)
    a = dpsgd.train_private(m, w, digits, _cfg(s), dp)
    b = dpsgd.train_private(m, w, digits, _cfg(s), dp)
    c = dpsgd.train_private(m, w, digits, _cfg(s), dataclasses.replace(dp, seed=2))
    assert all((a.weights[k] == b.weights[k]).all() for k in a.weights)  # seeded: repeatable
    assert any((a.weights[k] != c.weights[k]).any() for k in a.weights)


def test_batchnorm_is_refused_with_the_fix() -> None:
    layers = [
        {"type": "conv2d", "out_channels": 4, "kernel_size": 3},
        {"type": "batchnorm2d"},
        {"type": "relu"},
        {"type": "flatten"},
        {"type": "linear", "out_features": 10},
    ]
    model = {"kind": "layers", "input_shape": [1, 8, 8], "layers": layers}
    with pytest.raises(SpecError, match="batchnorm2d") as err:
        specmod.validate({"model": model, "privacy": {"mode": "local_dp"}})
    assert "model.layers[1]" in err.value.message and "groupnorm" in err.value.hint
    specmod.validate({"model": model})  # without local_dp BatchNorm is fine
    fixed = [*layers[:1], {"type": "groupnorm", "num_groups": 2}, *layers[2:]]
    specmod.validate({"model": {**model, "layers": fixed}, "privacy": {"mode": "local_dp"}})
    # a python model's factory is checked on the participant (its task declined)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    with pytest.raises(Unsupported, match="GroupNorm"):
        dpsgd.check_module(net, "model factory 'x:y'")
    dpsgd.check_module(nn.Sequential(nn.Linear(3, 2)), "fine")


def test_update_dp_figures_are_bounded() -> None:
    base = dict(
        round=1, base_cid="b", num_examples=5, loss=0.1, train_s=1.0, update_cid="c", data=b"x"
    )
    full = {
        "dp_epsilon": 1.0,
        "dp_spent_epsilon": 2.0,
        "dp_delta": 1e-5,
        "dp_noise_multiplier": 1.1,
        "dp_sample_rate": 0.1,
        "dp_steps": 10,
        "dp_accountant": "rdp",
    }
    messages.Update(**base, **full).validate()  # dp_max_epsilon is optional
    with pytest.raises(ValidationError, match="dp_steps"):
        messages.Update(**base, **{**full, "dp_steps": None}).validate()
    with pytest.raises(ValidationError, match="dp_sample_rate"):
        messages.Update(**base, **{**full, "dp_sample_rate": 1.5}).validate()
    with pytest.raises(ValidationError, match="dp_epsilon"):
        messages.Update(**base, **{**full, "dp_epsilon": -1.0}).validate()
    with pytest.raises(ValidationError, match="dp_accountant"):
        messages.Update(**base, **{**full, "dp_accountant": "gdp"}).validate()
    with pytest.raises(ValidationError, match="finite"):
        messages.parse("update", {**base, **full, "dp_epsilon": float("inf")})
    # a secure round's masked input carries them too, checked the same way
    masked = dict(round=1, data=b"x", loss=0.1, train_s=1.0)
    messages.SecaggMasked(**masked, **full).validate()
    with pytest.raises(ValidationError, match="'secagg_masked' reports DP figures without"):
        messages.SecaggMasked(**masked, **{**full, "dp_accountant": None}).validate()


def test_budget_history_lives_in_the_participant_ledger(tmp_path) -> None:
    """The ledger keeps the accountant's history per dataset; ε is rebuilt from it."""
    with Ledger(tmp_path / "l.db") as led:
        for sid, r in (("s1", 1), ("s1", 2), ("s2", 1)):
            led.record_privacy_spending(
                "digits:0/3",
                sid,
                r,
                noise_multiplier=1.2,
                sample_rate=0.1,
                steps=10,
                accountant="rdp",
                delta=1e-5,
                epsilon=1.0,
                spent_epsilon=1.0,
                now=1.0,
            )
        rows = led.privacy_spending("digits:0/3")
        assert [r["session_id"] for r in rows] == ["s1", "s1", "s2"]
        assert led.privacy_spending("digits:1/3") == []
    history = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rows]
    acc = RDPAccountant()
    acc.history = [(1.2, 0.1, 30)]
    assert dpsgd.epsilon(history, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(delta=1e-5))


def test_privacy_compliance_from_reported_epsilons() -> None:
    assert quality.local_dp_round_complies([2.9, 3.0], 3.0)
    assert not quality.local_dp_round_complies([2.9, None], 3.0)  # one without DP figures
    assert not quality.local_dp_round_complies([3.2], 3.0)  # past the target
    assert not quality.local_dp_round_complies([], 3.0)


def test_fedprox_term_is_applied_outside_the_noise(digits) -> None:
    s = _spec(noise_multiplier=0.5)
    m = model_spec(s)
    w = training.init_weights(m, 0)
    dp = dpsgd.plan_round(s["privacy"], s["training"], 4, len(digits), seed=3)
    free = dpsgd.train_private(m, w, digits, _cfg(s), dp)
    held = dpsgd.train_private(m, w, digits, dataclasses.replace(_cfg(s), proximal_mu=5.0), dp)

    def dist(r: training.TrainResult) -> float:
        return float(
            sum(((torch.from_numpy(r.weights[k]) - torch.from_numpy(w[k])) ** 2).sum() for k in w)
        )

    assert dist(held) < dist(free)


def test_participant_declines_exactly_when_the_next_round_passes_its_budget(tmp_path) -> None:
    """fednode.participant's plan for a local-DP round against its own --max-epsilon, from
    its ledger's rows: between one round's ε and two rounds', round 2 is declined
    (LIMIT_EPSILON) and so is a later session on the same data (the e2e: test_dpsgd_e2e)."""
    from fednode.data import parse_dataset_spec
    from fednode.participant import LimitExceeded, Participant
    from protocol.identity import Identity

    s = _spec()
    with Ledger(tmp_path / "p.db") as led:
        node = Participant(
            Identity.generate(),
            led,
            None,  # type: ignore[arg-type]  # no store: nothing is fetched here
            url="ws://127.0.0.1:1",
            coordinator_id="x",
            dataset=parse_dataset_spec("digits:1/2"),
        )
        first = node._plan_dp("s1", s, [])
        eps1 = first.spent_epsilon()
        eps2 = dpsgd.epsilon([first.entry] * 2, first.delta, first.accountant)
        node.max_epsilon = (eps1 + eps2) / 2
        node._plan_dp("s1", s, [])  # round 1 fits
        node._record_dp("s1", 1, first)
        spent = led.privacy_spending("digits:1/2")
        assert [r["round"] for r in spent] == [1] and spent[0]["spent_epsilon"] == eps1
        with pytest.raises(LimitExceeded, match="--max-epsilon") as err:
            node._plan_dp("s1", s, spent)
        assert err.value.code == "LIMIT_EPSILON"
        with pytest.raises(LimitExceeded):  # another session, the same data: carried over
            node._plan_dp("s2", s, spent)
        assert [e["kind"] for e in led.events() if e["kind"] == "privacy_budget"] == [
            "privacy_budget"
        ]  # eps1 >= 80 % of the limit here
        node.max_epsilon = eps2 * 1.01
        again = node._plan_dp("s2", s, spent)
        assert again.session_epsilon() == pytest.approx(eps1)  # a fresh session's own ε
        assert again.spent_epsilon() == pytest.approx(eps2)
