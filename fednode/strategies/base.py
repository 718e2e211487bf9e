"""The one interface every aggregation strategy implements (one strategy per file).

A strategy has three parts, each used at one point of a round (fednode.session):

- ``round_config(round, spec)``: a small JSON-able map of scalars that travels to the
  participants in ``round_start.strategy`` (FedProx: ``{"mu": ...}``); the participant
  applies what it knows and declines the task for a key it does not (fednode.round_config).
- ``aggregate(global_weights, updates, state) -> (weights, state)``: the next global model
  from the current one and the round's bounded updates, and the strategy's own state after
  it. State is a map of numpy arrays (``{}`` for none); the session stores it in the content
  store as safetensors with each model version (``model_versions.state_cid``), so rollback
  and resume give back the state that belongs to the model they go back to.
- ``supports_secure``: whether the new model is what a *sum* of the weighted updates gives,
  the only thing a secure round shows the coordinator (protocol.plugins.STRATEGIES says, so
  that a spec is checked for it without the node). A secure round computes the weighted mean
  itself and leaves the state as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fednode.weights import Weights
from protocol import plugins
from protocol.errors import ValidationError

__all__ = ["ClientUpdate", "State", "Strategy", "Weights", "check_compatible"]

# A strategy's own state between rounds (e.g. a server optimizer's moments): named arrays.
State = dict[str, np.ndarray]


@dataclass
class ClientUpdate:
    peer_id: str
    weights: Weights
    num_examples: int
    loss: float
    # the update's weight in the aggregate, when the round bounded it (fednode.bounds);
    # None = its example count
    weight: float | None = None


class Strategy(ABC):
    name: ClassVar[str]

    @property
    def supports_secure(self) -> bool:
        return plugins.STRATEGIES.get(self.name).supports_secure

    def round_config(self, round: int, spec: dict[str, Any]) -> dict[str, Any]:
        """What participants need of this strategy in round ``round``: scalars by name."""
        return {}

    @abstractmethod
    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        """The next global model and state from the current ones and this round's updates.
        Runs in a worker thread: it only computes, and must not change its arguments."""


def check_compatible(global_weights: Weights, update: ClientUpdate) -> None:
    """Same tensor names and shapes as the global model, or a ValidationError naming it."""
    for k, g in global_weights.items():
        if k not in update.weights:
            raise ValidationError(f"update from {update.peer_id} lacks tensor {k!r}")
        if tuple(update.weights[k].shape) != tuple(g.shape):
            raise ValidationError(
                f"update from {update.peer_id}: tensor {k!r} has shape "
                f"{tuple(update.weights[k].shape)}, expected {tuple(g.shape)}"
            )
    for k in update.weights:
        if k not in global_weights:
            raise ValidationError(f"update from {update.peer_id} has unknown tensor {k!r}")
