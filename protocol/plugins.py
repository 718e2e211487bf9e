"""Plug points found by name: the Registry, and the names a spec or a round_start may carry.

Each plug point (aggregation strategies, update codecs, privacy mechanisms, model kinds, data
sources) keeps one Registry: a map from a name to what implements it, filled in this process
by ``register()`` calls in the modules that ship the implementations. A name that arrives in a
spec or from a peer is only ever *looked up*: an unknown one is an Unsupported error listing
the names this node has. Nothing a remote peer writes can make a node import code.

This module is pure (no I/O, no torch): ``protocol/`` validates specs and messages without the
node, so what a spec and the wire must know of a plug-in is declared here (a strategy's name
and whether secure aggregation can compute it; the names of codecs and privacy mechanisms);
``fednode/`` registers the code that does the work under the same names (fednode.strategies,
fednode.codecs, fednode.privacy). tests/test_plugins.py checks that the two sides agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol import text
from protocol.errors import Unsupported

T = TypeVar("T")

# A plug-in's name: short, lower case, and safe to print and to put in a ledger.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class Registry(Generic[T]):
    """Name -> implementation for one plug point, in registration order."""

    def __init__(self, what: str, hint: str) -> None:
        self.what = what  # "strategy", "codec", ... as error messages say it
        self.hint = hint  # what to do about an unknown name
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``. A second registration of a name is a programming
        error (two plug-ins would fight over one name) unless ``replace`` says it is meant."""
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError(f"{self.what} name {name!r} must match {NAME_RE.pattern}")
        if name in self._items and not replace:
            raise ValueError(f"{self.what} {name!r} is registered already")
        self._items[name] = item
        return item

    def get(self, name: object) -> T:
        """The implementation registered under ``name``, or Unsupported naming the known ones."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        raise Unsupported(
            f"unknown {self.what} {text.shown(name)}; registered here: {', '.join(self._items)}",
            hint=self.hint,
        )

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._items))

    def __len__(self) -> int:
        return len(self._items)


# --- what a spec and the wire know of each plug-in ---------------------------------------


@dataclass(frozen=True)
class StrategyInfo:
    """What a spec knows of an aggregation strategy; fednode.strategies holds its arithmetic."""

    # Whether the new model can be computed from the *sum* of the weighted updates alone:
    # with secure aggregation that sum is all the coordinator ever sees (fednode.secure_round).
    supports_secure: bool


STRATEGIES: Registry[StrategyInfo] = Registry(
    "strategy", "set aggregation.strategy to a registered strategy (`fedctl session init`)"
)
STRATEGIES.register("fedavg", StrategyInfo(supports_secure=True))
# FedProx changes local training only (the proximal term); its aggregate is FedAvg's mean.
STRATEGIES.register("fedprox", StrategyInfo(supports_secure=True))
# Server optimizers step from the weighted mean alone (Strategy.from_mean): a secure round
# computes that mean, so they work under secure aggregation and keep their moments.
for _name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
    STRATEGIES.register(_name, StrategyInfo(supports_secure=True))
# The robust ones compare single updates, which a secure round never shows the coordinator.
for _name in ("median", "trimmed_mean", "krum", "multikrum", "bulyan"):
    STRATEGIES.register(_name, StrategyInfo(supports_secure=False))

# How an update's weights become the bytes of an ``update`` frame and back (fednode.codecs).
IDENTITY_CODEC = "identity"
TOPK_QUANTIZE = "topk_quantize"  # the spec also accepts it spelled "topk+quantize"
RANDK = "randk"  # the one compressing codec secure aggregation can sum (shared coordinates)


@dataclass(frozen=True)
class CodecInfo:
    # whether masked vectors of it still sum (secure aggregation): only codecs whose every
    # participant sends the same coordinates (randk's shared seed), and identity
    secure: bool
    # what compression.* settings it reads (the spec refuses the others being set)
    settings: tuple[str, ...] = ()


CODECS: Registry[CodecInfo] = Registry(
    "update codec", "set compression.codec to a codec both coordinator and participants have"
)
CODECS.register(IDENTITY_CODEC, CodecInfo(secure=True))
CODECS.register("fp16", CodecInfo(secure=False, settings=("error_feedback",)))
CODECS.register("bf16", CodecInfo(secure=False, settings=("error_feedback",)))
CODECS.register("quantize", CodecInfo(secure=False, settings=("bits", "chunk", "error_feedback")))
CODECS.register("topk", CodecInfo(secure=False, settings=("fraction", "error_feedback")))
CODECS.register(
    TOPK_QUANTIZE,
    CodecInfo(secure=False, settings=("fraction", "bits", "chunk", "error_feedback")),
)
CODECS.register(RANDK, CodecInfo(secure=True, settings=("fraction", "error_feedback")))

# What wraps local training on a participant to make its update private (fednode.privacy).
NO_PRIVACY = "none"
LOCAL_DP = "local_dp"  # DP-SGD on each participant (Opacus)
CENTRAL_DP = "central_dp"  # DP-FedAvg: clipped updates, noise on the aggregate
PRIVACY: Registry[None] = Registry(
    "privacy mechanism", "set privacy.mode to a mechanism every participant has"
)
PRIVACY.register(NO_PRIVACY, None)
PRIVACY.register(LOCAL_DP, None)
PRIVACY.register(CENTRAL_DP, None)
