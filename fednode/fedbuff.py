"""Buffered asynchronous aggregation, FedBuff (Nguyen et al., AISTATS 2022): the pure part.

In ``[aggregation] mode = "async"`` participants train on whatever model version is current
when they are given a task and answer when they are done; the coordinator does not wait for
a cohort. Each accepted update enters a buffer as its *delta*, the trained model minus the
model version it was trained from, with its *staleness* s: how many versions were published
since that one. When the buffer holds K = ``buffer_size`` updates the next version is

    w_{t+1} = w_t + server_lr * sum_k share_k * s(τ_k) * clip(δ_k)

where ``share_k`` is the update's bounded example weight normalised over the buffer (the
claim capped by what its sender registered and ``max_examples``, the peer's total share
capped at ``max_weight_share``: fednode.bounds, as a synchronous round bounds them), each
delta is clipped to ``max_update_norm``, and s(τ) is the staleness weight: (1 + τ)^-a
("polynomial", FedBuff's choice with a = 0.5) or 1 ("constant").

The shares sum to 1 and the staleness weights are at most 1, so a buffer of stale updates
moves the model less than a fresh one (FedBuff divides the staleness-weighted sum by K, not
by the sum of the staleness weights): with every update fresh and server_lr = 1 the step is
FedAvg's weighted mean. An update older than ``max_staleness`` versions is refused
(``TOO_STALE``), as it would be applied to a model it never saw.

No I/O, no clock, no asyncio here: fednode.async_round (the session's driver in async mode)
does the waiting and the writing and asks this module what to do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednode import bounds
from fednode.weights import Weights
from protocol.errors import ValidationError

#: Staleness weightings (spec aggregation.staleness).
STALENESS_KINDS = ("polynomial", "constant")
#: server_lr = 0 in the spec means "the strategy's default"; FedBuff's is a plain mean step.
DEFAULT_SERVER_LR = 1.0


def staleness_weight(staleness: int, kind: str, exponent: float) -> float:
    """s(τ): how much an update ``staleness`` versions old counts (1 for a fresh one)."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0: an update from a future version")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** -exponent)
    raise ValueError(f"staleness weighting {kind!r} not in {STALENESS_KINDS}")


def check_staleness(staleness: int, max_staleness: int) -> None:
    """Refuse an update trained on a version more than ``max_staleness`` versions old."""
    if staleness > max_staleness:
        raise ValidationError(
            f"update trained on a model {staleness} versions old, more than "
            f"aggregation.max_staleness = {max_staleness}",
            code="TOO_STALE",
            hint="the participant is too slow for this session: a larger max_staleness "
            "takes it, a smaller concurrency gives it fewer versions to fall behind",
        )


@dataclass(frozen=True)
class Settings:
    """The async settings of a validated spec's [aggregation] table."""

    buffer_size: int
    max_staleness: int
    staleness: str
    exponent: float
    server_lr: float
    weighting: str
    max_examples: int
    max_weight_share: float
    max_update_norm: float

    @classmethod
    def of(cls, agg: Mapping[str, Any]) -> Settings:
        return cls(
            buffer_size=int(agg["buffer_size"]),
            max_staleness=int(agg["max_staleness"]),
            staleness=str(agg["staleness"]),
            exponent=float(agg["staleness_exponent"]),
            server_lr=float(agg["server_lr"]) or DEFAULT_SERVER_LR,
            weighting=str(agg["weighting"]),
            max_examples=int(agg["max_examples"]),
            max_weight_share=float(agg["max_weight_share"]),
            max_update_norm=float(agg["max_update_norm"]),
        )


@dataclass(frozen=True)
class Entry:
    """One accepted update waiting in the buffer."""

    peer: str
    delta: Weights  # trained model minus the version it was trained from
    num_examples: int  # as claimed; bounded when aggregated
    version: int  # the model version it was trained from
    loss: float
    note: Any = None  # the driver's own record of the message (not read here)


@dataclass
class Buffer:
    """The updates received since the last aggregation, in arrival order."""

    size: int
    entries: list[Entry] = field(default_factory=list)

    def add(self, entry: Entry) -> None:
        self.entries.append(entry)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.size

    def take(self) -> list[Entry]:
        """The first ``size`` entries (the rest stay for the next aggregation)."""
        taken, self.entries = self.entries[: self.size], self.entries[self.size :]
        return taken

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class Step:
    """One aggregation: the new model and the figures the ledger and the event keep."""

    weights: Weights
    figures: list[dict[str, Any]]  # per entry, in buffer order

    @property
    def staleness(self) -> list[int]:
        return [f["staleness"] for f in self.figures]


def shares(
    entries: list[Entry], claims: Mapping[str, int], s: Settings
) -> tuple[list[float], list[float]]:
    """Each entry's bounded weight and its share of the buffer (summing to 1). The share cap
    holds per peer: a fast peer with two updates in one buffer shares one cap between them,
    in proportion to their weights."""
    raw = [
        bounds.bounded_weight(
            e.num_examples,
            claims.get(e.peer),
            weighting=s.weighting,
            max_examples=s.max_examples,
        )
        for e in entries
    ]
    per_peer: dict[str, float] = {}
    for e, w in zip(entries, raw, strict=True):
        per_peer[e.peer] = per_peer.get(e.peer, 0.0) + w
    peer_share = bounds.capped_shares(per_peer, s.max_weight_share)
    out = []
    for e, w in zip(entries, raw, strict=True):
        total = per_peer[e.peer]
        count = sum(1 for x in entries if x.peer == e.peer)
        out.append(peer_share[e.peer] * (w / total if total > 0 else 1.0 / count))
    return raw, out


def step(
    current: Weights,
    version: int,
    entries: list[Entry],
    claims: Mapping[str, int],
    s: Settings,
) -> Step:
    """The next model version from the current one (``version``) and a full buffer."""
    if not entries:
        raise ValueError("an aggregation needs at least one buffered update")
    raw, share = shares(entries, claims, s)
    zero = {k: np.zeros_like(v) for k, v in current.items()}
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in current.items()}
    figures = []
    for e, w, sh in zip(entries, raw, share, strict=True):
        tau = version - e.version
        check_staleness(tau, s.max_staleness)
        sw = staleness_weight(tau, s.staleness, s.exponent)
        clipped, norm, scale = bounds.clip_update(e.delta, zero, s.max_update_norm)
        for k in total:
            total[k] += (sh * sw) * clipped[k].astype(np.float64)
        figures.append(
            {
                "participant": e.peer,
                "trained_on": e.version,
                "staleness": tau,
                "staleness_weight": sw,
                "claimed": e.num_examples,
                "registered": claims.get(e.peer),
                "weight": w,
                "share": sh,
                "norm": norm,
                "scale": scale,
            }
        )
    new = {
        k: (current[k].astype(np.float64) + s.server_lr * total[k]).astype(current[k].dtype)
        for k in current
    }
    return Step(new, figures)


def split_stale(
    entries: list[Entry], version: int, max_staleness: int
) -> tuple[list[Entry], list[tuple[Entry, ValidationError]]]:
    """The entries that may be applied to ``version``, and those now too stale (an update
    accepted while the previous aggregation was being published can pass the bound by one
    version), each with its refusal."""
    ok, stale = [], []
    for e in entries:
        try:
            check_staleness(version - e.version, max_staleness)
        except ValidationError as err:
            stale.append((e, err))
        else:
            ok.append(e)
    return ok, stale


def summary(staleness: list[int]) -> dict[str, float | int]:
    """The staleness figures of one aggregation, as its round_completed event keeps them."""
    if not staleness:
        return {"max": 0, "mean": 0.0, "fresh": 0}
    return {
        "max": max(staleness),
        "mean": float(sum(staleness)) / len(staleness),
        "fresh": sum(1 for t in staleness if t == 0),
    }


def pick(idle: list[str], last_task: Mapping[str, float], free: int) -> list[str]:
    """Which idle peers get a task when ``free`` training slots are open: those that waited
    longest since their last task first (never given one: first of all), ties by ID, so that
    with concurrency below the participants every one of them trains in turn."""
    if free <= 0:
        return []
    return sorted(idle, key=lambda p: (last_task.get(p, -math.inf), p))[:free]
