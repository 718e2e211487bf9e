"""Outlier detection that acts: which plain updates of a round are left out of the aggregate,
and which peers are quarantined. Pure (numpy only): the session driver feeds it the round's
updates and the ledger's history and carries out what it decides.

Each update is judged as its *delta* (trained model minus the round's model), against the
coordinate-wise median delta of the round, which up to half of the updates cannot pull far:

- ``norm``: its L2 norm, and ``norm_ratio`` = norm / the median of the norms. Far above 1: a
  scaled or noise update; near 0: a free rider sending the round's model back.
- ``cosine`` to the median delta: below 0 points away from where the others go (sign flip).
- ``z``: the modified z-score 0.6745·(d - median(d)) / MAD(d) of its distance d to the median
  delta (Iglewicz and Hoaglin): robust to the outliers it looks for, unlike a mean and a
  standard deviation.

An update over any threshold (spec ``[robustness]``) is an outlier. Fewer than half of the
round's updates are ever excluded, the most outlying first: a round in which most updates
look alike to nobody keeps its majority (the median itself would then be the attackers'). The
deltas are read a column block at a time (``DeltaRows``): every figure is a sum over columns
or a median of one column, so the memory is a block of the rows (n × width, float64) and a
few vectors of n, besides the rows themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Iglewicz and Hoaglin's constant: 0.6745 = the 0.75 quantile of the standard normal, so that
# the MAD of normal data scales to its standard deviation.
MAD_SCALE = 0.6745
# The MAD is floored at this fraction of the median distance. Honest updates of an IID
# federation lie close together (their MAD is small), so without a floor one that merely
# took a longer step scores z > 3.5 round after round, and would be excluded and then
# quarantined. With it, z > 3.5 needs a distance of at least 1 + 3.5·0.3/0.6745 ≈ 2.6 times
# the median: measured on digits (benchmarks/robustness.py), honest updates stay under 2.4×.
MAD_FLOOR = 0.3


@dataclass(frozen=True)
class Thresholds:
    """The spec's ``[robustness]`` settings that judge one round."""

    max_z: float = 3.5
    min_cosine: float = 0.0
    max_norm_ratio: float = 4.0
    min_norm_ratio: float = 0.05
    min_updates: int = 4

    @classmethod
    def of(cls, section: Mapping[str, Any]) -> Thresholds:
        """The thresholds of a validated spec's ``[robustness]`` section."""
        return cls(**{f: section[f] for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class UpdateScore:
    """One update's figures and the verdict on it (``reasons`` empty: not an outlier)."""

    peer_id: str
    norm: float
    norm_ratio: float
    cosine: float
    distance: float
    z: float
    reasons: tuple[str, ...]
    excluded: bool

    @property
    def outlier(self) -> bool:
        return bool(self.reasons)

    def as_dict(self) -> dict[str, object]:
        """For events and the ledger: finite numbers rounded for reading, reasons as text."""
        return {
            "norm": _round(self.norm),
            "norm_ratio": _round(self.norm_ratio),
            "cosine": _round(self.cosine),
            "distance": _round(self.distance),
            "z": _round(self.z),
            "outlier": self.outlier,
            "excluded": self.excluded,
            "reasons": list(self.reasons),
        }


def _round(v: float) -> float | None:
    return round(v, 6) if math.isfinite(v) else None


@dataclass(frozen=True)
class DeltaRows:
    """A round's update deltas as detection reads them: ``blocks()`` yields, on each call
    anew, the deltas' column blocks as new float64 arrays (len(peers) x block width) that
    detection changes in place, rows in ``peers``' order; non-finite values allowed (such an
    update is judged by that alone).
    A block at a time, so that detection holds O(d + rows x block), not every update at
    once in float64 (fednode.round_updates keeps a round's updates this way)."""

    peers: list[str]
    blocks: Callable[[], Iterable[np.ndarray]]


def rows_of(deltas: Mapping[str, Sequence[np.ndarray]]) -> DeltaRows:
    """Deltas given as tensors by peer, as one block of rows (sorted by peer)."""
    peers = sorted(deltas)
    vecs = np.stack(
        [
            np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in deltas[p]])
            for p in peers
        ]
    )
    return DeltaRows(peers, lambda: (vecs.copy(),))


def score(
    deltas: Mapping[str, Sequence[np.ndarray]] | DeltaRows,
    limits: Thresholds,
    *,
    exclude: bool = True,
    keep: int = 1,
) -> dict[str, UpdateScore] | None:
    """Every update's figures and verdict, or None when the round has fewer than
    ``limits.min_updates`` updates (too few for a median to stand for the honest ones).
    ``exclude`` False (detection = "alert"): outliers are named, none is excluded. At least
    ``keep`` updates stay in (the strategy's minimum: Krum's 2f + 3). Each pass reads the
    deltas once, a column block at a time."""
    rows = deltas if isinstance(deltas, DeltaRows) else rows_of(deltas)
    peers = rows.peers
    if len(peers) < limits.min_updates:
        return None
    broken, norms = _norms(rows)
    # fewer than half, and never below the strategy's minimum
    most = max(0, min((len(peers) - 1) // 2, len(peers) - keep))
    # Pass 1 judges against the median of all finite updates; each later pass against the
    # median of those the previous pass kept, which the outliers no longer pull toward
    # them (3 sign-flipped updates of 10 shrink the median and turn it; without them the
    # honest direction is clearer and a flipped update's cosine falls further below 0).
    reference = ~broken
    for _ in range(PASSES):
        fig = _figures(rows, broken, norms, reference)
        reasons = {p: _reasons(limits, broken[i], fig, i) for i, p in enumerate(peers)}
        ranked = sorted(
            (i for i, p in enumerate(peers) if reasons[p]),
            key=lambda i: (not broken[i], -len(reasons[peers[i]]), -fig.z[i]),
        )
        chosen = set(ranked[:most])
        kept = ~broken & np.array([i not in chosen for i in range(len(peers))])
        if (kept == reference).all():
            break
        reference = kept
    return {
        p: UpdateScore(
            peer_id=p,
            norm=float(norms[i]),
            norm_ratio=float(fig.ratio[i]),
            cosine=float(fig.cos[i]),
            distance=float(fig.dists[i]),
            z=float(fig.z[i]),
            reasons=reasons[p],
            excluded=exclude and i in chosen,
        )
        for i, p in enumerate(peers)
    }


# How many times detection re-judges against the median of the updates it kept.
PASSES = 3


@dataclass(frozen=True)
class _Figures:
    cos: np.ndarray
    ratio: np.ndarray
    dists: np.ndarray
    z: np.ndarray


def _norms(rows: DeltaRows) -> tuple[np.ndarray, np.ndarray]:
    """Which rows hold a non-finite value, and every row's L2 norm (0 for those: they are
    judged by the flag, and kept out of the median's arithmetic)."""
    n = len(rows.peers)
    broken, sq = np.zeros(n, dtype=bool), np.zeros(n)
    for blk in rows.blocks():
        bad = ~np.isfinite(blk).all(axis=1)
        broken |= bad
        blk[bad] = 0.0
        sq += np.einsum("ij,ij->i", blk, blk)
    return broken, np.where(broken, 0.0, np.sqrt(sq))


def _figures(
    rows: DeltaRows, broken: np.ndarray, norms: np.ndarray, reference: np.ndarray
) -> _Figures:
    """Every update's figures against the coordinate-wise median of the ``reference`` rows,
    accumulated over the column blocks (the median of a column needs that column only)."""
    n = len(rows.peers)
    if not reference.any():
        zero = np.zeros(n)
        return _Figures(np.ones(n), np.ones(n), zero, zero)
    med_sq, dots, dist_sq = 0.0, np.zeros(n), np.zeros(n)
    for vecs in rows.blocks():  # each a new array: changed in place, no copies beside it
        vecs[broken] = 0.0
        med = np.median(vecs[reference], axis=0, overwrite_input=True)
        med_sq += float(med @ med)
        dots += vecs @ med
        vecs -= med
        dist_sq += np.einsum("ij,ij->i", vecs, vecs)
    med_len = math.sqrt(med_sq)
    dists = np.sqrt(dist_sq)
    typical_norm = float(np.median(norms[reference]))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dots / (norms * med_len) if med_len > 0 else np.ones(n)
        ratio = norms / typical_norm if typical_norm > 0 else np.ones(n)
    cos = np.where(np.isfinite(cos), cos, 0.0)  # a zero update has no direction
    d_ref = dists[reference]
    d_med = float(np.median(d_ref))
    mad = float(np.median(np.abs(d_ref - d_med)))
    mad = max(mad, MAD_FLOOR * d_med, 1e-12)
    return _Figures(cos, ratio, dists, MAD_SCALE * (dists - d_med) / mad)


def _reasons(limits: Thresholds, broken: bool, fig: _Figures, i: int) -> tuple[str, ...]:
    """The thresholds update ``i`` crosses, in words (empty: not an outlier)."""
    if broken:
        return ("non-finite values",)
    why = []
    if fig.z[i] > limits.max_z:
        why.append(f"distance z-score {fig.z[i]:.1f} > {limits.max_z:g}")
    if fig.cos[i] < limits.min_cosine:
        why.append(f"cosine to the median update {fig.cos[i]:.2f} < {limits.min_cosine:g}")
    if fig.ratio[i] > limits.max_norm_ratio:
        why.append(f"norm {fig.ratio[i]:.1f}× the median > {limits.max_norm_ratio:g}×")
    if limits.min_norm_ratio > 0 and fig.ratio[i] < limits.min_norm_ratio:
        why.append(f"norm {fig.ratio[i]:.3f}× the median < {limits.min_norm_ratio:g}×")
    return tuple(why)


def quarantine_due(history: Sequence[bool], after: int, window: int) -> bool:
    """Whether a peer whose judged rounds, oldest first, were excluded (True) or kept (False)
    as in ``history`` is to be quarantined: ``after`` exclusions among its last ``window``
    judged rounds (``after`` = 0: never)."""
    if after <= 0:
        return False
    return sum(bool(x) for x in list(history)[-window:]) >= after
