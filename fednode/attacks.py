"""Participant attacks: red-teaming one's own federation (`fednode run --attack KIND`).

An attacking participant behaves exactly like an honest one (the same messages, example
counts, timings and evaluation reports; it trains every round) except for the model it
sends: the coordinator is told nothing and has to find it from the updates alone. Each
attack is defined on the UPDATE, the trained weights ``w`` minus the round's global model
``g``, which is what the robust-aggregation literature's attacks act on:

=================  ==========================================================================
``sign_flip``      sends ``g - (w - g)``: the update negated, with an honest update's norm
                   (the same as ``scale:-1``; for a larger step use ``scale:-F``)
``scale:F``        sends ``g + F·(w - g)``
``gaussian:SIGMA`` sends ``g + N(0, SIGMA²)`` per coordinate, ignoring its training; the noise
                   is drawn from the node's own entropy, so two attackers send different noise
``constant:V``     every coordinate of the update is ``V``: sends ``g + V``
``label_flip``     trains honestly on flipped labels (classification with C classes:
                   ``y -> C-1-y``; binary: ``1-y``; regression: ``-y``), the training data
                   only: its evaluation split keeps the true labels
``free_rider``     sends ``g`` unchanged (it still trains, so its reported loss and time look
                   honest, and reports its real example count)
=================  ==========================================================================

The attack changes what is sent, never how it is checked: the coordinator's bounds (weight
share, update norm, loss jump) apply to an attacker as to anyone, and in a secure round the
attacked update is clipped to the assigned norm like an honest one before it is masked.

``Probe`` is the older, hidden test option (``--attack-scale`` / ``--attack-claim``): the
participant of docs/security.md that also lies about its example count and, in a secure
round, about its weight and the norm clip.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode.weights import Weights
from protocol import modelspec
from protocol.errors import UsageError

if TYPE_CHECKING:
    from fednode.data import Dataset
    from fednode.ledger import Ledger

log = logging.getLogger("fednode.attacks")

# Each attack by name, with the form of its argument ("" = none) and what it does.
KINDS: dict[str, tuple[str, str]] = {
    "sign_flip": ("", "sends the update negated: g - (w - g)"),
    "scale": ("F", "sends the update times F: g + F*(w - g)"),
    "gaussian": ("SIGMA", "sends g + Gaussian noise of standard deviation SIGMA"),
    "label_flip": ("", "trains on flipped labels"),
    "constant": ("V", "sends g + V in every coordinate"),
    "free_rider": ("", "sends the global model unchanged"),
}
# Bounds of the arguments: finite, and far enough past any update's scale (honest digits
# updates have norms of about 4; [aggregation] max_update_norm is 10) to probe the defences
# without reaching float32's range.
MAX_SCALE = 1e4
MAX_SIGMA = 1e4
MAX_CONSTANT = 1e4
_RANGES: dict[str, tuple[float, float, bool]] = {  # (low, high, low excluded)
    "scale": (-MAX_SCALE, MAX_SCALE, False),
    "gaussian": (0.0, MAX_SIGMA, True),
    "constant": (-MAX_CONSTANT, MAX_CONSTANT, False),
}


def forms() -> str:
    """Every kind with its argument form and range, for messages and help."""
    out = []
    for name, (arg, _) in KINDS.items():
        if not arg:
            out.append(name)
            continue
        low, high, open_low = _RANGES[name]
        bound = f"0 < {arg} <= {high:g}" if open_low else f"{low:g} <= {arg} <= {high:g}"
        out.append(f"{name}:{arg} ({bound})")
    return ", ".join(out)


@dataclass(frozen=True)
class Attack:
    """What `--attack KIND` makes this participant do; ``value`` is F, SIGMA or V."""

    kind: str
    value: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}" if KINDS[self.kind][0] else self.kind

    def describe(self) -> str:
        arg = KINDS[self.kind][0]
        what = KINDS[self.kind][1]
        value = f"{self.value:g}" if self.value >= 0 else f"({self.value:g})"
        return what.replace(arg, value) if arg else what

    def update(self, w: Weights, g: Weights, rng: np.random.Generator | None = None) -> Weights:
        """The model to send instead of the trained ``w``, given the round's global ``g``
        (float64 arithmetic, float32 out, as on the wire). ``rng`` draws gaussian noise;
        None: a fresh generator from the operating system's entropy."""
        if self.kind == "label_flip":
            return w  # the attack was on the training data
        if self.kind == "gaussian" and rng is None:
            rng = np.random.default_rng()
        out: Weights = {}
        for k, base in g.items():
            g64 = base.astype(np.float64)
            step = w[k].astype(np.float64) - g64
            if self.kind == "sign_flip":
                step = -step
            elif self.kind == "scale":
                step = self.value * step
            elif self.kind == "gaussian":
                assert rng is not None
                step = rng.normal(0.0, self.value, size=base.shape)
            elif self.kind == "constant":
                step = np.full(base.shape, self.value)
            elif self.kind == "free_rider":
                step = np.zeros(base.shape)
            out[k] = (g64 + step).astype(np.float32)
        return out

    def training_data(self, data: Dataset, model_spec: dict[str, Any]) -> Dataset:
        """The data this participant trains on: with ``label_flip`` its labels flipped for
        the model's task, otherwise ``data`` itself."""
        if self.kind != "label_flip":
            return data
        return dataclasses.replace(data, y=flip_labels(data.y, model_spec))


def flip_labels(y: np.ndarray, model_spec: dict[str, Any]) -> np.ndarray:
    """``label_flip``'s labels: C-1-y for classification with C classes, 1-y for binary,
    -y for regression (the same dtype as ``y``)."""
    task = model_spec.get("task", "classification")
    if task == "regression":
        return (-y).astype(y.dtype)
    classes = 2 if task == "binary" else modelspec.output_width(model_spec)
    return (classes - 1 - y).astype(y.dtype)


def announce(attack: Attack, ledger: Ledger) -> None:
    """Say loudly, on this node only, that it attacks: a warning in its log and an
    ``attack`` event in its own ledger. Nothing of it is sent."""
    log.warning(
        "this node is an ATTACKER: --attack %s %s every round; the coordinator is not told",
        attack,
        attack.describe(),
    )
    ledger.append_event("attack", data={"attack": str(attack), "what": attack.describe()})


def _bad(text: str, why: str) -> UsageError:
    return UsageError(
        f"--attack {text!r}: {why}",
        hint=f"use one of: {forms()}; e.g. --attack sign_flip or --attack scale:-4",
    )


def parse(text: str) -> Attack:
    """``--attack KIND`` as an Attack; a UsageError naming the option and every kind."""
    name, sep, arg = text.strip().partition(":")
    if name not in KINDS:
        raise _bad(text, f"{name!r} is not an attack")
    form = KINDS[name][0]
    if not form:
        if sep:
            raise _bad(text, f"{name} takes no argument")
        return Attack(name)
    if not arg:
        raise _bad(text, f"{name} needs its argument: {name}:{form}")
    try:
        value = float(arg)
    except ValueError:
        raise _bad(text, f"{form} = {arg!r} is not a number") from None
    low, high, open_low = _RANGES[name]
    if not math.isfinite(value) or value > high or value < low or (open_low and value <= low):
        bound = f"0 < {form} <= {high:g}" if open_low else f"{low:g} <= {form} <= {high:g}"
        raise _bad(text, f"{form} = {arg} is out of range ({bound})")
    return Attack(name, value)


@dataclass(frozen=True)
class Probe:
    """Test options (hidden: fednode run --attack-scale / --attack-claim) that make this node
    the admitted participant the probe was: every round it multiplies its trained weights by
    ``scale`` and claims ``claim`` examples (in a secure round: uses that weight, up to
    max_weight, instead of the one assigned, and skips the norm clip). 0 = off."""

    scale: float = 0.0
    claim: int = 0

    @property
    def on(self) -> bool:
        return bool(self.scale or self.claim)

    def weights(self, w: Weights) -> Weights:
        return {k: v * self.scale for k, v in w.items()} if self.scale else w
