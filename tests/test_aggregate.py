"""The aggregation arithmetic (fednode/strategies/aggregate.py) against values computed by
hand: the weighted mean's accumulator, the robust aggregates (median, trimmed mean, Krum,
multi-Krum, Bulyan) and the server optimizers' steps (FedAvgM, FedAdam, FedYogi,
FedAdagrad). The weighted sum and mean's first cases are in tests/test_plugins.py; parity
with Flower is job C's script."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fednode.strategies import aggregate as arith
from protocol.errors import ValidationError


def one(*values: float, weight: float = 1.0) -> tuple[list[np.ndarray], float]:
    """A result of one 1-D float32 tensor."""
    return [np.array(values, np.float32)], weight


def vec(out: list[np.ndarray]) -> list[float]:
    assert len(out) == 1 and out[0].dtype == np.float32
    return [float(x) for x in out[0]]


# --- the weighted mean's accumulator ---------------------------------------------------------


def test_accumulator_equals_the_direct_formula() -> None:
    rng = np.random.default_rng(3)
    shapes = [(100_017,), (3, 5), ()]
    # more updates than one float32 block holds (_FOLD), so a fold and a remainder both count
    weights = [1.0, 3.0, 0.5, 0.0, 7.0] * 4  # 0: counts nothing
    results = [([rng.normal(size=s).astype(np.float32) for s in shapes], w) for w in weights]
    assert len(results) > arith._FOLD
    acc = arith.WeightedMean()
    for arrays, w in results:
        acc.add(arrays, w)
    assert acc.total == 46.0 and acc.count == 20
    total = sum(w for _, w in results)
    for j in range(len(shapes)):
        direct = sum(np.asarray(a[j], np.float64) * w for a, w in results) / total
        assert acc.result()[j].dtype == np.float32
        np.testing.assert_allclose(acc.result()[j], direct, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(acc.sums[j], direct * total, rtol=1e-5, atol=1e-5)
    # weighted_mean is built on it: the same numbers
    for a, b in zip(arith.weighted_mean(results), acc.result(), strict=True):
        assert np.array_equal(a, b)


def test_accumulator_by_hand_and_its_refusals() -> None:
    acc = arith.WeightedMean()
    with pytest.raises(ValidationError, match="no updates"):
        acc.result()
    acc.add([np.array([1.0, 2.0], np.float32)], 1.0)
    acc.add([np.array([4.0, -1.0], np.float32)], 2.0)
    assert vec(acc.result()) == [3.0, 0.0]  # (1 + 8) / 3, (2 - 2) / 3
    with pytest.raises(ValidationError, match="update 2: tensor 0 has shape"):
        acc.add([np.zeros(3, np.float32)], 1.0)
    with pytest.raises(ValidationError, match="update 2 has 2 tensors"):
        acc.add([np.zeros(2), np.zeros(2)], 1.0)
    with pytest.raises(ValidationError, match="update 2 has weight -1"):
        acc.add([np.zeros(2)], -1.0)
    assert acc.count == 2  # a refused update changed nothing
    zero = arith.WeightedMean()
    zero.add([np.ones(2)], 0.0)
    with pytest.raises(ValidationError, match="total weight 0"):
        zero.result()


def test_accumulator_does_not_change_its_inputs() -> None:
    a = np.array([1.0, 2.0], np.float32)
    acc = arith.WeightedMean()
    acc.add([a], 2.0)
    acc.add([a], 2.0)
    assert np.array_equal(a, [1.0, 2.0]) and acc.sums[0] is not a


# --- median and trimmed mean -------------------------------------------------------------------


def test_median_by_hand() -> None:
    # coordinate-wise: column 0 is {1, 9, 3} -> 3; column 1 is {5, -2, 0} -> 0; weights ignored
    assert vec(arith.median([one(1, 5), one(9, -2, weight=100), one(3, 0)])) == [3.0, 0.0]
    # an even count: the mean of the two middle values
    assert vec(arith.median([one(1), one(2), one(10), one(4)])) == [3.0]


def test_trimmed_mean_by_hand() -> None:
    five = [one(v) for v in (10.0, 1.0, 2.0, 3.0, -50.0)]
    assert vec(arith.trimmed_mean(five, 0.2)) == [2.0]  # int(0.2·5) = 1 cut each end: 1, 2, 3
    assert vec(arith.trimmed_mean(five, 0.0)) == [pytest.approx(-34 / 5)]  # the plain mean
    assert vec(arith.trimmed_mean(five, 0.1)) == [pytest.approx(-34 / 5)]  # int(0.5) = 0
    assert vec(arith.trimmed_mean(five, 0.45)) == [2.0]  # int(2.25) = 2: the median
    # each coordinate is trimmed on its own
    two_d = [one(1, 30), one(2, 10), one(3, 20)]
    assert vec(arith.trimmed_mean(two_d, 0.34)) == [2.0, 20.0]


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, math.nan])
def test_trimmed_mean_refuses_beta(beta: float) -> None:
    with pytest.raises(ValidationError, match=r"trimmed_mean: beta = .* \[0, 0\.5\)"):
        arith.trimmed_mean([one(1), one(2)], beta)


# --- Krum, multi-Krum, Bulyan --------------------------------------------------------------------


# Five 1-D models: four near 0 and one far away (the attacker).
KRUM_SET = [one(0.0), one(1.0), one(2.0, weight=3.0), one(4.0), one(100.0)]


def test_pairwise_distances_by_hand() -> None:
    a = [np.array([0.0, 0.0], np.float32), np.array([1.0], np.float32)]
    b = [np.array([3.0, 4.0], np.float32), np.array([-1.0], np.float32)]
    d = arith.pairwise_distances([(a, 1), (b, 5), (a, 2)])
    # every tensor counts: 3² + 4² + 2² = 29; a copy is at distance 0
    assert d.tolist() == [[0.0, 29.0, 0.0], [29.0, 0.0, 29.0], [0.0, 29.0, 0.0]]


def test_krum_by_hand() -> None:
    # n = 5, f = 1: each model's score sums its n - f - 2 = 2 nearest squared distances
    #   0: to 1 (1) and 2 (4) -> 5        1: to 0 (1) and 2 (1) -> 2
    #   2: to 1 (1) and 0 (4) -> 5        4: to 2 (4) and 1 (9) -> 13      100: huge
    assert vec(arith.krum(KRUM_SET, 1, 0)) == [1.0]  # Krum: model 1, as it is
    # multi-Krum with m = 3: models 1, 0 and 2 (scores 2, 5, 5), weighted 1, 1, 3
    assert vec(arith.krum(KRUM_SET, 1, 3)) == [pytest.approx((0 + 1 + 2 * 3) / 5)]
    # m = n - f = 4 still leaves the attacker out
    assert vec(arith.krum(KRUM_SET, 1, 4)) == [pytest.approx((0 + 1 + 6 + 4) / 6)]
    out = arith.krum(KRUM_SET, 1, 0)
    assert out[0] is not KRUM_SET[1][0][0]  # a copy: the caller's update is not the model


@pytest.mark.parametrize(
    ("f", "selected", "match"),
    [
        (2, 0, r"krum: 5 updates, but num_malicious = 2 needs at least 7 \(n > 2·num_mal"),
        (-1, 0, "num_malicious = -1 must be an integer >= 0"),
        (1, 6, r"multikrum: num_selected = 6 must be an integer in \[0, 5\]"),
        (1, -1, r"num_selected = -1 must be an integer in \[0, 5\]"),
    ],
)
def test_krum_refuses(f: int, selected: int, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        arith.krum(KRUM_SET, f, selected)


def test_bulyan_by_hand() -> None:
    # n = 7, f = 1 (needs n >= 4f + 3 = 7). θ = n - 2f = 5 picks by Krum, one at a time, then
    # β = θ - 2f = 3 values nearest the median are averaged, per coordinate.
    values = [0.0, 1.0, 2.0, 3.0, 4.0, 50.0, -60.0]
    results = [one(v, 10 * v + 1, weight=1.0 + i) for i, v in enumerate(values)]
    # Krum (n - f - 2 nearest; as the pool shrinks, so does that count) keeps the 5 near ones:
    # {0, 1, 2, 3, 4}; their median is 2; the 3 values nearest it are 1, 2, 3 -> 2.
    # In coordinate 1 the same models: 1, 11, 21, 31, 41 -> median 21 -> 11, 21, 31 -> 21.
    assert vec(arith.bulyan(results, 1, 0)) == [2.0, 21.0]
    # θ = 3 (the smallest, 2f + 1): β = 1, the selection's median itself. Krum picks 2 first
    # (nearest its 4 nearest), then 1 or 3 (tied: the first), then 3: median 2
    assert vec(arith.bulyan(results, 1, 3)) == [2.0, 21.0]
    # f = 0: Bulyan is θ = n Krum picks (all), then β = n: the plain mean, weights ignored
    assert vec(arith.bulyan(results, 0, 0)) == [pytest.approx(0.0), pytest.approx(1.0)]


@pytest.mark.parametrize(
    ("n", "f", "selected", "match"),
    [
        (6, 1, 0, r"bulyan: 6 updates, but num_malicious = 1 needs at least 7"),
        (7, 1, 2, r"num_selected = 2 must be 0 .* \[3, 5\]"),
        (7, 1, 6, r"num_selected = 6 must be 0"),
    ],
)
def test_bulyan_refuses(n: int, f: int, selected: int, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        arith.bulyan([one(float(i)) for i in range(n)], f, selected)


@pytest.mark.parametrize(
    ("fn", "args"),
    [
        (arith.median, ()),
        (arith.trimmed_mean, (0.1,)),
        (arith.krum, (0, 0)),
        (arith.bulyan, (0, 0)),
    ],
)
def test_robust_aggregates_check_their_inputs(fn: Any, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValidationError, match="no updates"):
        fn([], *args)
    with pytest.raises(ValidationError, match="update 1: tensor 0 has shape"):
        fn([one(1, 2), one(1, 2, 3), one(0, 0)], *args)


# --- server optimizers: two rounds by hand ----------------------------------------------------


def test_fedavgm_two_steps_by_hand() -> None:
    g0 = [np.array([1.0, 0.0], np.float32)]
    # round 1: mean 0.5, 1 -> pseudo-gradient p = g - mean = 0.5, -1; v = p (first step);
    # g1 = g0 - lr·v with lr = 2: 0, 2
    g1, v1 = arith.momentum_step(g0, [np.array([0.5, 1.0])], None, lr=2.0, momentum=0.5)
    assert vec(g1) == [0.0, 2.0] and vec(v1) == [0.5, -1.0]
    # round 2: mean 0, 2 -> p = 0, 0; v = 0.5·v1 + p = 0.25, -0.5; g2 = g1 - 2v = -0.5, 3
    g2, v2 = arith.momentum_step(g1, [np.array([0.0, 2.0])], v1, lr=2.0, momentum=0.5)
    assert vec(g2) == [-0.5, 3.0] and vec(v2) == [0.25, -0.5]
    # lr 1, momentum 0: FedAvg (the mean itself)
    same, _ = arith.momentum_step(g1, [np.array([7.0, 8.0])], v1, lr=1.0, momentum=0.0)
    assert vec(same) == [7.0, 8.0]


def test_fedadam_two_steps_by_hand() -> None:
    b1, b2, tau, lr = 0.5, 0.75, 1.0, 1.0
    g0 = [np.array([0.0], np.float32)]
    # round 1: Δ = 2; m = 0.5·2 = 1; v = 0.25·4 = 1; η₁ = √(1 - 0.75) / (1 - 0.5) = 1;
    # g1 = 0 + 1·1 / (√1 + 1) = 0.5
    g1, m1, v1 = arith.adaptive_step(
        "adam", g0, [np.array([2.0])], None, None, 1, lr=lr, beta1=b1, beta2=b2, tau=tau
    )
    assert vec(m1) == [1.0] and vec(v1) == [1.0] and vec(g1) == [0.5]
    # round 2: mean -0.5 -> Δ = -1; m = 0.5·1 + 0.5·(-1) = 0; v = 0.75·1 + 0.25·1 = 1;
    # m = 0: the model stays
    g2, m2, v2 = arith.adaptive_step(
        "adam", g1, [np.array([-0.5])], m1, v1, 2, lr=lr, beta1=b1, beta2=b2, tau=tau
    )
    assert vec(m2) == [0.0] and vec(v2) == [1.0] and vec(g2) == [0.5]
    # round 3 from there with Δ = 1: m = 0.5, v = 1; η₃ = √(1 - 0.75³) / (1 - 0.5³)
    g3, _, _ = arith.adaptive_step(
        "adam", g2, [np.array([1.5])], m2, v2, 3, lr=lr, beta1=b1, beta2=b2, tau=tau
    )
    eta3 = math.sqrt(1 - 0.75**3) / (1 - 0.5**3)
    assert vec(g3) == [pytest.approx(0.5 + eta3 * 0.5 / 2)]


def test_fedyogi_and_fedadagrad_second_moments_by_hand() -> None:
    g0 = [np.array([0.0], np.float32)]
    kw: dict[str, Any] = {"lr": 1.0, "beta1": 0.0, "beta2": 0.75, "tau": 1.0}
    # yogi, Δ = 2 then Δ = 1: v1 = 0 - 0.25·4·sign(0 - 4) = 1; v2 = 1 - 0.25·1·sign(1 - 1) = 1
    g1, _, v1 = arith.adaptive_step("yogi", g0, [np.array([2.0])], None, None, 1, **kw)
    assert vec(v1) == [1.0] and vec(g1) == [1.0]  # g + 1·2 / (1 + 1), no bias correction
    _, _, v2 = arith.adaptive_step("yogi", g1, [np.array([2.0])], None, v1, 2, **kw)
    assert vec(v2) == [1.0]
    # a Δ² below v shrinks it: Δ = 0.5, v = 1 - 0.25·0.25 = 0.9375
    _, _, v3 = arith.adaptive_step("yogi", g1, [np.array([1.5])], None, v1, 2, **kw)
    assert vec(v3) == [0.9375]
    # adagrad: v is the plain sum of squares: 4, then 4 + 1
    a1, _, w1 = arith.adaptive_step("adagrad", g0, [np.array([2.0])], None, None, 1, **kw)
    assert vec(w1) == [4.0] and vec(a1) == [pytest.approx(2 / 3)]  # 0 + 2 / (2 + 1)
    _, _, w2 = arith.adaptive_step("adagrad", a1, [a1[0] + 1], None, w1, 2, **kw)
    assert vec(w2) == [pytest.approx(5.0)]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr": 0.0}, r"fedadam: server_lr = 0.0 must be in \(0, inf\)"),
        ({"beta1": 1.0}, r"beta1 = 1.0 must be in \[0, 1\)"),
        ({"beta2": -0.1}, r"beta2 = -0.1 must be in \[0, 1\)"),
        ({"tau": 0.0}, r"tau = 0.0 must be in \(0, inf\)"),
        ({"step": 0}, "step = 0 must be an integer >= 1"),
    ],
)
def test_adaptive_step_refuses(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, "step": 1}
    args.update(kw)
    step = args.pop("step")
    with pytest.raises(ValidationError, match=match):
        arith.adaptive_step("adam", [np.zeros(1)], [np.ones(1)], None, None, step, **args)
    with pytest.raises(ValidationError, match=r"fedavgm: server_momentum = 1\.0"):
        arith.momentum_step([np.zeros(1)], [np.ones(1)], None, lr=1.0, momentum=1.0)
