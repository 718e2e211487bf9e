"""Aggregation strategies, one per module, behind the `Strategy` interface (base.py); the
arithmetic they share is in aggregate.py. A spec names a strategy; the name is looked up in
STRATEGIES, never imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fednode.strategies.base import ClientUpdate, State, Strategy
from fednode.strategies.bulyan import Bulyan
from fednode.strategies.fedavg import FedAvg
from fednode.strategies.fedavgm import FedAvgM
from fednode.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fednode.strategies.fedprox import FedProx
from fednode.strategies.krum import Krum, MultiKrum
from fednode.strategies.median import Median
from fednode.strategies.trimmed_mean import TrimmedMean
from protocol import plugins
from protocol import spec as specmod
from protocol.plugins import Registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", plugins.STRATEGIES.hint)
Strategy.defaults = {k: f.default for k, f in specmod.SCHEMA["aggregation"].items()}

__all__ = [
    "STRATEGIES",
    "Bulyan",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "State",
    "Strategy",
    "TrimmedMean",
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


for _cls in (
    FedAvg,
    FedProx,
    FedAvgM,
    FedAdam,
    FedYogi,
    FedAdagrad,
    Median,
    TrimmedMean,
    Krum,
    MultiKrum,
    Bulyan,
):
    register(_cls)


def get_strategy(aggregation: str | Mapping[str, Any]) -> Strategy:
    """The strategy a spec's ``[aggregation]`` section names, built with its settings; a
    bare name builds it with the spec's defaults. Unsupported for a name not registered."""
    if isinstance(aggregation, str):
        return STRATEGIES.get(aggregation)()
    return STRATEGIES.get(aggregation.get("strategy"))(aggregation)
