"""FedProx (Li et al., 2020): FedAvg's weighted mean on the coordinator, and on each
participant a proximal term (mu/2)·|w - g|² added to the local loss, which keeps local models
near the round's model g when participants' data differ. mu is the spec's
``aggregation.proximal_mu``; it travels in ``round_start.strategy`` as ``mu`` and the
participant passes it to training (fednode.training.TrainConfig.proximal_mu). No state."""

from __future__ import annotations

from typing import Any

from fednode.strategies.base import ClientUpdate, State, Strategy, Weights
from fednode.strategies.fedavg import weighted_mean_of


class FedProx(Strategy):
    name = "fedprox"

    def round_config(self, round: int, spec: dict[str, Any]) -> dict[str, Any]:
        return {"mu": float(spec["aggregation"]["proximal_mu"])}

    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        return weighted_mean_of(self.name, global_weights, updates), state
