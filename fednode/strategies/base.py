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
- ``from_mean(global_weights, mean, state) -> (weights, state)``: the next global model
  and state from the updates' weighted mean alone (default: the mean, state unchanged). A
  secure round computes that mean itself, the only thing it shows the coordinator, and
  hands it here, so a server optimizer (FedAvgM, FedAdam, ...) steps and keeps its moments
  under secure aggregation too.
- ``supports_secure``: whether the strategy's aggregate is a function of the weighted mean
  (``from_mean``), so that a secure round can compute it (protocol.plugins.STRATEGIES says,
  so that a spec is checked for it without the node).

A strategy is built from the spec's ``[aggregation]`` section (``params``): its own settings
(server_lr, beta, num_malicious, ...) are read there; a missing key takes the spec's default.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fednode.weights import Weights
from protocol import plugins
from protocol.errors import ValidationError

__all__ = [
    "ClientUpdate",
    "State",
    "Strategy",
    "Weights",
    "check_compatible",
    "moment_state",
    "read_moment",
    "results_of",
]

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

    # Each [aggregation] setting's default, from the spec's schema: filled in by the package
    # (fednode/strategies/__init__.py), which every import of this module runs first. This
    # module does not import protocol.spec itself: the pure round core imports it
    # (tests/test_imports.py), and the spec module reaches the clock.
    defaults: ClassVar[dict[str, Any]] = {}

    # Whether ``aggregate`` treats the model as one vector that may be cut anywhere: every
    # figure coordinate-wise (median, trimmed mean) or summed over coordinates (Krum's
    # distances), no tensor's name or shape used. The round then hands it the model in
    # column blocks, read as the arithmetic asks for them, instead of every update as a
    # whole model (fednode.round_updates); a strategy of its own keeps the default.
    by_columns: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        # the spec's [aggregation] section; keys it lacks (an older spec) take the defaults
        self.params: dict[str, Any] = {**Strategy.defaults, **(params or {})}

    @property
    def supports_secure(self) -> bool:
        return plugins.STRATEGIES.get(self.name).supports_secure

    @property
    def min_updates(self) -> int:
        """The fewest updates a round's aggregate can be computed from (Krum: 2f + 3);
        outlier detection leaves at least this many in (fednode.session)."""
        return 1

    def round_config(self, round: int, spec: dict[str, Any]) -> dict[str, Any]:
        """What participants need of this strategy in round ``round``: scalars by name."""
        return {}

    @abstractmethod
    def aggregate(
        self, global_weights: Weights, updates: list[ClientUpdate], state: State
    ) -> tuple[Weights, State]:
        """The next global model and state from the current ones and this round's updates.
        Runs in a worker thread: it only computes, and must not change its arguments."""

    def from_mean(
        self, global_weights: Weights, mean: Weights, state: State
    ) -> tuple[Weights, State]:
        """The next global model and state from the updates' weighted ``mean`` (what a
        secure round computes). The default is FedAvg's: the mean, the state unchanged.
        Only strategies that ``supports_secure`` are asked; they must not change their
        arguments either."""
        return mean, state


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


def results_of(
    who: str, global_weights: Weights, updates: list[ClientUpdate]
) -> tuple[list[str], list[tuple[list[np.ndarray], float]]]:
    """The updates as the arithmetic takes them (fednode.strategies.aggregate): the global
    model's tensor names, and each update's arrays in that order with its weight (the bounded
    one, else its example count). ValidationError, its message starting with ``who``, for no
    updates, a negative example count, or tensors that are not the global model's."""
    if not updates:
        raise ValidationError(f"{who}: no updates to aggregate")
    for u in updates:
        if u.num_examples < 0:
            raise ValidationError(
                f"{who}: update from {u.peer_id} claims {u.num_examples} examples"
            )
        check_compatible(global_weights, u)
    order = list(global_weights)
    results = [
        ([u.weights[k] for k in order], float(u.num_examples if u.weight is None else u.weight))
        for u in updates
    ]
    return order, results


def read_moment(
    who: str, state: State, prefix: str, global_weights: Weights
) -> list[np.ndarray] | None:
    """The moment stored in ``state`` as ``prefix/<tensor>`` for every tensor of the global
    model, in its order; None when the state holds none (before the strategy's first step).
    ValidationError naming the key for a state that holds only some, or other shapes: a
    state that is not this model's."""
    keys = [f"{prefix}/{k}" for k in global_weights]
    present = [k for k in keys if k in state]
    if not present:
        return None
    if len(present) != len(keys):
        missing = sorted(set(keys) - set(present))
        raise ValidationError(f"{who}: the stored state lacks {missing[0]!r}")
    out = []
    for key, g in zip(keys, global_weights.values(), strict=True):
        a = state[key]
        # a 0-d tensor comes back from the store's safetensors as shape (1,): same values
        if a.size != g.size or (tuple(a.shape) != tuple(g.shape) and g.ndim > 0):
            raise ValidationError(
                f"{who}: the stored state's {key!r} has shape {tuple(a.shape)}, "
                f"the model's tensor {tuple(g.shape)}"
            )
        out.append(a.reshape(g.shape))
    return out


def moment_state(prefix: str, global_weights: Weights, arrays: list[np.ndarray]) -> State:
    """``arrays`` (in the global model's order) as state entries ``prefix/<tensor>``."""
    return {f"{prefix}/{k}": a for k, a in zip(global_weights, arrays, strict=True)}
