"""Privacy mechanisms: what wraps local training on a participant.

The round's mechanism (``round_start.privacy``, the spec's ``privacy.mode``) takes the
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

    def wrap(self, train: TrainFn, context: Any = None) -> TrainFn:
        """The training to run in place of ``train``. ``context``: what the participant
        planned for this round before anything was fetched (local_dp: a fednode.dpsgd.DPRound,
        whose budget it has checked); None where a mechanism needs nothing."""
        ...


class NoPrivacy:
    name = plugins.NO_PRIVACY

    def wrap(self, train: TrainFn, context: Any = None) -> TrainFn:
        return train


class LocalDP:
    """DP-SGD on the participant (fednode.dpsgd, Opacus): the update is private before it
    leaves. Its training result carries the privacy spent (TrainResult.privacy)."""

    name = plugins.LOCAL_DP

    def wrap(self, train: TrainFn, context: Any = None) -> TrainFn:
        from fednode import dpsgd

        if not isinstance(context, dpsgd.DPRound):
            raise TypeError("local_dp needs the round's fednode.dpsgd.DPRound")
        dp = context

        def private(
            model_spec: dict[str, Any],
            weights: Weights,
            data: Dataset,
            cfg: training.TrainConfig,
            *,
            deadline: float | None = None,
            stop: threading.Event | None = None,
        ) -> training.TrainResult:
            return dpsgd.train_private(
                model_spec, weights, data, cfg, dp, deadline=deadline, stop=stop
            )

        return private


class CentralDP:
    """DP-FedAvg (fednode.central_dp): local training is unchanged. In a plain round the
    coordinator clips each update and adds the noise to the sum; in a secure round the
    participant clips its update and adds its share of the noise before masking
    (fednode.participant's secure path), since nobody else sees it."""

    name = plugins.CENTRAL_DP

    def wrap(self, train: TrainFn, context: Any = None) -> TrainFn:
        return train


MECHANISMS: Registry[Mechanism] = Registry("privacy mechanism", plugins.PRIVACY.hint)


def register(mechanism: Mechanism) -> Mechanism:
    """Make ``mechanism`` available under its name, which specs must be able to carry
    (protocol.plugins.PRIVACY)."""
    if mechanism.name not in plugins.PRIVACY:
        raise ValueError(f"privacy mechanism {mechanism.name!r} is not in protocol.plugins.PRIVACY")
    return MECHANISMS.register(mechanism.name, mechanism)


register(NoPrivacy())
register(LocalDP())
register(CentralDP())


def get_mechanism(name: str) -> Mechanism:
    return MECHANISMS.get(name)
