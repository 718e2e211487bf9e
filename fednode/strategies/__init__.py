"""Aggregation strategies, one per module, behind the `Strategy` interface."""

from __future__ import annotations

from fednode.strategies.base import ClientUpdate, Strategy
from fednode.strategies.fedavg import FedAvg
from protocol.errors import ValidationError

STRATEGIES: dict[str, type] = {"fedavg": FedAvg}

__all__ = ["STRATEGIES", "ClientUpdate", "FedAvg", "Strategy", "get_strategy"]


def get_strategy(name: str) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValidationError(
            f"unknown strategy {name!r}; accepted: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls()
