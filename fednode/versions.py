"""Model versions and when to roll back: pure rules, no I/O.

A session's global models form a lineage: every round's version has the version it was
trained from as its parent. A *live* version is one that was not rolled back. The session
watches the live lineage's accuracies after every round: when the last ``k`` versions all
sit more than ``margin`` below the best accuracy reached before each of them, the model has
diverged and the session goes back to the best version so far. A non-finite aggregate is a
divergence at once (it never becomes a version). The coordinator (fednode.session) applies
these rules; the ledger keeps the versions and marks the rolled-back ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: What a version is, as ``fedctl model list`` shows it.
CURRENT, SUPERSEDED, ROLLED_BACK = "current", "superseded", "rolled_back"

History = Sequence[tuple[int, float | None]]  # (round, accuracy) of the live versions, by round


def fallen(history: History, margin: float) -> list[bool]:
    """For each version: is its accuracy more than ``margin`` below the best before it?

    A version without a measured accuracy neither falls nor sets a best.
    """
    out: list[bool] = []
    best: float | None = None
    for _round, acc in history:
        if acc is None or not math.isfinite(acc):
            out.append(False)
            continue
        out.append(best is not None and acc < best - margin)
        best = acc if best is None else max(best, acc)
    return out


def fall_streak(history: History, margin: float) -> int:
    """How many of the last versions, in a row, have fallen (0 when the last one has not)."""
    n = 0
    for f in reversed(fallen(history, margin)):
        if not f:
            break
        n += 1
    return n


def best_round(history: History) -> int | None:
    """The round of the best-accuracy version (the latest one on a tie), or None if no
    version has an accuracy. Fallen versions are below the best by definition, so this is
    also the best version before any fall."""
    best: tuple[float, int] | None = None
    for rnd, acc in history:
        if acc is not None and math.isfinite(acc) and (best is None or acc >= best[0]):
            best = (acc, rnd)
    return None if best is None else best[1]


def rollback_target(history: History, margin: float, k: int) -> int | None:
    """The round to roll back to when the last ``k`` versions fell, else None.

    ``history`` is the live lineage, oldest first (round 0, the initial model, included);
    ``margin`` is in accuracy points as a fraction (0.05 = five points); ``k`` >= 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if fall_streak(history, margin) < k:
        return None
    return best_round(history)


def is_finite(w: Mapping[str, np.ndarray]) -> bool:
    """Every weight is a number (no NaN, no infinity)."""
    return all(bool(np.isfinite(v).all()) for v in w.values())


def statuses(rounds: Sequence[int], rolled_back: Sequence[bool]) -> list[str]:
    """Each version's status: rolled_back, current (the newest live one) or superseded."""
    live = [r for r, rb in zip(rounds, rolled_back, strict=True) if not rb]
    current = max(live) if live else None
    return [
        ROLLED_BACK if rb else CURRENT if r == current else SUPERSEDED
        for r, rb in zip(rounds, rolled_back, strict=True)
    ]
