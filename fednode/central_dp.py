"""Central differential privacy (DP-FedAvg, McMahan et al. 2018): the arithmetic.

``[privacy] mode = "central_dp"``. Every round, each update (trained model minus the round's
model) is clipped to L2 norm C = ``clip_norm``; the clipped updates are summed with uniform
weights and Gaussian noise N(0, σ²C²) is added to each coordinate of the *sum*, σ being the
noise multiplier. The new model is g + (noisy sum) / n, n the updates in the sum, so the
noise's standard deviation on the *mean* is σC / n. One participant (all its records: a
user-level guarantee) changes the sum by at most C, so each round is the Gaussian mechanism
with noise multiplier σ, subsampled with rate q = selected / eligible; the rounds compose
under the accountant (Opacus's, ``privacy.accountant``: rdp or prv), one step per round.

Why uniform weights: the sensitivity C holds only if no participant can weigh more than one
other; example-count weighting (or a weight share) would let a large participant move the
mean by more than C / n. Why only mean-based strategies (fedavg, fedprox and the FedOpt
family, through ``Strategy.from_mean``): the noise goes on the mean, and anything computed
from the noisy mean alone is post-processing; a median or Krum reads single updates, which
the noise does not cover.

With secure aggregation the coordinator never holds the sum before it is noisy: each of the
round's participants adds its share N(0, σ²C²/m) to its clipped update before masking, m
being the fewest inputs a secure sum can hold and still be unmasked (``min_unmaskable``), so
any sum the coordinator can decode carries at least the planned variance σ²C². When n > m
inputs survive, the sum carries n/m of it: the round is accounted with the effective
multiplier σ·sqrt(n/m) (never less than σ). docs/privacy.md has the threat models.

Pure: numpy, and Opacus's accountants (imported when first used: they load torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednode import bounds
from fednode.weights import Weights
from protocol import plugins
from protocol.errors import SpecError

#: How far past sqrt(d) standard deviations the norm of d-dimensional Gaussian noise may
#: go before a sum is judged out of bounds: P(|z| > sqrt(d) + t) <= exp(-t²/2), 1e-14 at 8.
NOISE_NORM_SLACK = 8.0

#: A participant's share of the noise must fit the secure fixed point's per-coordinate clip
#: this many standard deviations out (beyond it a share would be cut, and the sum would carry
#: less noise than accounted): 6 sd, 2e-9 of the coordinates.
SHARE_SDS = 6.0


@dataclass(frozen=True)
class CentralDp:
    """A session's central-DP settings, as both the coordinator and its participants read
    them from the spec (so that a participant computes its noise share itself)."""

    noise_multiplier: float  # σ: the noise's standard deviation on the sum, over clip_norm
    clip_norm: float  # C: each update's L2 norm is scaled down to at most this
    delta: float
    accountant: str  # rdp | prv (Opacus)
    derived: bool  # σ came from target_epsilon over the planned rounds (not given)

    def describe(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "delta": self.delta,
            "accountant": self.accountant,
            "derived": self.derived,
        }


@functools.lru_cache(maxsize=64)
def planned_noise_multiplier(
    target_epsilon: float, delta: float, rounds: int, accountant: str
) -> float:
    """σ that spends ``target_epsilon`` over ``rounds`` rounds at sample rate 1 (Opacus's
    get_noise_multiplier, one step per round). Planned with q = 1, every eligible
    participant in every round, so the target holds whatever the selection turns out to be;
    subsampling only lowers the ε that the rounds are then accounted at."""
    from opacus.accountants.utils import get_noise_multiplier

    with _quiet():
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=max(1, rounds),
                accountant=accountant,
            )
        )


def settings(spec: Mapping[str, Any]) -> CentralDp | None:
    """The spec's central DP, or None when ``privacy.mode`` is not central_dp."""
    p = spec.get("privacy", {})
    if p.get("mode") != plugins.CENTRAL_DP:
        return None
    given = float(p["noise_multiplier"])
    sigma = given or planned_noise_multiplier(
        float(p["target_epsilon"]), float(p["delta"]), int(spec["rounds"]), str(p["accountant"])
    )
    return CentralDp(sigma, float(p["clip_norm"]), float(p["delta"]), p["accountant"], not given)


# --- plain rounds: the coordinator clips, sums and adds the noise ----------------------------


def noise_std_on_mean(sigma: float, clip_norm: float, n: int) -> float:
    """The standard deviation of the noise on each coordinate of the mean of n updates."""
    return sigma * clip_norm / n


def noisy_mean(
    base: Weights,
    updates: Sequence[Weights],
    clip_norm: float,
    sigma: float,
    rng: np.random.Generator,
) -> tuple[Weights, list[float]]:
    """g + (Σ clip(w_i - g) + N(0, σ²C²)) / n: DP-FedAvg's new model (before the strategy's
    server step), and each update's norm before clipping. Uniform weights; float64 inside."""
    if not updates:
        raise ValueError("no update to aggregate")
    n = len(updates)
    norms: list[float] = []
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in base.items()}
    for w in updates:
        clipped, norm, _scale = bounds.clip_update(w, base, clip_norm)
        norms.append(norm)
        for k in total:
            total[k] += clipped[k].astype(np.float64) - base[k]
    return noisy_mean_of_sum(base, total, n, clip_norm, sigma, rng), norms


def noisy_mean_of_sum(
    base: Weights,
    total: Mapping[str, np.ndarray],
    n: int,
    clip_norm: float,
    sigma: float,
    rng: np.random.Generator,
) -> Weights:
    """g + (``total`` + N(0, σ²C²)) / n, ``total`` being the sum of n clipped updates'
    steps (float64, by tensor): the noise is drawn tensor by tensor in ``base``'s order."""
    std = sigma * clip_norm  # on the sum
    out: Weights = {}
    for k in base:
        s = total[k]
        noisy = s + rng.normal(0.0, std, size=s.shape) if std > 0 else s
        out[k] = (base[k].astype(np.float64) + noisy / n).astype(np.float32)
    return out


# --- secure rounds: each participant adds its share -----------------------------------------


def min_unmaskable(roster: int, neighbours: int, threshold: float) -> int:
    """The fewest masked inputs a secure sum can hold and still be unmasked: every secret
    needs ceil(threshold · holders) of its holders among the survivors (protocol.secagg
    shares_needed), holders being the whole roster (SecAgg, neighbours 0) or a participant
    and its neighbours (SecAgg+). A lower bound for SecAgg+, so shares sized for it are
    never too small."""
    holders = roster if neighbours <= 0 else min(neighbours + 1, roster)
    if holders <= 1:
        return max(holders, 1)
    return min(holders, max(2, math.ceil(threshold * holders - 1e-9)))


def share_std(sigma: float, clip_norm: float, m: int) -> float:
    """One participant's share of the noise: std σC / sqrt(m), so that m shares sum to
    variance σ²C²."""
    return sigma * clip_norm / math.sqrt(m)


def effective_multiplier(sigma: float, in_sum: int, m: int) -> float:
    """The noise multiplier of a secure sum of ``in_sum`` shares sized for m: σ·sqrt(n/m)."""
    return sigma * math.sqrt(in_sum / m)


def add_share(flat_update: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """A participant's clipped update plus its share of the noise (float64)."""
    return np.asarray(flat_update, dtype=np.float64) + rng.normal(0.0, std, size=flat_update.shape)


def share_fits(fixed_point_clip: float, clip_norm: float, std: float) -> float | None:
    """None when a share fits the secure fixed point's per-coordinate clip, else the clip
    it needs: a coordinate of a clipped update is at most C, its noise SHARE_SDS sd."""
    need = clip_norm + SHARE_SDS * std
    return None if fixed_point_clip >= need else need


@dataclass(frozen=True)
class Share:
    """What one participant adds in a secure central-DP round (fednode.participant)."""

    noise_multiplier: float  # σ
    clip_norm: float  # its update is clipped to this first
    share_count: int  # m: the shares are sized so that m of them carry σ²C²
    std: float  # σC / sqrt(m), on each coordinate of its update

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def share_plan(
    spec: Mapping[str, Any],
    fixed_point_clip: float,
    threshold: float,
    neighbours: int,
    roster: int,
    weight: int,
) -> Share:
    """A participant's noise share for a secure round of ``roster`` participants, computed
    from the spec and the round's secure-aggregation parameters it masks with, never from a
    figure the coordinator sends (the coordinator need not be trusted with the noise).
    SpecError (the task is declined) when the coordinator assigned a weight other than 1
    (the sum would no longer be one of uniformly weighted, clipped updates) or when the
    fixed point's per-coordinate clip would cut the share (the sum would carry less noise
    than accounted)."""
    dp = settings(spec)
    if dp is None:
        raise SpecError(
            'round_start.privacy is "central_dp" but the spec\'s privacy.mode is not',
            hint="the coordinator sent an inconsistent round_start; update it",
        )
    if weight != 1:
        raise SpecError(
            f"round_start.secagg.weight = {weight} under central DP, where every update "
            "weighs 1 (the noise is sized for a sum of updates of norm at most clip_norm)",
            hint="the coordinator must assign weight 1 to every participant; update it",
        )
    m = min_unmaskable(roster, neighbours, threshold)
    std = share_std(dp.noise_multiplier, dp.clip_norm, m)
    need = share_fits(fixed_point_clip, dp.clip_norm, std)
    if need is not None:
        raise SpecError(
            f"aggregation.clip = {fixed_point_clip:g} would cut this participant's share of "
            f"the central-DP noise (std {std:.3g} = σ {dp.noise_multiplier:.3g} x clip_norm "
            f"{dp.clip_norm:g} / sqrt({m})), leaving the sum less noisy than accounted",
            hint=f"raise aggregation.clip to at least {math.ceil(need)} (and bits if the spec "
            "check asks), or lower privacy.clip_norm",
        )
    return Share(dp.noise_multiplier, dp.clip_norm, m, std)


def secure_norm_bound(clip_norm: float, std: float, in_sum: int, dim: int) -> float:
    """The most a secure round's mean update may measure when every input was clipped to C
    and carried a share of std ``std``: C (uniform weights) plus the norm of the mean noise,
    std / sqrt(n) per coordinate, at sqrt(d) + NOISE_NORM_SLACK of its deviations."""
    return clip_norm + std / math.sqrt(max(in_sum, 1)) * (math.sqrt(dim) + NOISE_NORM_SLACK)


# --- accounting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """One round's noisy aggregate, as the coordinator accounts it."""

    round: int
    noise_multiplier: float  # effective: σ, or σ·sqrt(n/m) for a secure sum of n shares
    planned_noise_multiplier: float  # σ of the spec
    clip_norm: float
    sample_rate: float  # q = selected / eligible
    selected: int
    eligible: int
    updates: int  # n: inputs in the sum
    noise_std: float  # on each coordinate of the mean
    secure: bool
    share_count: int | None  # m, the count each secure share was sized for (None: plain)


def shuffled(candidates: Sequence[str]) -> list[str]:
    """The round's candidates in a uniformly random order (the OS's entropy), so that taking
    the first max_participants is a uniform sample: the accountant's sample rate assumes the
    selection is random, not the order in which peers connected."""
    out = list(candidates)
    random.SystemRandom().shuffle(out)
    return out


def sample_rate(selected: int, eligible: int) -> float:
    """q = selected / eligible, within (0, 1]."""
    return min(1.0, selected / eligible) if eligible > 0 else 1.0


def epsilon(history: Sequence[tuple[float, float]], delta: float, accountant: str) -> float:
    """The ε spent by rounds of (noise multiplier, sample rate), one step each, at ``delta``,
    by Opacus's accountant (``rdp`` or ``prv``); 0 for none, inf for a round without noise."""
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    for sigma, q in history:
        acc.step(noise_multiplier=sigma, sample_rate=q)
    with _quiet():
        return float(acc.get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opacus warns that the best order is the largest alpha (a looser bound, still a
    bound) and, for prv at q = 1, of a log of 0 it handles: neither is news to an operator."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
        yield
