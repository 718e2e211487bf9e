"""FedMedian (Yin et al., 2018): the coordinate-wise median of the updates' models
(aggregate.median); example counts are ignored, as in Flower. No settings, no state. Needs
every update at once, so not with secure aggregation."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, results_of


class Median(Strategy):
    name = "median"
    by_columns = True  # coordinate-wise / over all coordinates (Strategy.by_columns)

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        order, results = results_of(self.name, global_weights, updates)
        return arith.from_arrays(arith.median(results), order), state
