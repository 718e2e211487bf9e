"""FedAvg (McMahan et al., 2017): the mean of the updates weighted by local example count."""

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
        total = sum(int(u.num_examples) for u in updates)
        if total == 0:
            raise ValidationError("fedavg: the updates hold zero examples in total")
        out: Weights = {}
        # float64 accumulation: the result does not drift with the number of clients.
        for k in global_weights:
            acc = np.zeros(global_weights[k].shape, dtype=np.float64)
            for u in updates:
                acc += np.asarray(u.weights[k], dtype=np.float64) * (u.num_examples / total)
            out[k] = acc.astype(np.float32)
        return out
