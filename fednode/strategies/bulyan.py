"""Bulyan (El Mhamdi et al., 2018; aggregate.bulyan): Krum picks θ updates one by one
(θ = ``aggregation.num_selected``, 0 = n - 2f, f = ``aggregation.num_malicious``), then in
each coordinate the θ - 2f values nearest the selection's median are averaged. Needs
n >= 4f + 3 updates in a round. Example counts are ignored, as in Flower. No state. Not
with secure aggregation."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, results_of


class Bulyan(Strategy):
    name = "bulyan"
    by_columns = True  # coordinate-wise / over all coordinates (Strategy.by_columns)

    @property
    def min_updates(self) -> int:
        return 4 * int(self.params["num_malicious"]) + 3

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        order, results = results_of(self.name, global_weights, updates)
        out = arith.bulyan(
            results, int(self.params["num_malicious"]), int(self.params["num_selected"])
        )
        return arith.from_arrays(out, order), state
