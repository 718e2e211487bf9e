"""FedAvg (McMahan et al., 2017): the mean of the updates weighted by local example count
(or by the weight the round gave each update after bounding it, fednode.bounds). No state."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, results_of
from protocol.errors import ValidationError


def weighted_mean_of(who: str, global_weights: Weights, updates: list[ClientUpdate]) -> Weights:
    """The updates' weighted mean, in the global model's tensor order; ValidationError (its
    message starting with ``who``) for updates that cannot be averaged."""
    order, results = results_of(who, global_weights, updates)
    try:
        mean = arith.weighted_mean(results)
    except ValidationError as err:
        raise ValidationError(f"{who}: {err.message}") from None
    return arith.from_arrays(mean, order)


class FedAvg(Strategy):
    """The weighted mean; subclasses that step from it (server optimizers: fedavgm.py,
    fedopt.py) override only ``from_mean``, so plain and secure rounds take the same step."""

    name = "fedavg"

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        mean = weighted_mean_of(self.name, global_weights, updates)
        return self.from_mean(global_weights, mean, state)
