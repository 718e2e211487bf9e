"""Aggregation strategies, one per module, behind the `Strategy` interface (base.py); the
arithmetic they share is in aggregate.py. A spec names a strategy; the name is looked up in
STRATEGIES, never imported."""

from __future__ import annotations

from fednode.strategies.base import ClientUpdate, State, Strategy
from fednode.strategies.fedavg import FedAvg
from fednode.strategies.fedprox import FedProx
from protocol import plugins
from protocol.plugins import Registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", plugins.STRATEGIES.hint)

__all__ = [
    "STRATEGIES",
    "ClientUpdate",
    "FedAvg",
    "FedProx",
    "State",
    "Strategy",
    "get_strategy",
    "register",
]


def register(cls: type[Strategy]) -> type[Strategy]:
    """Make a strategy class available under its ``name``. The name must be in the spec's
    vocabulary (protocol.plugins.STRATEGIES, which says whether it supports secure
    aggregation), so that specs naming it validate everywhere, fedctl included."""
    if cls.name not in plugins.STRATEGIES:
        raise ValueError(
            f"strategy {cls.name!r} is not in protocol.plugins.STRATEGIES; register its "
            "StrategyInfo there first"
        )
    return STRATEGIES.register(cls.name, cls)


register(FedAvg)
register(FedProx)


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)()
