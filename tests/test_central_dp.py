"""Central DP (DP-FedAvg, fednode.central_dp): the noise's scale, clipping, the accountant,
the distributed noise of secure rounds, and what a spec may combine it with.

The statistical checks draw enough noise that a wrong scale (the sum's σC on the mean, a
missing 1/n, a share not divided by sqrt(m)) lands far outside their tolerance, while the
right one stays inside with overwhelming probability (relative error of a std estimate from
N draws ~ 1/sqrt(2N): 0.2 % for the 10⁵ draws used here, against tolerances of 2 %)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from fednode import central_dp
from fednode.privacy import MECHANISMS
from protocol import spec as specmod
from protocol.errors import SpecError


def model(d: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"w": np.full((d // 4, 4), value, dtype=np.float32), "b": np.zeros(0, np.float32)}


def test_the_noise_on_the_mean_has_std_sigma_clip_over_n() -> None:
    """Zero updates, aggregated 50 times: what is left is the noise alone, σC/n per
    coordinate of the mean (the sum's σC divided by the n updates)."""
    rng = np.random.default_rng(1)
    base = model(2000, 0.5)
    sigma, clip, n = 1.3, 0.5, 4
    draws = []
    for _ in range(50):
        new, norms = central_dp.noisy_mean(base, [dict(base)] * n, clip, sigma, rng)
        assert norms == [0.0] * n
        draws.append((new["w"].astype(np.float64) - base["w"]).ravel())
    noise = np.concatenate(draws)  # 100 000 values
    want = central_dp.noise_std_on_mean(sigma, clip, n)
    assert want == pytest.approx(sigma * clip / n)
    assert abs(noise.mean()) < 5 * want / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(want, rel=0.02)


def test_each_update_is_clipped_to_clip_norm_and_weighs_the_same() -> None:
    base = model(400)
    big = {"w": np.full_like(base["w"], 3.0), "b": base["b"]}  # norm 60
    small = {"w": np.full_like(base["w"], 0.01), "b": base["b"]}  # norm 0.2
    rng = np.random.default_rng(0)
    alone, norms = central_dp.noisy_mean(base, [big], 1.0, 0.0, rng)
    assert norms == [pytest.approx(60.0)]
    assert np.linalg.norm(alone["w"]) == pytest.approx(1.0, rel=1e-5)  # clipped to C
    kept, _ = central_dp.noisy_mean(base, [small], 1.0, 0.0, rng)
    assert np.allclose(kept["w"], small["w"])  # within the bound: untouched
    # uniform weights: the mean of the clipped updates, whatever their example counts
    both, _ = central_dp.noisy_mean(base, [big, small], 1.0, 0.0, rng)
    clipped_big = big["w"] / 60.0
    assert np.allclose(both["w"], (clipped_big + small["w"]) / 2, atol=1e-6)
    assert np.linalg.norm(both["w"]) <= 1.0 + 1e-6


def test_epsilon_per_round_is_opacus_rdp_for_the_recorded_rounds() -> None:
    """One accountant step per round at its (σ, q): computed here with Opacus's
    RDPAccountant directly."""
    history = [(1.1, 1.0), (1.1, 0.5), (1.4, 0.25), (1.1, 0.5)]
    acc = RDPAccountant()
    for k, (sigma, q) in enumerate(history, 1):
        acc.step(noise_multiplier=sigma, sample_rate=q)
        got = central_dp.epsilon(history[:k], 1e-5, "rdp")
        assert got == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert central_dp.epsilon([], 1e-5, "rdp") == 0.0
    assert central_dp.epsilon([(0.0, 1.0)], 1e-5, "rdp") == math.inf


def test_sigma_is_derived_from_the_target_over_the_planned_rounds() -> None:
    s = specmod.validate(
        {"rounds": 10, "privacy": {"mode": "central_dp", "target_epsilon": 3.0, "delta": 1e-5}}
    )
    dp = central_dp.settings(s)
    assert dp is not None and dp.derived and dp.clip_norm == 1.0
    acc = RDPAccountant()
    acc.history = [(dp.noise_multiplier, 1.0, 10)]  # planned at q = 1
    assert 2.95 <= acc.get_epsilon(delta=1e-5) <= 3.0
    given = specmod.validate({"privacy": {"mode": "central_dp", "noise_multiplier": 0.8}})
    dp2 = central_dp.settings(given)
    assert dp2 is not None and dp2.noise_multiplier == 0.8 and not dp2.derived
    assert central_dp.settings(specmod.validate({})) is None
    assert "central_dp" in MECHANISMS


def test_the_sample_rate_and_a_uniform_selection() -> None:
    assert central_dp.sample_rate(3, 12) == 0.25
    assert central_dp.sample_rate(5, 5) == 1.0
    peers = [f"p{i}" for i in range(20)]
    orders = {tuple(central_dp.shuffled(peers)) for _ in range(5)}
    assert all(sorted(o) == sorted(peers) for o in orders) and len(orders) > 1


def test_the_fewest_inputs_a_secure_sum_can_be_unmasked_with() -> None:
    assert central_dp.min_unmaskable(10, 0, 0.6) == 6  # SecAgg: ceil(0.6 * 10)
    assert central_dp.min_unmaskable(3, 0, 0.6) == 2
    assert central_dp.min_unmaskable(10, 4, 0.6) == 3  # SecAgg+: of a peer and 4 neighbours
    assert central_dp.min_unmaskable(2, 0, 1.0) == 2
    assert central_dp.min_unmaskable(1, 0, 0.6) == 1


def test_m_shares_sum_to_the_planned_variance_and_n_to_n_over_m_of_it() -> None:
    """Distributed noise: m participants each add N(0, σ²C²/m); their sum has std σC. With
    n > m inputs the sum has sqrt(n/m) σC, which is the effective multiplier accounted."""
    rng = np.random.default_rng(7)
    sigma, clip, m, d = 1.7, 0.3, 5, 20_000
    std = central_dp.share_std(sigma, clip, m)
    zero = np.zeros(d)
    total = sum(central_dp.add_share(zero, std, rng) for _ in range(m))
    assert total.std() == pytest.approx(sigma * clip, rel=0.02)
    n = 8
    more = sum(central_dp.add_share(zero, std, rng) for _ in range(n))
    eff = central_dp.effective_multiplier(sigma, n, m)
    assert eff == pytest.approx(sigma * math.sqrt(8 / 5))
    assert more.std() == pytest.approx(eff * clip, rel=0.02)


def test_the_secure_norm_bound_holds_for_honest_sums_only() -> None:
    rng = np.random.default_rng(3)
    sigma, clip, m, n, d = 1.0, 1.0, 2, 3, 5000
    std = central_dp.share_std(sigma, clip, m)
    bound = central_dp.secure_norm_bound(clip, std, n, d)
    for _ in range(20):
        ups = [rng.normal(size=d) for _ in range(n)]
        ups = [u * min(1.0, clip / np.linalg.norm(u)) for u in ups]  # each clipped to C
        mean = sum(central_dp.add_share(u, std, rng) for u in ups) / n
        assert np.linalg.norm(mean) <= bound
    # the noise hides a small excess (its norm, 29 here, adds in quadrature), not a large
    # one: an input of norm 120 C (40 C on the mean of 3) is caught
    bad = np.full(d, 120 * clip / math.sqrt(d))
    mean = (bad + sum(central_dp.add_share(np.zeros(d), std, rng) for _ in range(n))) / n
    assert np.linalg.norm(mean) > bound


def central_spec(**privacy: object) -> dict:
    return specmod.validate(
        {"rounds": 5, "privacy": {"mode": "central_dp", "noise_multiplier": 1.0, **privacy}}
    )


def test_a_participant_plans_its_share_from_the_spec_and_refuses_what_would_weaken_it() -> None:
    s = central_spec(clip_norm=0.5)
    share = central_dp.share_plan(s, 8.0, 0.6, 0, 5, 1)
    assert share.share_count == 3 and share.std == pytest.approx(0.5 / math.sqrt(3))
    with pytest.raises(SpecError, match="weight = 3"):
        central_dp.share_plan(s, 8.0, 0.6, 0, 5, 3)
    with pytest.raises(SpecError, match=r"aggregation\.clip = 2") as err:
        central_dp.share_plan(central_spec(noise_multiplier=5.0), 2.0, 0.6, 0, 3, 1)
    assert "raise aggregation.clip to at least" in (err.value.hint or "")
    with pytest.raises(SpecError):
        central_dp.share_plan(specmod.validate({}), 8.0, 0.6, 0, 3, 1)


def test_the_spec_refuses_robust_strategies_and_exclusion_with_central_dp() -> None:
    for name in ("median", "trimmed_mean", "krum", "bulyan"):
        with pytest.raises(SpecError, match=f'"{name}" with privacy.mode = "central_dp"'):
            specmod.validate(
                {
                    "min_participants": 7,
                    "aggregation": {"strategy": name},
                    "privacy": {"mode": "central_dp"},
                }
            )
    with pytest.raises(SpecError, match="exclude"):
        specmod.validate(
            {"privacy": {"mode": "central_dp"}, "robustness": {"detection": "exclude"}}
        )
    for name in ("fedavg", "fedprox", "fedavgm", "fedadam"):
        s = specmod.validate({"aggregation": {"strategy": name}, "privacy": {"mode": "central_dp"}})
        assert specmod.detection_mode(s) == "alert"  # scored, never left out
    assert specmod.detection_mode(specmod.validate({})) == "exclude"
