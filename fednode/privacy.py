"""Privacy mechanisms: what wraps local training on a participant.

The round's mechanism (``round_start.privacy``, the spec's ``privacy.mechanism``) takes the
training function and returns the one the participant runs. This is where DP-SGD goes (Opacus:
wrap the model, optimizer and batches, clip per-example gradients and add noise, then report
the privacy spent). ``none`` runs training as it is.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from fednode import training
from fednode.data import Dataset
from fednode.weights import Weights
from protocol import plugins
from protocol.plugins import Registry


class TrainFn(Protocol):
    """fednode.training.train's signature."""

    def __call__(
        self,
        model_spec: dict[str, Any],
        weights: Weights,
        data: Dataset,
        cfg: training.TrainConfig,
        *,
        deadline: float | None = None,
        stop: threading.Event | None = None,
    ) -> training.TrainResult: ...


class Mechanism(Protocol):
    name: str

    def wrap(self, train: TrainFn) -> TrainFn:
        """The training to run in place of ``train``."""
        ...


class NoPrivacy:
    name = plugins.NO_PRIVACY

    def wrap(self, train: TrainFn) -> TrainFn:
        return train


MECHANISMS: Registry[Mechanism] = Registry("privacy mechanism", plugins.PRIVACY.hint)


def register(mechanism: Mechanism) -> Mechanism:
    """Make ``mechanism`` available under its name, which specs must be able to carry
    (protocol.plugins.PRIVACY)."""
    if mechanism.name not in plugins.PRIVACY:
        raise ValueError(f"privacy mechanism {mechanism.name!r} is not in protocol.plugins.PRIVACY")
    return MECHANISMS.register(mechanism.name, mechanism)


register(NoPrivacy())


def get_mechanism(name: str) -> Mechanism:
    return MECHANISMS.get(name)
