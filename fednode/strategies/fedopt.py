"""FedAdam, FedYogi and FedAdagrad (Reddi et al., 2021, "Adaptive Federated Optimization"):
FedAvg's mean, then an adaptive server step on the pseudo-gradient mean - g
(aggregate.adaptive_step). Settings: ``aggregation.server_lr`` and ``aggregation.tau``
(0 = the strategy's default, Flower's), ``aggregation.beta1`` and ``aggregation.beta2``
(FedAdagrad has neither: no first moment, as Flower's, and a plain sum of squares).
State, stored with each model version: the moments ``m/<tensor>`` (when beta1 > 0) and
``v/<tensor>``, and ``step``, the number of server steps taken on this lineage (Adam's bias
correction). A function of the mean alone, so secure rounds take the same step."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fednode.strategies import aggregate as arith
from fednode.strategies.base import State, Weights, moment_state, read_moment
from fednode.strategies.fedavg import FedAvg
from protocol.errors import ValidationError

STEP_KEY = "step"


class FedOpt(FedAvg):
    """The three adaptive strategies; each names its rule and Flower's defaults."""

    rule: ClassVar[str]
    default_lr: ClassVar[float]
    default_tau: ClassVar[float]
    has_beta1: ClassVar[bool] = True

    def settings(self) -> dict[str, float]:
        """The step's settings from the spec, 0 standing for the strategy's default."""
        p = self.params
        return {
            "lr": float(p["server_lr"]) or self.default_lr,
            "beta1": float(p["beta1"]) if self.has_beta1 else 0.0,
            "beta2": float(p["beta2"]),
            "tau": float(p["tau"]) or self.default_tau,
        }

    def from_mean(
        self, global_weights: Weights, mean: Weights, state: State
    ) -> tuple[Weights, State]:
        m = read_moment(self.name, state, "m", global_weights)
        v = read_moment(self.name, state, "v", global_weights)
        step = _steps_taken(self.name, state, v is not None) + 1
        cfg = self.settings()
        new, m2, v2 = arith.adaptive_step(
            self.rule,
            list(global_weights.values()),
            [mean[k] for k in global_weights],
            m,
            v,
            step,
            **cfg,
        )
        out: State = moment_state("v", global_weights, v2)
        if cfg["beta1"] > 0:  # with beta1 = 0, m' is this round's Δ: nothing to carry
            out.update(moment_state("m", global_weights, m2))
        out[STEP_KEY] = np.array([step], dtype=np.int64)
        return arith.from_arrays(new, list(global_weights)), out


def _steps_taken(who: str, state: State, has_v: bool) -> int:
    """How many server steps the state has seen: 0 for no state."""
    if STEP_KEY not in state:
        if has_v:
            raise ValidationError(f"{who}: the stored state has moments but no {STEP_KEY!r}")
        return 0
    raw = np.asarray(state[STEP_KEY]).reshape(-1)
    if raw.size != 1 or not np.isfinite(raw[0]) or raw[0] < 0 or raw[0] != int(raw[0]):
        raise ValidationError(f"{who}: the stored state's {STEP_KEY!r} is not a count")
    return int(raw[0])


class FedAdam(FedOpt):
    name = "fedadam"
    rule = "adam"
    default_lr = 0.1  # Flower's FedAdam eta
    default_tau = 1e-9


class FedYogi(FedOpt):
    name = "fedyogi"
    rule = "yogi"
    default_lr = 0.01  # Flower's FedYogi eta
    default_tau = 1e-3


class FedAdagrad(FedOpt):
    name = "fedadagrad"
    rule = "adagrad"
    default_lr = 0.1  # Flower's FedAdagrad eta
    default_tau = 1e-9
    has_beta1 = False  # Flower's FedAdagrad fixes beta_1 = 0
