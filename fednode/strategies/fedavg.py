"""FedAvg (McMahan et al., 2017): the mean of the updates weighted by local example count
(or by the weight the round gave each update after bounding it, fednode.bounds). No state."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, check_compatible
from protocol.errors import ValidationError


def weighted_mean_of(who: str, global_weights: Weights, updates: list[ClientUpdate]) -> Weights:
    """The updates' weighted mean, in the global model's tensor order; ValidationError (its
    message starting with ``who``) for updates that cannot be averaged."""
    if not updates:
        raise ValidationError(f"{who}: no updates to aggregate")
    for u in updates:
        if u.num_examples < 0:
            raise ValidationError(
                f"{who}: update from {u.peer_id} claims {u.num_examples} examples"
            )
        check_compatible(global_weights, u)
    order = list(global_weights)
    results = [
        (arith.to_arrays(u.weights, order), float(u.num_examples if u.weight is None else u.weight))
        for u in updates
    ]
    try:
        mean = arith.weighted_mean(results)
    except ValidationError as err:
        raise ValidationError(f"{who}: {err.message}") from None
    return arith.from_arrays(mean, order)


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        return weighted_mean_of(self.name, global_weights, updates), state
