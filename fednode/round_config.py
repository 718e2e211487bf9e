"""A participant's reading of a round_start's plug-in settings: the strategy's round
configuration (``strategy``), the update codec (``codec``) and the privacy mechanism
(``privacy``), each looked up in this node's registries or refused.

Why a setting this participant does not know is refused (the task is declined with
UNSUPPORTED) rather than ignored: the coordinator's strategy counts on it. A FedProx round
whose participants dropped ``mu`` would be trained as FedAvg while both ledgers say FedProx,
and a privacy mechanism silently skipped would send an update the operator believes
protected. An older participant therefore declines, says which key, and the round goes on
without it (a declined task is not held against its quality scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fednode.codecs import Codec, get_codec
from fednode.privacy import Mechanism, get_mechanism
from protocol import messages
from protocol import spec as specmod
from protocol.errors import SpecError, Unsupported

# The strategy settings a participant applies: round_start.strategy key -> (the TrainConfig
# field it sets, the spec field whose range bounds it: the range the coordinator validated).
TRAINING_KEYS: dict[str, tuple[str, tuple[str, str]]] = {
    "mu": ("proximal_mu", ("aggregation", "proximal_mu")),
}


@dataclass(frozen=True)
class TaskPlan:
    """What this participant will do differently in a round because of its settings."""

    training: dict[str, Any]  # TrainConfig fields that the strategy's round config sets
    codec: Codec
    privacy: Mechanism

    def describe(self) -> dict[str, Any]:
        """For the participant's ledger: what it applied."""
        return {
            "training": dict(self.training),
            "codec": self.codec.name,
            "privacy": self.privacy.name,
        }


def _setting(key: str, value: Any) -> tuple[str, float]:
    if key not in TRAINING_KEYS:
        raise Unsupported(
            f"round_start.strategy.{key} is not a setting this participant knows "
            f"(it knows: {', '.join(TRAINING_KEYS)})",
            hint="update this participant to the coordinator's version, or choose a strategy "
            "it supports",
        )
    field, (section, name) = TRAINING_KEYS[key]
    spec_field = specmod.SCHEMA[section][name]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    lo, hi = spec_field.lo, spec_field.hi
    if (
        not number
        or not math.isfinite(value)
        or (lo is not None and value < lo)
        or (hi is not None and value > hi)
    ):
        raise SpecError(
            f"round_start.strategy.{key} = {value!r} is not accepted: expected a number in "
            f"[{lo:g}, {hi:g}] ({section}.{name})",
            hint=spec_field.doc,
        )
    return field, float(value)


def plan(task: messages.RoundStart) -> TaskPlan:
    """The round's settings as this participant will apply them; Unsupported for a key or
    name it has not registered, SpecError for a value out of range."""
    training = dict(_setting(k, v) for k, v in task.strategy.items())
    return TaskPlan(training, get_codec(task.codec), get_mechanism(task.privacy))
