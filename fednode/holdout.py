"""A participant's held-out test split: where its evaluation of each round's model runs.

With ``[evaluation] on = "participants"`` (or ``"both"``) every participant keeps a seeded
fraction of its own data out of training and evaluates the round's global model on it. The
split is a pure function of the data, the fraction and the seed, so a participant holds out
the same examples in every round (its figures compare from round to round) and after a
restart. This is the one place that splits; fednode.participant calls it.
"""

from __future__ import annotations

import math

import numpy as np

from fednode.data import Dataset
from protocol.errors import DataError


def split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, test): ``fraction`` of the examples, chosen by ``seed``, held out for testing
    (at least one), the rest (at least one) for training, each in the data's own order."""
    n = len(data)
    if not 0.0 < fraction < 1.0:
        raise DataError(
            f"data.test_fraction = {fraction!r} holds out no test split (it must be between 0 "
            "and 1, exclusive), but evaluation.on asks the participants to evaluate",
            hint='set data.test_fraction, e.g. 0.2, or evaluation.on = "coordinator"',
        )
    if n < 2:
        raise DataError(
            f"a participant with {n} example(s) cannot hold out a test split",
            hint="give the participant more data, or evaluate on the coordinator "
            '(evaluation.on = "coordinator")',
        )
    n_test = min(n - 1, max(1, math.floor(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    test = np.sort(order[:n_test])
    train = np.sort(order[n_test:])
    return (
        Dataset(np.ascontiguousarray(data.x[train]), data.y[train].copy()),
        Dataset(np.ascontiguousarray(data.x[test]), data.y[test].copy()),
    )
