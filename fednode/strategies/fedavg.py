"""FedAvg (McMahan et al., 2017): the mean of the updates weighted by local example count
(or by the weight the round gave each update after bounding it, fednode.bounds)."""

from __future__ import annotations

import numpy as np

from fednode.strategies.base import ClientUpdate, Weights, check_compatible
from protocol.errors import ValidationError


class FedAvg:
    name = "fedavg"

    def aggregate(self, global_weights: Weights, updates: list[ClientUpdate]) -> Weights:
        if not updates:
            raise ValidationError("fedavg: no updates to aggregate")
        for u in updates:
            if u.num_examples < 0:
                raise ValidationError(
                    f"fedavg: update from {u.peer_id} claims {u.num_examples} examples"
                )
            check_compatible(global_weights, u)
        mass = [float(u.num_examples if u.weight is None else u.weight) for u in updates]
        total = sum(mass)
        if not total > 0:
            raise ValidationError("fedavg: the updates hold zero examples in total")
        out: Weights = {}
        # float64 accumulation: the result does not drift with the number of clients.
        for k in global_weights:
            acc = np.zeros(global_weights[k].shape, dtype=np.float64)
            for u, m in zip(updates, mass, strict=True):
                acc += np.asarray(u.weights[k], dtype=np.float64) * (m / total)
            out[k] = acc.astype(np.float32)
        return out
