"""One secure-aggregation round on the coordinator: the stages of protocol.secagg over the wire.

    keys    every selected participant advertises two X25519 public keys        → roster (U1)
    shares  each sends Shamir shares, encrypted to its neighbours               → relayed (U2)
    masked  each trains, then sends its masked fixed-point [n, n·(w - g)] vector → U3
    unmask  survivors send shares: self-mask seeds of U3, keys of U2 \\ U3       → the sum

Each stage waits until every participant expected at it has answered, left, or the round's
deadline passed; whoever is missing is dropped from the later stages. The coordinator relays
ciphertexts it cannot read and never holds an individual unmasked vector: what it decodes is
the sum of U3's weighted updates against the round's model g (which it published, so it
learns nothing more from g) and the sum of their example counts; g plus their ratio is the
weighted mean of U3's models, from which every strategy that ``supports_secure``
(protocol.plugins.STRATEGIES) makes the new model and its state (``Strategy.from_mean``:
the mean itself for FedAvg, a server optimizer's step for FedAvgM and FedAdam).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode import central_dp, weights
from fednode.codecs import randk, round_seed
from protocol import messages, plugins
from protocol.errors import AggregateRejected, FednodeError, StateError, ValidationError
from protocol.secagg import (
    Server,
    decode_average,
    packed_size,
    params_from_spec,
    params_to_wire,
    unpack,
    value_bytes,
)

if TYPE_CHECKING:
    from fednode.services import RoundView, SecureSession

STAGES = ("keys", "shares", "masked", "unmask")


class SecureRound:
    def __init__(self, run: SecureSession, rnd: RoundView):
        if not run.strategy.supports_secure:  # the spec check refuses it; this is the backstop
            raise StateError(
                f"strategy {run.strategy.name!r} cannot be computed from the sum of the updates, "
                "which is all a secure round shows the coordinator",
                hint="use a strategy that supports secure aggregation, or secure = false",
            )
        self.run = run
        self.rnd = rnd
        # Fresh for every attempt at a round: a round cut by a coordinator restart runs again
        # under its number, and its keys (new on every participant) and this tag (new here)
        # make sure that no KDF input, hence no mask, of the cut attempt is used twice.
        tag = hashlib.sha256(
            f"fednode/secagg/{run.session_id}/{rnd.number}/".encode() + os.urandom(16)
        ).digest()
        self.params = params_from_spec(
            run.spec["aggregation"], len(rnd.selected), tag, os.urandom(32)
        )
        # The round's model, the one rnd.model_cid names: participants encode w - g against it
        if run.global_weights is None or run.global_cid != rnd.model_cid:
            raise StateError(f"round {rnd.number}: the global model is not {rnd.model_cid}")
        self.base = weights.flatten(run.global_weights, run.shapes)
        # compression.codec = "randk": every input holds the same coordinates of w - g, drawn
        # from the round's shared seed, so the masked sum is the sum of those coordinates
        comp = run.spec.get("compression") or {}
        self.coords: np.ndarray | None = None
        if comp.get("codec") == plugins.RANDK:
            self.coords = randk.coordinates(
                self.base.size,
                comp["fraction"],
                round_seed(run.session_id, rnd.number, rnd.model_cid),
            )
        self.dim = (self.base.size if self.coords is None else self.coords.size) + 1
        # The weight each participant must use: the coordinator checks their sum after the
        # unmasking, and bounds what the whole sum may do, since it never sees one input.
        self.assigned = run.assigned_weights(list(rnd.selected), self.params.max_weight)
        # central DP (fednode.central_dp): each participant clips to clip_norm and adds its
        # share of the noise, sized for the fewest inputs a sum can hold and be unmasked
        self.dp = central_dp.settings(run.spec)
        self.max_norm = (
            self.dp.clip_norm
            if self.dp is not None
            else float(run.spec["aggregation"]["max_update_norm"])
        )
        self.share_count: int | None = None  # m, once the roster is known and a sum decoded
        self._roster = 0
        self.server = Server(self.params, self.dim)
        self.stage = STAGES[0]
        self.expected: set[str] = set(rnd.selected)
        self.answered: set[str] = set()
        self.in_sum: list[str] = []  # U3: whose models are in the aggregate

    def wire(self, peer: str) -> dict[str, Any]:
        """round_start's secagg table for one participant: the round's parameters, the
        participants, and this participant's weight and update-norm bound."""
        return {
            **params_to_wire(self.params),
            "participants": list(self.rnd.selected),
            "weight": self.assigned[peer],
            "max_update_norm": self.max_norm,
        }

    # --- input ---------------------------------------------------------------------------

    def on_message(self, peer: str, msg: messages.Message, size: int) -> None:
        """Feed one participant's stage message to the protocol; ValidationError if wrong."""
        want = {
            "keys": messages.SecaggKeys,
            "shares": messages.SecaggShares,
            "masked": messages.SecaggMasked,
            "unmask": messages.SecaggUnmask,
        }[self.stage]
        if not isinstance(msg, want) or getattr(msg, "round", None) != self.rnd.number:
            raise ValidationError(
                f"{msg.TYPE!r} for round {getattr(msg, 'round', '?')} while round "
                f"{self.rnd.number} is at stage {self.stage!r}",
                code="STALE_UPDATE",
            )
        if peer not in self.expected or peer in self.answered:
            raise ValidationError(
                f"{peer} is not expected at stage {self.stage!r} (or answered already)",
                code="NOT_SELECTED",
            )
        self.rnd.bytes_up += size
        try:
            if isinstance(msg, messages.SecaggKeys):
                self.server.on_advertise(peer, {"c_pk": msg.c_pk, "s_pk": msg.s_pk})
            elif isinstance(msg, messages.SecaggShares):
                self.server.on_shares(peer, msg.shares)
            elif isinstance(msg, messages.SecaggMasked):
                want = packed_size(self.dim, self.params)
                if len(msg.data) != want:
                    raise ValidationError(
                        f"secagg_masked from {peer}: data of {len(msg.data):,} bytes, expected "
                        f"{want:,} ({self.dim:,} values of {value_bytes(self.params)} bytes "
                        f"for bits = {self.params.bits})"
                    )
                self.server.on_masked(peer, unpack(msg.data, self.dim, self.params))
                self.run.record_masked(peer, msg, size)
            else:
                self.server.on_unmask(peer, {"b": msg.b, "s": msg.s})
        except FednodeError as err:
            self.rnd.failed[peer] = f"rejected at {self.stage}: {err.message}"
            raise
        self.answered.add(peer)
        self.run.coord.record(
            "secagg",
            self.run.session_id,
            {"round": self.rnd.number, "stage": self.stage, "participant": peer},
            ledger=False,
        )

    def on_peer_lost(self, peer: str) -> None:
        if peer in self.expected and peer not in self.answered:
            self.rnd.failed.setdefault(peer, f"left at stage {self.stage}")

    # --- the driver ------------------------------------------------------------------------

    async def _stage(
        self, name: str, expected: set[str], wait: Callable[[float], Awaitable[None]], end: float
    ) -> set[str]:
        self.stage, self.expected, self.answered = name, set(expected), set()
        while self.expected - self.answered - set(self.rnd.failed):
            left = end - time.monotonic()
            if left <= 0:
                break
            await wait(left)
        for peer in self.expected - self.answered:
            self.rnd.failed.setdefault(peer, f"no answer at stage {name} before the deadline")
        return set(self.answered)

    async def run_round(
        self, send: Callable[[str, messages.Message], Awaitable[bool]], wait: Any, end: float
    ) -> tuple[weights.Weights, list[str]]:
        """The four stages; returns the new global model and U3. SecAggError aborts."""
        n = self.rnd.number
        u1 = await self._stage("keys", set(self.rnd.selected), wait, end)
        self._roster = len(u1)  # the graph's size: what a participant sizes its noise share for
        roster = self.server.roster()
        for peer in sorted(u1):
            await send(peer, messages.SecaggRoster(round=n, roster=roster))
        u2 = await self._stage("shares", u1, wait, end)
        for peer, cts in self.server.relay().items():
            await send(peer, messages.SecaggRelay(round=n, shares=cts))
        u3 = await self._stage("masked", u2, wait, end)
        survivors, dropped = self.server.unmask_request()
        self.in_sum = sorted(survivors)
        for peer in survivors:
            await send(
                peer, messages.SecaggUnmaskRequest(round=n, survivors=survivors, dropped=dropped)
            )
        await self._stage("unmask", set(survivors), wait, end)
        total = await asyncio.to_thread(self.server.result)
        if self.dp is not None:  # the sum is decoded: released, whatever the checks find
            self.share_count = central_dp.min_unmaskable(
                self._roster, self.params.neighbours, self.params.threshold
            )
        # g + the weighted mean of the updates (SecAggError if the sum holds no weight)
        if self.coords is None:
            weight_sum, average = decode_average(total, self.base, self.params)
        else:  # randk: the mean at the round's coordinates; the model elsewhere as it was
            weight_sum, picked = decode_average(total, self.base[self.coords], self.params)
            average = self.base.copy()
            average[self.coords] = picked
        assert set(self.in_sum) <= u3
        self._check_sum(weight_sum, average)
        # the strategy's step from the mean (a server optimizer's; FedAvg's is the mean): its
        # state becomes the session's when the round's model is published, as in plain rounds
        mean = weights.unflatten(average, self.run.shapes)
        new, self.rnd.next_state = await asyncio.to_thread(
            self.run.strategy.from_mean, self.run.global_weights, mean, self.run.strategy_state
        )
        return new, self.in_sum

    def _check_sum(self, weight_sum: float, average: np.ndarray) -> None:
        """What the coordinator can check of a sum it cannot take apart: the weights are the
        ones it assigned, and the mean update keeps the bounds every honest input keeps
        (each coordinate within clip, the L2 norm within max_update_norm), up to the
        fixed point's rounding. A participant that broke them poisons the whole sum, so the
        aggregate is rejected, with the figures."""
        expected = sum(self.assigned[p] for p in self.in_sum)
        step = 2.0 ** -(self.params.frac_bits + 1)  # the largest rounding of one mean value
        update = average - self.base
        norm = float(np.linalg.norm(update))
        peak = float(np.max(np.abs(update))) if update.size else 0.0
        self.run.coord.record(
            "aggregation",
            self.run.session_id,
            {
                "round": self.rnd.number,
                "secure": True,
                "weighting": self.run.spec["aggregation"]["weighting"],
                "max_weight_share": self.run.spec["aggregation"]["max_weight_share"],
                "max_update_norm": self.max_norm,
                "assigned": {p: self.assigned[p] for p in sorted(self.assigned)},
                "in_sum": list(self.in_sum),
                "weight_sum": weight_sum,
                "expected_weight_sum": expected,
                "norm": norm,
                "peak": peak,
            },
        )
        if abs(weight_sum - expected) > 0.5:
            raise AggregateRejected(
                f"the unmasked weights sum to {weight_sum:g}, but the participants in the sum "
                f"were assigned {expected}: one of them used another weight"
            )
        if peak > self.params.clip + step:
            raise AggregateRejected(
                f"a coordinate of the mean update is {peak:.4g}, beyond clip "
                f"{self.params.clip:g}: one input was out of bounds"
            )
        most = self.max_norm + step * math.sqrt(update.size)
        bound = "max_update_norm"
        if self.dp is not None and self.share_count is not None:  # plus the noise's norm
            std = central_dp.share_std(self.dp.noise_multiplier, self.max_norm, self.share_count)
            most = central_dp.secure_norm_bound(self.max_norm, std, len(self.in_sum), update.size)
            most += step * math.sqrt(update.size)
            bound = "clip_norm plus the noise's bound"
        if self.max_norm > 0 and norm > most:
            raise AggregateRejected(
                f"the mean update's L2 norm is {norm:.4g}, beyond {bound} {most:.4g}: one "
                "input was out of bounds"
            )
