"""Krum and multi-Krum (Blanchard et al., 2017; aggregate.krum). ``krum``: the one update
whose n - f - 2 nearest neighbours are nearest, f = ``aggregation.num_malicious``, taken as
it is. ``multikrum``: the weighted mean of the ``aggregation.num_selected`` updates of lowest
Krum score (0 = n - f). Both need n > 2f + 2 updates in a round. No state. They compare
single updates, so not with secure aggregation."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import ClientUpdate, State, Strategy, Weights, results_of


class Krum(Strategy):
    name = "krum"
    by_columns = True  # coordinate-wise / over all coordinates (Strategy.by_columns)

    @property
    def min_updates(self) -> int:
        return 2 * int(self.params["num_malicious"]) + 3  # n > 2f + 2

    def selected(self, n: int) -> int:
        """How many updates the aggregate keeps, as aggregate.krum counts them (0: one)."""
        return 0

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        order, results = results_of(self.name, global_weights, updates)
        f = int(self.params["num_malicious"])
        out = arith.krum(results, f, self.selected(len(results)))
        return arith.from_arrays(out, order), state


class MultiKrum(Krum):
    name = "multikrum"

    def selected(self, n: int) -> int:
        # Blanchard et al.'s m = n - f: every update but as many as may be Byzantine
        return int(self.params["num_selected"]) or n - int(self.params["num_malicious"])
