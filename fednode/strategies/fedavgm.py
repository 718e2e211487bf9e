"""FedAvgM (Hsu et al., 2019): FedAvg's mean, then a server SGD step with momentum on the
pseudo-gradient g - mean (aggregate.momentum_step). Settings: ``aggregation.server_lr``
(0 = 1.0) and ``aggregation.server_momentum``. State: the velocity, ``momentum/<tensor>``,
stored with each model version. A function of the mean alone, so secure rounds take the
same step (``from_mean``)."""

from __future__ import annotations

from fednode.strategies import aggregate as arith
from fednode.strategies.base import State, Weights, moment_state, read_moment
from fednode.strategies.fedavg import FedAvg

DEFAULT_SERVER_LR = 1.0  # Flower's FedAvgM: with momentum 0, the step lands on the mean


class FedAvgM(FedAvg):
    name = "fedavgm"

    def from_mean(
        self, global_weights: Weights, mean: Weights, state: State
    ) -> tuple[Weights, State]:
        velocity = read_moment(self.name, state, "momentum", global_weights)
        new, vel = arith.momentum_step(
            list(global_weights.values()),
            [mean[k] for k in global_weights],
            velocity,
            lr=float(self.params["server_lr"]) or DEFAULT_SERVER_LR,
            momentum=float(self.params["server_momentum"]),
        )
        return arith.from_arrays(new, list(global_weights)), moment_state(
            "momentum", global_weights, vel
        )
