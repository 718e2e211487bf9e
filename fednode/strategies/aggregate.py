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
    masses = _check(results)
    out = [np.zeros(np.shape(a), dtype=np.float64) for a in results[0][0]]
    for (arrays, _), m in zip(results, masses, strict=True):
        for acc, a in zip(out, arrays, strict=True):
            acc += np.asarray(a, dtype=np.float64) * m
    return out


def total_weight(results: Sequence[Result]) -> float:
    return float(sum(_check(results)))


def weighted_mean(results: Sequence[Result]) -> Arrays:
    """sum_i weight_i * arrays_i / sum_i weight_i, as float32 (FedAvg's aggregate).

    ValidationError when there is nothing to average: no results, or weights summing to 0.
    """
    total = total_weight(results)
    if not total > 0:
        raise ValidationError("the updates hold zero examples (total weight 0) in total")
    return [(s / total).astype(np.float32) for s in weighted_sum(results)]


def to_arrays(weights: Mapping[str, np.ndarray], order: Sequence[str]) -> Arrays:
    """A model's tensors as a list in ``order`` (the global model's names)."""
    return [weights[k] for k in order]


def from_arrays(arrays: Sequence[np.ndarray], order: Sequence[str]) -> dict[str, np.ndarray]:
    return dict(zip(order, arrays, strict=True))
