"""The arithmetic of aggregation, as plain functions over ``(arrays, weight)`` pairs.

A *result* is one participant's model as a list of arrays (in the global model's tensor
order) and the weight it has in the aggregate (its bounded example count or share:
fednode.bounds). Strategies convert their named tensors to these lists and back
(``to_arrays`` / ``from_arrays``), so that the arithmetic knows nothing of names, peers or
the wire, and can be checked against values computed by hand (tests/test_aggregate.py).
Sums are accumulated in float64, so the result does not drift with the number of
participants; results come back as float32, the dtype of every model on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.linalg.blas import saxpy

from protocol.errors import ValidationError

Arrays = list[np.ndarray]
Result = tuple[Arrays, float]


def _check(results: Sequence[Result]) -> list[float]:
    """The weights of ``results``, after checking that every result is usable: at least one,
    each weight finite and >= 0, the same number of arrays of the same shapes in each."""
    if not results:
        raise ValidationError("no updates to aggregate")
    first = results[0][0]
    masses = []
    for i, (arrays, weight) in enumerate(results):
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise ValidationError(f"update {i} has weight {weight!r}; a weight must be >= 0")
        if len(arrays) != len(first):
            raise ValidationError(
                f"update {i} has {len(arrays)} tensors, the first update has {len(first)}"
            )
        for j, (a, b) in enumerate(zip(arrays, first, strict=True)):
            if np.shape(a) != np.shape(b):
                raise ValidationError(
                    f"update {i}: tensor {j} has shape {np.shape(a)}, expected {np.shape(b)}"
                )
        masses.append(w)
    return masses


def weighted_sum(results: Sequence[Result]) -> Arrays:
    """sum_i weight_i * arrays_i, tensor by tensor, in float64."""
    _check(results)
    acc = WeightedMean()
    for arrays, weight in results:
        acc.add(arrays, weight)
    return acc.sums


def total_weight(results: Sequence[Result]) -> float:
    return float(sum(_check(results)))


# How many updates WeightedMean adds into its float32 block before folding the block into
# the float64 sums. Each add is one fused multiply-add pass in float32 (BLAS saxpy: 4 bytes
# read and 4 written per value, like numpy's own float32 sum); the fold, one float64 pass,
# comes once per _FOLD updates. A block of 16 float32 terms is off the exact sum by at most
# about 16 float32 roundings (~1e-6 relative) before it reaches float64, under the float32
# rounding of the result itself; the sums then do not drift with the number of updates.
_FOLD = 16


class WeightedMean:
    """The weighted mean of updates added one at a time: sum_i w_i·x_i / sum_i w_i.

    Memory is O(d), whatever the number of updates: one float64 sum and one float32 block per
    tensor, reused for every update (no per-update temporaries for float32 inputs).
    ``result()`` gives float32, the dtype on the wire. benchmarks/aggregate.py measures
    ``add`` against numpy's own float32 sum over the same arrays.
    """

    def __init__(self) -> None:
        self._sums: Arrays | None = None  # float64, everything folded so far
        self._blocks: list[np.ndarray] = []  # float32, the updates since the last fold
        self._pending = 0
        self._shapes: list[tuple[int, ...]] = []
        self.total = 0.0  # sum of the weights added
        self.count = 0  # updates added

    def add(self, arrays: Sequence[np.ndarray], weight: float) -> None:
        """Add ``weight`` times ``arrays``. ValidationError, naming the update by the order
        it was added in (0 first), for a weight that is not finite and >= 0, or tensors that
        differ in number or shape from the first update's."""
        i, w = self.count, float(weight)
        if not np.isfinite(w) or w < 0:
            raise ValidationError(f"update {i} has weight {weight!r}; a weight must be >= 0")
        if self._sums is None:
            self._shapes = [np.shape(a) for a in arrays]
            self._sums = [np.zeros(np.shape(a), np.float64) for a in arrays]
            self._blocks = [np.zeros(np.shape(a), np.float32) for a in arrays]
        else:
            self._check_shapes(i, arrays)
        for block, a in zip(self._blocks, arrays, strict=True):
            x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
            if x.size:
                saxpy(x, block.reshape(-1), a=w)  # block += w·x, in place
        self._pending += 1
        if self._pending == _FOLD:
            self._fold()
        self.total += w
        self.count += 1

    def _fold(self) -> None:
        assert self._sums is not None
        for acc, block in zip(self._sums, self._blocks, strict=True):
            np.add(acc, block, out=acc)
            block.fill(0.0)
        self._pending = 0

    def _check_shapes(self, i: int, arrays: Sequence[np.ndarray]) -> None:
        if len(arrays) != len(self._shapes):
            raise ValidationError(
                f"update {i} has {len(arrays)} tensors, the first update has {len(self._shapes)}"
            )
        for j, (a, want) in enumerate(zip(arrays, self._shapes, strict=True)):
            if np.shape(a) != want:
                raise ValidationError(
                    f"update {i}: tensor {j} has shape {np.shape(a)}, expected {want}"
                )

    @property
    def sums(self) -> Arrays:
        """sum_i w_i·x_i per tensor (float64; the accumulator's own arrays)."""
        if self._sums is None:
            raise ValidationError("no updates to aggregate")
        if self._pending:
            self._fold()
        return self._sums

    def result(self) -> Arrays:
        """The weighted mean as float32. ValidationError when nothing was added, or the
        weights sum to 0."""
        sums = self.sums
        if not self.total > 0:
            raise ValidationError("the updates hold zero examples (total weight 0) in total")
        return [
            np.divide(s, self.total, out=np.empty(s.shape, np.float32), casting="same_kind")
            for s in sums
        ]


def weighted_mean(results: Sequence[Result]) -> Arrays:
    """sum_i weight_i * arrays_i / sum_i weight_i, as float32 (FedAvg's aggregate; Flower's
    ``aggregate``). Memory: O(d) beyond the inputs (WeightedMean).

    ValidationError when there is nothing to average: no results, or weights summing to 0.
    """
    _check(results)
    acc = WeightedMean()
    for arrays, weight in results:
        acc.add(arrays, weight)
    return acc.result()


def to_arrays(weights: Mapping[str, np.ndarray], order: Sequence[str]) -> Arrays:
    """A model's tensors as a list in ``order`` (the global model's names)."""
    return [weights[k] for k in order]


def from_arrays(arrays: Sequence[np.ndarray], order: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(zip(order, arrays, strict=True))


# --- robust aggregates: each needs every update at once --------------------------------------
#
# These follow Flower 1.41's aggregate_median / aggregate_trimmed_avg / aggregate_krum /
# aggregate_bulyan (docs/strategies.md): the weights are ignored except by multi-Krum, which
# averages the models it selects with their weights. Each works tensor by tensor on a stack
# of that tensor across the n updates (float32 for median and trimmed mean, which only
# select and average values, in place; float64 for the distances of Krum and Bulyan), so
# besides the n·d inputs it holds n times the largest tensor at a time
# (benchmarks/aggregate.py measures the peaks).


def _stack(results: Sequence[Result], j: int, dtype: type = np.float64) -> np.ndarray:
    """Tensor ``j`` of every result, stacked along a new axis 0."""
    first = np.shape(results[0][0][j])
    out = np.empty((len(results), *first), dtype=dtype)
    for i, (arrays, _) in enumerate(results):
        out[i] = arrays[j]
    return out


def median(results: Sequence[Result]) -> Arrays:
    """The coordinate-wise median of the models (Yin et al., 2018), weights ignored (as
    Flower's ``aggregate_median``); for an even n, the mean of the two middle values.
    Memory: the n·d inputs and n × the largest tensor (float32, sorted in place)."""
    _check(results)
    return [
        np.median(_stack(results, j, np.float32), axis=0, overwrite_input=True).astype(np.float32)
        for j in range(len(results[0][0]))
    ]


def trimmed_mean(results: Sequence[Result], beta: float) -> Arrays:
    """The coordinate-wise trimmed mean (Yin et al., 2018): in each coordinate the
    ``int(beta·n)`` smallest and as many largest values are cut, the rest averaged; weights
    ignored (as Flower's ``aggregate_trimmed_avg``). ``beta`` is the fraction cut from EACH
    end, 0 <= beta < 0.5 (0: the plain mean). Memory: as ``median``."""
    if not 0.0 <= float(beta) < 0.5:
        raise ValidationError(
            f"trimmed_mean: beta = {beta!r} must be in [0, 0.5): the fraction cut from each end"
        )
    _check(results)
    n = len(results)
    cut = int(beta * n)  # as scipy's trim_mean and Flower: floor of the fraction
    out = []
    for j in range(len(results[0][0])):
        part = _stack(results, j, np.float32)
        part.partition((cut, n - cut - 1), axis=0)  # in place: no second stack
        out.append(part[cut : n - cut].mean(axis=0, dtype=np.float64).astype(np.float32))
    return out


def _check_malicious(who: str, num_malicious: int, n: int, need: int, rule: str) -> None:
    if int(num_malicious) != num_malicious or num_malicious < 0:
        raise ValidationError(f"{who}: num_malicious = {num_malicious!r} must be an integer >= 0")
    if n < need:
        raise ValidationError(
            f"{who}: {n} updates, but num_malicious = {num_malicious} needs at least {need} "
            f"({rule})",
            hint="lower num_malicious, or have more participants in every round (min_participants)",
        )


def pairwise_distances(results: Sequence[Result]) -> np.ndarray:
    """The n×n matrix of squared Euclidean distances between the models (all tensors as one
    vector), in float64; the diagonal is 0. Computed from the differences themselves, not
    from |a|² + |b|² - 2a·b, so close models keep their small distances exactly. Memory:
    n² float64, one float32 stack of n × the largest tensor, and one float64 difference."""
    _check(results)
    n = len(results)
    dist = np.zeros((n, n), dtype=np.float64)
    for j in range(len(results[0][0])):
        x = _stack(results, j, np.float32).reshape(n, -1)
        diff = np.empty(x.shape[1], dtype=np.float64)
        for i in range(n - 1):
            for k in range(i + 1, n):
                np.subtract(x[k], x[i], out=diff, dtype=np.float64)
                dist[i, k] += float(np.dot(diff, diff))
    return dist + dist.T


def _krum_scores(dist: np.ndarray, num_malicious: int) -> np.ndarray:
    """Each model's Krum score: the sum of its squared distances to its n - f - 2 nearest
    other models (at least 1, at most n - 1), as Flower's ``aggregate_krum`` computes it."""
    n = len(dist)
    k = min(max(1, n - num_malicious - 2), n - 1)
    # column 0 of each sorted row is a zero: the model's distance to itself (or to a copy)
    return np.sort(dist, axis=1)[:, 1 : k + 1].sum(axis=1)


def krum(results: Sequence[Result], num_malicious: int, num_selected: int) -> Arrays:
    """Krum (Blanchard et al., 2017): the model whose n - f - 2 nearest neighbours are
    nearest (f = ``num_malicious``), returned as it is; needs n > 2f + 2. With
    ``num_selected`` = m >= 1, multi-Krum: the weighted mean of the m models of lowest score
    (Flower's ``to_keep``; m <= n). ``num_selected`` = 0 is Krum. Weights count only in
    multi-Krum's mean. Memory: the n·d inputs, n² distances, and n × the largest tensor
    (float32) while the distances are computed."""
    who = "krum" if not num_selected else "multikrum"
    _check(results)
    n = len(results)
    _check_malicious(who, num_malicious, n, 2 * num_malicious + 3, "n > 2·num_malicious + 2")
    if int(num_selected) != num_selected or not 0 <= num_selected <= n:
        raise ValidationError(
            f"{who}: num_selected = {num_selected!r} must be an integer in [0, {n}] "
            f"(0 = Krum's one model; m = the mean of the m best of the {n} updates)"
        )
    scores = _krum_scores(pairwise_distances(results), int(num_malicious))
    if not num_selected:
        return [np.array(a, dtype=np.float32) for a in results[int(np.argmin(scores))][0]]
    best = np.argsort(scores, kind="stable")[: int(num_selected)]
    return weighted_mean([results[i] for i in best])


def bulyan(results: Sequence[Result], num_malicious: int, num_selected: int = 0) -> Arrays:
    """Bulyan (El Mhamdi et al., 2018) with Krum as its selection rule, as Flower's
    ``aggregate_bulyan(results, f, aggregate_krum, to_keep=0)``: Krum picks a model, which
    leaves the pool, θ times (θ = ``num_selected``; 0 = n - 2f, the paper's); then in each
    coordinate the β = θ - 2f values of the selected models nearest their median are
    averaged. Needs n >= 4f + 3 and 2f + 1 <= θ <= n - 2f. Weights ignored. Memory: as
    ``krum``, plus θ × the largest tensor (float64)."""
    _check(results)
    n, f = len(results), num_malicious
    _check_malicious("bulyan", f, n, 4 * f + 3, "n >= 4·num_malicious + 3")
    theta = int(num_selected) or n - 2 * f
    if int(num_selected) != num_selected or not 2 * f + 1 <= theta <= n - 2 * f:
        raise ValidationError(
            f"bulyan: num_selected = {num_selected!r} must be 0 (n - 2·num_malicious = "
            f"{n - 2 * f}) or an integer in [{2 * f + 1}, {n - 2 * f}] "
            "(2·num_malicious + 1 to n - 2·num_malicious)"
        )
    dist = pairwise_distances(results)
    pool = list(range(n))
    chosen: list[int] = []
    for _ in range(theta):
        scores = _krum_scores(dist[np.ix_(pool, pool)], f)
        chosen.append(pool.pop(int(np.argmin(scores))))
    beta = theta - 2 * f
    out = []
    for j in range(len(results[0][0])):
        sel = _stack([results[i] for i in chosen], j)
        mid = np.median(sel, axis=0)
        nearest = np.argpartition(np.abs(sel - mid), beta - 1, axis=0)[:beta]
        out.append(np.take_along_axis(sel, nearest, axis=0).mean(axis=0).astype(np.float32))
    return out


# --- server optimizers: a step from the round's model g and the updates' weighted mean ------
#
# The pseudo-gradient of a round is Δ = mean - g (the direction the participants moved).
# Computed in float64; the new model and the moments come back as float32 (the moments are
# the strategy's state, stored with each model version).


def _check_rate(who: str, name: str, value: float, lo: float, hi: float, lo_open: bool) -> None:
    ok = (value > lo if lo_open else value >= lo) and value < hi and np.isfinite(value)
    if not ok:
        left = "(" if lo_open else "["
        raise ValidationError(f"{who}: {name} = {value!r} must be in {left}{lo:g}, {hi:g})")


def _f32(arrays: Sequence[np.ndarray]) -> Arrays:
    return [np.asarray(a, dtype=np.float32) for a in arrays]


def momentum_step(
    global_arrays: Sequence[np.ndarray],
    mean: Sequence[np.ndarray],
    velocity: Sequence[np.ndarray] | None,
    *,
    lr: float,
    momentum: float,
) -> tuple[Arrays, Arrays]:
    """FedAvgM (Hsu et al., 2019), as Flower's FedAvgM: with the pseudo-gradient
    p = g - mean, the velocity v' = momentum·v + p (v' = p at the first step: ``velocity``
    None) and the new model g - lr·v'. Returns (new model, v'). lr = 1 and momentum = 0
    give the mean itself (FedAvg)."""
    _check_rate("fedavgm", "server_lr", lr, 0.0, np.inf, True)
    _check_rate("fedavgm", "server_momentum", momentum, 0.0, 1.0, False)
    new, vel = [], []
    for j, (g, x) in enumerate(zip(global_arrays, mean, strict=True)):
        g64 = np.asarray(g, dtype=np.float64)
        v = g64 - x  # p, the pseudo-gradient
        if velocity is not None:
            v += momentum * np.asarray(velocity[j], dtype=np.float64)
        vel.append(v)
        new.append(g64 - lr * v)
    return _f32(new), _f32(vel)


ADAPTIVE_RULES = ("adam", "yogi", "adagrad")


def adaptive_step(
    rule: str,
    global_arrays: Sequence[np.ndarray],
    mean: Sequence[np.ndarray],
    m: Sequence[np.ndarray] | None,
    v: Sequence[np.ndarray] | None,
    step: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Arrays, Arrays, Arrays]:
    """One server step of FedAdam, FedYogi or FedAdagrad (Reddi et al., 2021, Algorithm 2),
    as Flower computes them. With Δ = mean - g and m, v zero before the first step:

        m' = β1·m + (1 - β1)·Δ
        adam:     v' = β2·v + (1 - β2)·Δ²
        yogi:     v' = v - (1 - β2)·Δ²·sign(v - Δ²)
        adagrad:  v' = v + Δ²
        g' = g + η·m' / (√v' + τ)

    Adam alone corrects the moments' zero start (Kingma and Ba): η is η·√(1 - β2^t) /
    (1 - β1^t) at ``step`` t = 1, 2, ... (Flower uses its server round r + 1 for t).
    ``tau`` (> 0) bounds the adaptivity: coordinates whose v' is small move by at most
    about η·|m'|/τ. Returns (new model, m', v')."""
    if rule not in ADAPTIVE_RULES:
        raise ValidationError(f"server optimizer {rule!r} is not one of {ADAPTIVE_RULES}")
    who = f"fed{rule}"
    _check_rate(who, "server_lr", lr, 0.0, np.inf, True)
    _check_rate(who, "beta1", beta1, 0.0, 1.0, False)
    _check_rate(who, "beta2", beta2, 0.0, 1.0, False)
    _check_rate(who, "tau", tau, 0.0, np.inf, True)
    if int(step) != step or step < 1:
        raise ValidationError(f"{who}: step = {step!r} must be an integer >= 1")
    eta = lr
    if rule == "adam":
        eta = lr * np.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    new, m_out, v_out = [], [], []
    for j, (g, x) in enumerate(zip(global_arrays, mean, strict=True)):
        g64 = np.asarray(g, dtype=np.float64)
        delta = np.asarray(x, dtype=np.float64) - g64
        sq = delta * delta
        mj = (1.0 - beta1) * delta
        if m is not None and beta1:
            mj += beta1 * np.asarray(m[j], dtype=np.float64)
        vj = np.zeros_like(sq) if v is None else np.asarray(v[j], dtype=np.float64)
        if rule == "adam":
            vj = beta2 * vj + (1.0 - beta2) * sq
        elif rule == "yogi":
            vj = vj - (1.0 - beta2) * sq * np.sign(vj - sq)
        else:
            vj = vj + sq
        m_out.append(mj)
        v_out.append(vj)
        new.append(g64 + eta * mj / (np.sqrt(vj) + tau))
    return _f32(new), _f32(m_out), _f32(v_out)
