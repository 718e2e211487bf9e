"""Trimmed mean (Yin et al., 2018): in each coordinate the ``aggregation.beta`` fraction of
the largest and of the smallest values is cut and the rest averaged (aggregate.trimmed_mean);
example counts are ignored, as in Flower's FedTrimmedAvg. No state. Needs every update at
once, so not with secure aggregation."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, results_of


class TrimmedMean(Strategy):
    name = "trimmed_mean"
    by_columns = True  # coordinate-wise / over all coordinates (Strategy.by_columns)

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        order, results = results_of(self.name, global_weights, updates)
        mean = arith.trimmed_mean(results, float(self.params["beta"]))
        return arith.from_arrays(mean, order), state
