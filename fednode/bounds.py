"""How much one participant may weigh in the aggregate and move the model (pure rules).

A participant chooses what it reports, so nothing it claims is taken as it comes:

* **its weight**: under ``weighting = "examples"`` the example count of an update is at most
  what the participant registered for the session (the smallest count it registered since the
  session began: it cannot grow mid-session) and at most ``max_examples``; under ``"uniform"``
  every participant weighs 1. Then no share of the aggregate may exceed ``max_weight_share``:
  what a capped participant loses goes to the others in proportion to their weights
  (``capped_shares``, water-filling), and below ``1 / participants`` every share is equal.
* **its step**: the update ``w - g`` is scaled down to at most ``max_update_norm`` in L2 norm
  (``clip_update``), so even a participant with the largest share moves the model at most
  ``max_weight_share * max_update_norm`` in a round.

These functions hold no state and do no I/O: the coordinator's round calls them and writes
what they decided, with the figures, to its ledger.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fednode.weights import Weights


def bounded_weight(
    claimed: int,
    registered: int | None,
    *,
    weighting: str,
    max_examples: int,
) -> float:
    """One participant's weight before the share cap."""
    if weighting == "uniform":
        return 1.0
    n = max(0, int(claimed))
    if registered is not None:
        n = min(n, max(0, int(registered)))
    if max_examples > 0:
        n = min(n, int(max_examples))
    return float(n)


def capped_shares(weights: Mapping[str, float], max_share: float) -> dict[str, float]:
    """Shares of the aggregate (summing to 1), none above ``max_share``.

    Water-filling: the shares above the cap are set to it and their excess goes to the
    others in proportion to their weights, until none is above. When the cap cannot hold
    (``max_share * n < 1``) every share is ``1 / n``. A set whose weights are all 0 is shared
    equally too (the caller refuses an empty set).
    """
    peers = sorted(weights)
    n = len(peers)
    if n == 0:
        return {}
    w = np.array([max(0.0, float(weights[p])) for p in peers], dtype=np.float64)
    if max_share * n < 1.0 or w.sum() <= 0:
        return {p: 1.0 / n for p in peers}
    share = w / w.sum()
    capped = np.zeros(n, dtype=bool)
    for _ in range(n):  # each pass caps at least one more participant, or ends
        over = (share > max_share + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        share[capped] = max_share
        free = ~capped
        room = 1.0 - max_share * capped.sum()
        if w[free].sum() > 0:  # normalised first: room * a denormal weight would underflow
            share[free] = room * (w[free] / w[free].sum())
        else:
            share[free] = room / max(1, free.sum())
    return {p: float(s) for p, s in zip(peers, share, strict=True)}


def integer_weights(
    shares: Mapping[str, float], examples: float, max_weight: int
) -> dict[str, int]:
    """Whole-number weights with (nearly) the given shares, each in [1, max_weight].

    Secure aggregation sums integer weights inside the mask. They are scaled so that the
    total is about ``examples`` (the bounded counts' sum) but the largest stays within
    ``max_weight``; rounding moves a share by at most half a unit of that scale.
    """
    if not shares:
        return {}
    top = max(shares.values())
    scale = min(max(1.0, float(examples)), max_weight / top) if top > 0 else 1.0
    return {p: max(1, min(max_weight, round(s * scale))) for p, s in shares.items()}


def update_norm(w: Weights, base: Weights) -> float:
    """The L2 norm of ``w - base`` over every tensor (float64)."""
    total = 0.0
    for k in base:
        d = w[k].astype(np.float64) - base[k].astype(np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def clip_scale(norm: float, max_norm: float) -> float:
    """The factor that brings an update of L2 norm ``norm`` within ``max_norm`` (0 = off):
    1.0 when it already is."""
    return 1.0 if max_norm <= 0 or norm <= max_norm else max_norm / norm


def clip_update(w: Weights, base: Weights, max_norm: float) -> tuple[Weights, float, float]:
    """``base + (w - base) * scale`` with the update's norm at most ``max_norm`` (0 = off).

    Returns the bounded model, the update's norm before clipping, and the scale applied
    (1.0 when it was within the bound).
    """
    norm = update_norm(w, base)
    scale = clip_scale(norm, max_norm)
    return scaled_update(w, base, scale), norm, scale


def scaled_update(w: Weights, base: Weights, scale: float) -> Weights:
    """``base + (w - base) * scale`` (float64 inside, float32 out); ``w`` itself for 1.0."""
    if scale == 1.0:
        return w
    return {
        k: (base[k].astype(np.float64) + (w[k].astype(np.float64) - base[k]) * scale).astype(
            np.float32
        )
        for k in base
    }


def clip_vector(x: np.ndarray, max_norm: float) -> np.ndarray:
    """``x`` scaled down to L2 norm ``max_norm`` if it is longer (0 = off)."""
    norm = float(np.linalg.norm(x))
    return x if max_norm <= 0 or norm <= max_norm else x * (max_norm / norm)


def loss_jumped(candidate: float, current: float, factor: float) -> bool:
    """Whether a candidate model's validation loss is unacceptable: not finite, or more than
    ``factor`` times the current model's (factor 0 checks finiteness only)."""
    if not math.isfinite(candidate):
        return True
    if factor <= 0 or not math.isfinite(current):
        return False
    return candidate > factor * current
