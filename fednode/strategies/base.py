"""The one interface every aggregation strategy implements (one strategy per file)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fednode.weights import Weights
from protocol.errors import ValidationError

__all__ = ["ClientUpdate", "Strategy", "Weights", "check_compatible"]


@dataclass
class ClientUpdate:
    peer_id: str
    weights: Weights
    num_examples: int
    loss: float
    # the update's weight in the aggregate, when the round bounded it (fednode.bounds);
    # None = its example count
    weight: float | None = None


class Strategy(Protocol):
    name: str

    def aggregate(self, global_weights: Weights, updates: list[ClientUpdate]) -> Weights:
        """The next global model from the current one and this round's updates."""
        ...


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
