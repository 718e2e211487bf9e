"""One training session on the coordinator: an explicit state machine and its driver.

Session states and the transitions operators may ask for:

    created --start--> running --pause--> paused --resume--> running
    created|running|paused --stop--> stopped
    running --(all rounds done)--> completed      running --(error)--> failed

Each round goes through phases, in order, recorded in the ledger and pushed as events:

    selecting -> training -> aggregating -> evaluating -> done

Pause takes effect between rounds: the round in flight finishes and is recorded, then the
session waits. Stop cancels the round in flight; it is recorded as aborted.

Rollback (fednode.versions has the rule): after each round the live lineage's accuracies
are checked; a model that diverged (spec [rollback]) sends the session back to the best
version so far, and a non-finite aggregate is never published and rolls back at once. An
operator may roll back by hand (``fedctl session rollback``) while the session runs or is
paused; it takes effect between rounds. Rounds keep their numbers either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode import bounds, quality, training, versions, weights
from fednode.data import load_eval
from fednode.secure_round import SecureRound
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate
from protocol import messages
from protocol import spec as specmod
from protocol.cid import file_cid
from protocol.errors import (
    AggregateRejected,
    FednodeError,
    NotFound,
    StateError,
    ValidationError,
)

if TYPE_CHECKING:
    from fednode.coordinator import Coordinator

log = logging.getLogger("fednode.session")

#: A test option (``fednode run --role coordinator --nan-round K``, hidden): round K's
#: aggregate becomes NaN, to exercise the non-finite rollback. 0 = off.
NAN_ROUND = 0


class SessionState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class RoundPhase(StrEnum):
    SELECTING = "selecting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"


TERMINAL = {SessionState.COMPLETED, SessionState.FAILED, SessionState.STOPPED}
# operator action -> (states it is allowed from, state it leads to)
ACTIONS: dict[str, tuple[set[SessionState], SessionState]] = {
    "start": ({SessionState.CREATED}, SessionState.RUNNING),
    "pause": ({SessionState.RUNNING}, SessionState.PAUSED),
    "resume": ({SessionState.PAUSED}, SessionState.RUNNING),
    "stop": (
        {SessionState.CREATED, SessionState.RUNNING, SessionState.PAUSED},
        SessionState.STOPPED,
    ),
}


def next_state(state: SessionState, action: str) -> SessionState:
    """The state after an operator action, or StateError saying why it is not allowed."""
    allowed, target = ACTIONS[action]
    if state not in allowed:
        raise StateError(
            f"cannot {action} a session that is {state.value}",
            hint="allowed from: " + ", ".join(sorted(s.value for s in allowed)),
        )
    return target


def model_spec(spec: dict[str, Any]) -> dict[str, Any]:
    m = spec["model"]
    return {
        "kind": m["kind"],
        "inputs": m["inputs"],
        "hidden": m["hidden"],
        "classes": m["classes"],
    }


@dataclass
class RoundRun:
    """What one round knows while it runs."""

    number: int
    model_cid: str
    selected: list[str]
    started_at: float = field(default_factory=time.time)
    phase: RoundPhase = RoundPhase.SELECTING
    received: dict[str, tuple[messages.Update, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # peer -> reason (left, error)
    bytes_up: int = 0
    bytes_down: int = 0
    anomalous_pct: float | None = None  # plain rounds: share of updates that were outliers

    @property
    def outstanding(self) -> set[str]:
        return set(self.selected) - set(self.received) - set(self.failed)


class SessionRun:
    def __init__(
        self,
        coord: Coordinator,
        session_id: str,
        spec: dict[str, Any],
        state: SessionState = SessionState.CREATED,
    ):
        self.coord = coord
        self.session_id = session_id
        self.spec = spec
        self.state = state
        self.round: RoundRun | None = None
        self.rounds_done = 0
        self.global_cid = ""
        self.global_weights: weights.Weights | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.base_loss = math.nan  # validation loss of the current global model
        self.strategy = get_strategy(spec["aggregation"]["strategy"])
        self._wake = asyncio.Event()
        self.secure: SecureRound | None = None
        self._task: asyncio.Task[None] | None = None
        self.pending_rollback: tuple[int, str, float] | None = None  # (round, by, asked at)
        self._idle = False  # the driver waits between rounds (paused): nothing is in flight
        self.paused_for_storage = False  # paused by a storage outage: resumed when it heals

    # --- operator actions -----------------------------------------------------------

    def act(self, action: str) -> SessionState:
        target = next_state(self.state, action)
        if action == "start":
            self._task = asyncio.create_task(self._run(), name=f"session-{self.session_id}")
            self.coord.guard.write(
                self.coord.ledger.update_session, self.session_id, started_at=time.time()
            )
        elif action == "stop" and self._task is not None:
            self._task.cancel()
        self._set_state(target)
        self.wake()
        return target

    def wake(self) -> None:
        self._wake.set()

    def _set_state(self, state: SessionState, error: str | None = None) -> None:
        self.state = state
        fields: dict[str, Any] = {"status": state.value}
        if state in TERMINAL:
            fields["ended_at"] = time.time()
        if error:
            fields["error"] = error
        self.coord.guard.write(self.coord.ledger.update_session, self.session_id, **fields)
        self.coord.record("session", self.session_id, {"status": state.value, "error": error or ""})

    async def _wait(self, timeout: float | None) -> None:
        """Sleep until something changes (update, peer, operator) or the timeout."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    # --- the driver --------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._prepare()
            while self.rounds_done < self.spec["rounds"]:
                while self.state == SessionState.PAUSED:
                    self._idle = True
                    try:
                        await self._wait(None)
                    finally:
                        self._idle = False
                await self._one_round(self.rounds_done + 1)
            self._set_state(SessionState.COMPLETED)
        except asyncio.CancelledError:
            if self.round is not None and self.round.phase != RoundPhase.DONE:
                self._finish_round_failed("aborted", "session stopped by an operator")
            raise
        except FednodeError as err:
            log.error("session %s failed: %s", self.session_id, err.message)
            self._set_state(SessionState.FAILED, f"{err.code}: {err.message}")
        except Exception as exc:  # a bug; the session fails loudly, the node keeps serving
            log.exception("session %s crashed", self.session_id)
            self._set_state(SessionState.FAILED, f"INTERNAL: {type(exc).__name__}: {exc}")
        finally:
            await self.coord.broadcast_session_end(self)

    async def _prepare(self) -> None:
        spec = self.spec
        self.eval_data = await asyncio.to_thread(
            load_eval,
            spec["data"]["dataset"],
            features=spec["data"]["features"],
            seed=spec["data"]["seed"],
        )
        w = training.init_weights(model_spec(spec), spec["model"]["seed"])
        self.shapes = weights.shapes(w)
        acc, loss = await asyncio.to_thread(training.evaluate, model_spec(spec), w, self.eval_data)
        self.base_loss = loss
        cid, size = await self._store_model(w)
        await self.coord.guard.run(
            self.coord.ledger.record_model,
            self.session_id,
            0,
            cid=cid,
            parent_cid=None,
            accuracy=acc,
            loss=loss,
            size=size,
            created_at=time.time(),
        )

    async def _store_model(self, w: weights.Weights) -> tuple[str, int]:
        """Put a global model in the content store and make it the current one."""
        blob = weights.to_bytes(w)
        cid = await self.coord.guard.run(self.coord.store.put, blob)
        self.global_cid, self.global_weights = cid, w
        return cid, len(blob)

    def _eligible(self) -> list[str]:
        allowed = self.coord.allowed(self)
        online = [p for p in self.coord.online_participants() if self.coord.names_of(p) & allowed]
        excluded = self.coord.monitor.excluded()
        return [p for p in online if p not in excluded]

    def _log_exclusions(self, number: int) -> None:
        """An admitted, online peer left out because of an open critical alert: say so."""
        allowed = self.coord.allowed(self)
        alerted = self.coord.monitor.alerted()
        by_operator = self.coord.ledger.excluded_peers()
        for p in self.coord.online_participants():
            if p in alerted | by_operator and self.coord.names_of(p) & allowed:
                self.coord.record(
                    "action",
                    self.session_id,
                    {
                        "action": "excluded_from_selection",
                        "round": number,
                        "peer_id": p,
                        "reason": "excluded by an operator (readmit to include it)"
                        if p in by_operator
                        else "open critical alert (acknowledge it to readmit the peer)",
                    },
                    entity_id=p,
                )

    async def _select(self) -> list[str]:
        spec = self.spec
        deadline = time.monotonic() + spec["wait_participants_s"]
        while len(self._eligible()) < spec["min_participants"]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateError(
                    f"only {len(self._eligible())} of min_participants = "
                    f"{spec['min_participants']} admitted participants online after "
                    f"{spec['wait_participants_s']:.0f} s",
                    hint="start more participants (listed in the spec or holding an invite "
                    "from `fedctl invite`), or lower min_participants",
                )
            await self._wait(left)
        selected = self._eligible()
        if spec["max_participants"]:
            selected = selected[: spec["max_participants"]]
        return selected

    async def _one_round(self, number: int) -> None:
        spec = self.spec
        selected = await self._select()
        self._apply_pending_rollback()  # an operator's rollback takes effect between rounds
        self._log_exclusions(number)
        rnd = self.round = RoundRun(number, self.global_cid, selected)
        # What each selected peer registered is the most its weight may count in this session
        # (it only ever goes down); then the round itself, before anyone is asked to train.
        await self.coord.guard.run(
            self._record_claims, {p: self.coord.registered_examples(p) for p in selected}
        )
        await self.coord.guard.run(
            self.coord.ledger.start_round,
            self.session_id,
            number,
            selected=selected,
            model_cid_in=self.global_cid,
            started_at=rnd.started_at,
        )
        self.coord.record(
            "round_started",
            self.session_id,
            {
                "round": number,
                "selected": selected,
                "model_cid": self.global_cid,
                "started_at": rnd.started_at,
                "deadline_s": spec["round_timeout_s"],
            },
        )
        rnd.phase = RoundPhase.TRAINING
        try:
            self.secure = SecureRound(self, rnd) if spec["aggregation"]["secure"] else None
        except FednodeError as err:  # e.g. more participants than the fixed point fits
            self.secure = None
            self._finish_round_failed("aborted", f"secure aggregation cannot start: {err.message}")
            raise StateError(f"round {number} cannot run: {err.message}", hint=err.hint) from None
        for peer in selected:
            task = messages.RoundStart(
                round=number,
                model_cid=self.global_cid,
                spec=spec,
                deadline_s=spec["round_timeout_s"],
                secagg=self.secure.wire(peer) if self.secure else {},
            )
            if not await self.coord.send_to(peer, task, self.session_id):
                rnd.failed[peer] = "offline when the round started"
        end = time.monotonic() + spec["round_timeout_s"]
        try:
            if self.secure is not None:
                new, contributors = await self.secure.run_round(self._send, self._wait, end)
            else:
                new, contributors = await self._collect_plain(rnd, end)
            if len(contributors) < spec["min_participants"]:
                raise StateError(
                    f"{len(contributors)} models in the aggregate, fewer than "
                    f"min_participants = {spec['min_participants']}"
                )
            if number == NAN_ROUND:  # the test option: this round's aggregate diverges
                new = {k: np.full_like(v, np.nan) for k, v in new.items()}
            if not versions.is_finite(new):
                raise AggregateRejected("the aggregate has non-finite weights (NaN or inf)")
        except AggregateRejected as err:
            self._reject(rnd, err.message)
            return
        except FednodeError as err:
            reason = f"{err.message}; " + "; ".join(f"{p[-8:]}: {r}" for p, r in rnd.failed.items())
            self._finish_round_failed("aborted" if self.secure else "failed", reason)
            if spec["on_round_failure"] == "continue":
                self.rounds_done = number  # counts as run; the next round starts from this model
                return
            raise StateError(f"round {number} failed: {reason}") from None
        if await self._complete(rnd, new, contributors):
            self._check_divergence(number)

    async def _send(self, peer: str, msg: messages.Message) -> bool:
        sent = await self.coord.send_to(peer, msg, self.session_id)
        return sent

    async def _collect_plain(self, rnd: RoundRun, end: float) -> tuple[weights.Weights, list[str]]:
        while rnd.outstanding and time.monotonic() < end:
            await self._wait(end - time.monotonic())
        for peer in rnd.outstanding:
            rnd.failed[peer] = "no update before the round timeout"
        if not rnd.received:
            raise StateError("no update arrived")
        rnd.phase = RoundPhase.AGGREGATING
        updates = [
            ClientUpdate(
                peer, weights.from_bytes(u.data, expect=self.shapes), u.num_examples, u.loss
            )
            for peer, (u, _) in sorted(rnd.received.items())
        ]
        assert self.global_weights is not None
        judged = await asyncio.to_thread(self._judge_updates, updates)
        self._record_judgement(rnd, judged)
        claims = self.coord.ledger.claims(self.session_id)
        bounded, figures = await asyncio.to_thread(self._bound, updates, claims)
        self._record_bounds(rnd, figures)
        new = await asyncio.to_thread(self.strategy.aggregate, self.global_weights, bounded)
        return new, sorted(rnd.received)

    def _bound(
        self, updates: list[ClientUpdate], claims: dict[str, int]
    ) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]]]:
        """Each update's weight and step bounded (fednode.bounds), with the figures of the
        decision. A claim counts at most what the participant registered (``claims``).
        Runs in a worker thread, so it only computes."""
        assert self.global_weights is not None
        agg = self.spec["aggregation"]
        raw = {
            u.peer_id: bounds.bounded_weight(
                u.num_examples,
                claims.get(u.peer_id),
                weighting=agg["weighting"],
                max_examples=agg["max_examples"],
            )
            for u in updates
        }
        shares = bounds.capped_shares(raw, agg["max_weight_share"])
        out, figures = [], {}
        for u in updates:
            w, norm, scale = bounds.clip_update(
                u.weights, self.global_weights, agg["max_update_norm"]
            )
            out.append(ClientUpdate(u.peer_id, w, u.num_examples, u.loss, shares[u.peer_id]))
            figures[u.peer_id] = {
                "claimed": u.num_examples,
                "registered": claims.get(u.peer_id),
                "weight": raw[u.peer_id],
                "share": shares[u.peer_id],
                "norm": norm,
                "scale": scale,
            }
        return out, figures

    def _record_bounds(self, rnd: RoundRun, figures: dict[str, dict[str, Any]]) -> None:
        agg = self.spec["aggregation"]
        self.coord.record(
            "aggregation",
            self.session_id,
            {
                "round": rnd.number,
                "secure": self.secure is not None,
                "weighting": agg["weighting"],
                "max_examples": agg["max_examples"],
                "max_weight_share": agg["max_weight_share"],
                "max_update_norm": agg["max_update_norm"],
                "updates": figures,
            },
        )

    def _record_claims(self, examples: dict[str, int]) -> None:
        for peer, n in examples.items():
            self.coord.ledger.record_claims([self.session_id], peer, n, time.time())

    def assigned_weights(self, selected: list[str], max_weight: int) -> dict[str, int]:
        """Secure rounds: the whole-number weight each selected participant must use, from
        what it registered, bounded as a plain round bounds a claim. The coordinator checks
        their sum after unmasking; it cannot see a single one."""
        agg = self.spec["aggregation"]
        claims = self.coord.ledger.claims(self.session_id)
        raw = {
            p: bounds.bounded_weight(
                claims.get(p, 0),
                claims.get(p),
                weighting=agg["weighting"],
                max_examples=agg["max_examples"],
            )
            for p in selected
        }
        shares = bounds.capped_shares(raw, agg["max_weight_share"])
        return bounds.integer_weights(shares, sum(raw.values()), max_weight)

    def _judge_updates(self, updates: list[ClientUpdate]) -> dict[str, tuple[float, float]]:
        """Each plain update alone on the validation data (its loss) and its L2 distance from
        the round's model. Secure rounds cannot do this: the coordinator never holds one
        update. Runs in a worker thread, so it only computes."""
        assert self.global_weights is not None
        base = self.global_weights
        mspec = model_spec(self.spec)
        out: dict[str, tuple[float, float]] = {}
        for u in updates:
            _acc, loss = training.evaluate(mspec, u.weights, self.eval_data)
            dist = math.sqrt(sum(float(np.sum((u.weights[k] - base[k]) ** 2)) for k in base))
            out[u.peer_id] = (loss, dist)
        return out

    def _record_judgement(self, rnd: RoundRun, judged: dict[str, tuple[float, float]]) -> None:
        if math.isfinite(self.base_loss):  # else there is nothing to compare against
            for peer, (loss, _) in judged.items():
                self.coord.monitor.on_model_quality(
                    peer, quality.model_quality_score(self.base_loss, loss)
                )
        distances = {peer: d for peer, (_, d) in judged.items()}
        flagged = quality.anomalous(distances)
        rnd.anomalous_pct = 100.0 * len(flagged) / len(distances) if distances else None
        for peer in sorted(flagged):
            self.coord.record(
                "anomaly",
                self.session_id,
                {"round": rnd.number, "peer_id": peer, "distance": distances[peer]},
                entity_id=peer,
            )

    async def _complete(self, rnd: RoundRun, new: weights.Weights, contributors: list[str]) -> bool:
        """Evaluate the candidate; publish and commit it, or reject it. Whether published."""
        rnd.phase = RoundPhase.EVALUATING
        acc, loss = await asyncio.to_thread(
            training.evaluate, model_spec(self.spec), new, self.eval_data
        )
        factor = self.spec["aggregation"]["max_loss_factor"]
        if bounds.loss_jumped(loss, self.base_loss, factor):
            self._reject(
                rnd,
                f"its validation loss {loss:.4g} is over {factor:g} x the current model's "
                f"{self.base_loss:.4g} (accuracy {acc:.4f})"
                if math.isfinite(loss)
                else "its validation loss is not finite",
            )
            return False
        parent = self.global_cid
        cid, size = await self._store_model(new)
        now = time.time()
        await self.coord.guard.run(
            self.coord.ledger.complete_round,
            self.session_id,
            rnd.number,
            ended_at=now,
            model_cid=cid,
            parent_cid=parent,
            accuracy=acc,
            loss=loss,
            size=size,
            participants=len(contributors),
            dropped=len(set(rnd.selected) - set(contributors)),
            bytes_up=rnd.bytes_up,
            bytes_down=rnd.bytes_down,
        )
        rnd.phase = RoundPhase.DONE
        self.rounds_done = rnd.number
        self.base_loss = loss
        self.coord.record(
            "round_completed",
            self.session_id,
            {
                "round": rnd.number,
                "accuracy": acc,
                "loss": loss,
                "model_cid": cid,
                "duration_s": now - rnd.started_at,
                "participants": sorted(contributors),
                "dropped": sorted(set(rnd.selected) - set(contributors)),
                "bytes_up": rnd.bytes_up,
                "bytes_down": rnd.bytes_down,
            },
        )
        end = messages.RoundEnd(round=rnd.number, status="completed", model_cid=cid, accuracy=acc)
        for peer in rnd.selected:
            await self.coord.send_to(peer, end, self.session_id)
        self.coord.monitor.after_round(self, rnd, rnd.anomalous_pct)
        return True

    def _reject(self, rnd: RoundRun, why: str) -> None:
        """Not published: the round is recorded ``rejected`` with the reason, an alert is
        raised, and the next round starts from the current model (the round counts as run,
        as a rolled-back one does, so a persistent attacker cannot stall the session)."""
        reason = f"aggregate rejected, not published: {why}"
        log.warning("session %s round %d: %s", self.session_id, rnd.number, reason)
        self._finish_round_failed("rejected", reason)
        self.rounds_done = rnd.number
        self.coord.raise_alert(
            "aggregate_rejected",
            self.session_id,
            self.session_id,
            f"round {rnd.number} of session {self.session_id}: {reason}; the next round "
            f"starts from the current model {self.global_cid}",
        )

    def _finish_round_failed(self, status: str, reason: str) -> None:
        rnd = self.round
        assert rnd is not None
        rnd.phase = RoundPhase.DONE
        self.coord.guard.write(
            self.coord.ledger.finish_round,
            self.session_id,
            rnd.number,
            status=status,
            ended_at=time.time(),
            participants=len(rnd.received),
            dropped=len(rnd.failed),
            bytes_up=rnd.bytes_up,
            bytes_down=rnd.bytes_down,
            reason=reason,
        )
        self.coord.record(
            "round_failed",
            self.session_id,
            {"round": rnd.number, "status": status, "reason": reason},
        )
        self.coord.monitor.after_round(self, rnd, None)

    # --- model versions and rollback -----------------------------------------------------

    def _rollback_spec(self) -> dict[str, Any]:
        """The spec's [rollback] table (a spec stored before it existed takes the defaults)."""
        return {**specmod.defaults()["rollback"], **self.spec.get("rollback", {})}

    def _history(self) -> list[tuple[int, float | None]]:
        return [(m["round"], m["accuracy"]) for m in self.coord.ledger.live_models(self.session_id)]

    def _check_divergence(self, number: int) -> None:
        """After a round's version is stored: has the model diverged? Then go back."""
        rb = self._rollback_spec()
        if not rb["enabled"]:
            return
        history = self._history()
        target = versions.rollback_target(history, rb["margin"], rb["rounds"])
        if target is None:
            return
        best = dict(history)[target]
        acc = history[-1][1]
        reason = (
            f"accuracy {acc:.4f} after round {number} is more than {rb['margin']:g} below the "
            f"best so far ({best:.4f}, round {target}) for {rb['rounds']} consecutive round(s)"
        )
        self._rollback(target, reason=reason, trigger="accuracy", round_=number, by="")

    def _rollback(self, to_round: int, *, reason: str, trigger: str, round_: int, by: str) -> None:
        """Make round ``to_round``'s version the global model again: mark the versions after
        it rolled back, log the "rollback" event and, for a divergence, raise its alert."""
        now = time.time()
        live = {m["round"]: m for m in self.coord.ledger.live_models(self.session_id)}
        target = live.get(to_round)
        if target is None:
            raise StateError(f"round {to_round} has no live model version to go back to")
        w = weights.from_bytes(self.coord.store.get(target["cid"]), expect=self.shapes)

        def write() -> None:  # ledger first, then subscribers (kept in order in an outage)
            data = self.coord.ledger.rollback_models(
                self.session_id,
                to_round,
                now=now,
                data={"round": round_, "reason": reason, "trigger": trigger, "by": by},
            )
            self.coord.events.publish("rollback", data, self.session_id)

        self.coord.guard.write(write)
        self.global_cid, self.global_weights = target["cid"], w
        self.base_loss = target["loss"] if target["loss"] is not None else math.nan
        log.warning(
            "session %s rolled back to round %d (%s): %s",
            self.session_id,
            to_round,
            target["cid"],
            reason,
        )
        if trigger != "operator":
            self.coord.raise_alert(
                "model_divergence",
                self.session_id,
                self.session_id,
                f"session {self.session_id} diverged in round {round_} ({reason}); rolled back "
                f"to round {to_round}'s model {target['cid']}",
            )

    def request_rollback(self, to_round: int, by: str) -> dict[str, Any]:
        """An operator's rollback: checked now, applied between rounds (at once when the
        session is paused with nothing in flight)."""
        if self.state not in (SessionState.RUNNING, SessionState.PAUSED):
            hint = {
                SessionState.CREATED: "start the session first; it has no trained version yet",
            }.get(
                self.state,
                f"the session is over; take the version you want from `fedctl model list "
                f"{self.session_id}` (`fedctl model get CID -o FILE`) and start a new session",
            )
            raise StateError(
                f"cannot roll back session {self.session_id}: it is {self.state.value} "
                "(only a running or paused session can be rolled back)",
                hint=hint,
            )
        models = {m["round"]: m for m in self.coord.ledger.models(self.session_id)}
        target = models.get(to_round)
        if target is None:
            raise NotFound(
                f"session {self.session_id} has no model version of round {to_round}",
                hint=f"`fedctl model list {self.session_id}` shows the rounds that have one",
            )
        if target["rolled_back_at"] is not None:
            raise StateError(
                f"round {to_round}'s version was itself rolled back",
                hint=f"pick a round whose status is current or superseded in "
                f"`fedctl model list {self.session_id}`",
            )
        in_flight = (
            not self._idle and self.round is not None and self.round.phase != RoundPhase.DONE
        )
        live = [r for r, m in models.items() if m["rolled_back_at"] is None]
        if to_round == max(live) and not in_flight and self.pending_rollback is None:
            raise StateError(
                f"round {to_round}'s version is already session {self.session_id}'s model",
                hint=f"pick an earlier round from `fedctl model list {self.session_id}`",
            )
        self.pending_rollback = (to_round, by, time.time())
        applied = self._idle and self._apply_pending_rollback()
        self.wake()
        return {
            "session_id": self.session_id,
            "status": self.state.value,
            "to_round": to_round,
            "to_cid": target["cid"],
            "applied": applied,
        }

    def _apply_pending_rollback(self) -> bool:
        """Apply an operator's rollback, if one waits; whether one was applied."""
        if self.pending_rollback is None:
            return False
        to_round, by, asked_at = self.pending_rollback
        self.pending_rollback = None
        try:
            self._rollback(
                to_round,
                reason=f"rolled back by operator {by}" if by else "rolled back by an operator",
                trigger="operator",
                round_=self.rounds_done,
                by=by,
            )
        except FednodeError as err:  # e.g. an automatic rollback went further back meanwhile
            log.warning("operator rollback to round %d not applied: %s", to_round, err.message)
            self.coord.record(
                "action",
                self.session_id,
                {
                    "action": "rollback_skipped",
                    "to_round": to_round,
                    "by": by,
                    "asked_at": asked_at,
                    "reason": err.message,
                },
            )
            return False
        return True

    # --- input from participants ---------------------------------------------------------

    def on_update(self, peer: str, msg: messages.Update, frame_bytes: int) -> None:
        """Accept or reject one update; raises ValidationError with the reason."""
        rnd = self.round
        now = time.time()
        if rnd is None or rnd.phase != RoundPhase.TRAINING or msg.round != rnd.number:
            current = rnd.number if rnd else 0
            raise ValidationError(
                f"update for round {msg.round}, but round {current} of "
                f"session {self.session_id} is not collecting updates",
                code="STALE_UPDATE",
            )
        if peer not in rnd.selected:
            raise ValidationError(
                f"{peer} was not selected for round {rnd.number}", code="NOT_SELECTED"
            )
        if peer in rnd.received or peer in rnd.failed:
            raise ValidationError(
                f"{peer} already answered round {rnd.number}", code="DUPLICATE_UPDATE"
            )
        rnd.bytes_up += frame_bytes
        try:
            if msg.base_cid != rnd.model_cid:
                raise ValidationError(
                    f"update trained on {msg.base_cid}, the round's model is {rnd.model_cid}",
                    code="WRONG_BASE",
                )
            if file_cid(msg.data) != msg.update_cid:
                raise ValidationError(
                    "update bytes do not hash to their update_cid", code="CID_MISMATCH"
                )
            weights.from_bytes(msg.data, expect=self.shapes)  # shapes, dtype, finite
        except ValidationError as err:
            rnd.failed[peer] = f"rejected: {err.message}"
            self._record_update(
                peer, msg, frame_bytes, now, "rejected", f"{err.code}: {err.message}"
            )
            self.wake()
            raise
        self.coord.guard.write(self.coord.store.put, msg.data, pin=False)  # the audit copy
        rnd.received[peer] = (msg, now)
        self._record_update(peer, msg, frame_bytes, now, "accepted", None)
        self.coord.monitor.on_update(peer, self.session_id, now, msg)
        self.coord.record(
            "update_received",
            self.session_id,
            {
                "round": rnd.number,
                "participant": peer,
                "samples": msg.num_examples,
                "loss": msg.loss,
                "train_s": msg.train_s,
                "bytes": frame_bytes,
                "received": len(rnd.received),
                "selected": len(rnd.selected),
            },
            ledger=False,
        )
        self.wake()

    def _record_update(
        self,
        peer: str,
        msg: messages.Update,
        size: int,
        now: float,
        status: str,
        reason: str | None,
    ) -> None:
        assert self.round is not None
        self.coord.guard.write(
            self.coord.ledger.record_update,
            self.session_id,
            msg.round,
            participant=peer,
            samples=msg.num_examples,
            loss=msg.loss,
            bytes=size,
            duration_s=msg.train_s,
            arrival_s=now - self.round.started_at,
            update_cid=msg.update_cid,
            status=status,
            reason=reason,
            received_at=now,
        )

    def on_secagg(self, peer: str, msg: messages.Message, size: int) -> None:
        if self.secure is None or self.round is None or self.round.phase != RoundPhase.TRAINING:
            raise ValidationError(
                f"{msg.TYPE!r} but no secure round of session {self.session_id} is running",
                code="STALE_UPDATE",
            )
        self.secure.on_message(peer, msg, size)
        self.wake()

    def record_masked(self, peer: str, msg: messages.SecaggMasked, size: int) -> None:
        """Ledger row of a masked input: sizes and timings, never the contents (samples are
        inside the mask too, so 0 here)."""
        assert self.round is not None
        now = time.time()
        self.coord.guard.write(
            self.coord.ledger.record_update,
            self.session_id,
            msg.round,
            participant=peer,
            samples=0,
            loss=msg.loss,
            bytes=size,
            duration_s=msg.train_s,
            arrival_s=now - self.round.started_at,
            update_cid="",
            status="accepted",
            reason="masked (secure aggregation)",
            received_at=now,
        )
        self.coord.monitor.on_update(peer, self.session_id, now, msg)

    def on_task_error(self, peer: str, msg: messages.TaskError) -> None:
        """A selected participant could not produce its update (it declined the task, its
        training failed or diverged, its deadline passed): recorded, and the round stops
        waiting for it at once instead of at the timeout."""
        rnd = self.round
        if rnd is None or msg.round != rnd.number or peer not in rnd.selected:
            current = rnd.number if rnd else 0
            raise ValidationError(
                f"task error for round {msg.round}, but round {current} of session "
                f"{self.session_id} did not select {peer}",
                code="STALE_UPDATE",
            )
        self.coord.record(
            "task_error",
            self.session_id,
            {"round": msg.round, "peer_id": peer, "code": msg.code, "message": msg.message},
            entity_id=peer,
        )
        self.on_peer_lost(peer, f"task error {msg.code}: {msg.message}")

    def on_refused_update(self, peer: str, frame_type: str, err: FednodeError) -> None:
        """A selected participant's answer was refused before it could be parsed (invalid
        fields, too large): recorded like a task error, and the round stops waiting for it."""
        rnd = self.round
        if rnd is None or rnd.phase != RoundPhase.TRAINING or peer not in rnd.outstanding:
            return
        message = f"its {frame_type} was refused: {err.message}"
        self.coord.record(
            "task_error",
            self.session_id,
            {"round": rnd.number, "peer_id": peer, "code": err.code, "message": message},
            entity_id=peer,
        )
        self.on_peer_lost(peer, f"{err.code}: {message}")

    def on_peer_lost(self, peer: str, reason: str) -> None:
        if self.secure is not None:
            self.secure.on_peer_lost(peer)
        rnd = self.round
        if rnd is not None and rnd.phase == RoundPhase.TRAINING and peer in rnd.outstanding:
            rnd.failed[peer] = reason
        self.wake()

    def on_bytes_down(self, n: int) -> None:
        if self.round is not None and self.round.phase == RoundPhase.TRAINING:
            self.round.bytes_down += n
