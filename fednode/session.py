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
import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode import (
    bounds,
    central_dp,
    downlink,
    quality,
    robustness,
    rounds,
    training,
    versions,
    weights,
)
from fednode.async_round import AsyncRound
from fednode.codecs import CodecParams, get_codec, round_seed
from fednode.data import Dataset, load_eval
from fednode.dpsgd import BUDGET_WARNING_SHARE
from fednode.resume import ResumePoint
from fednode.round_updates import RoundUpdates
from fednode.rounds import RoundRun
from fednode.schema import Schema
from fednode.secure_round import SecureRound
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate, State
from protocol import messages, modelspec, plugins
from protocol import spec as specmod
from protocol.errors import (
    AggregateRejected,
    FednodeError,
    NotFound,
    StateError,
    ValidationError,
)
from protocol.lifecycle import TERMINAL, RoundPhase, SessionState, next_state

if TYPE_CHECKING:
    from fednode.services import SessionHost

log = logging.getLogger("fednode.session")

#: A test option (``fednode run --role coordinator --nan-round K``, hidden): round K's
#: aggregate becomes NaN, to exercise the non-finite rollback. 0 = off.
NAN_ROUND = 0

#: After a restart, how long the first round waits at most for the participants of the round
#: that was cut to reconnect (they re-dial with backoff of up to a few seconds), so that a
#: crash does not change who trains; bounded by the spec's wait_participants_s.
REGATHER_S = 15.0

#: A round's client_updates rows are written in batches (one transaction each: the ledger's
#: per-call cost is most of its write time, docs/benchmarks.md): when this many wait, or the
#: oldest has waited this long, and always before the round's rows are read or amended.
UPDATE_BATCH_ROWS = 100
UPDATE_BATCH_S = 0.5


def model_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """What builds and prices the model (protocol.modelspec.MODEL_KEYS); a spec stored before
    a key existed lacks it, and the key's default applies."""
    m = spec["model"]
    return {k: m[k] for k in modelspec.MODEL_KEYS if k in m}


# Refusals recorded as ``security`` events (defined with check_content, fednode.rounds).
CONTENT_REFUSALS = rounds.CONTENT_REFUSALS


class SessionRun:
    def __init__(
        self,
        coord: SessionHost,
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
        # the current model's bytes, as stored: every selected participant fetches them
        # each round, so they are served from here rather than re-read and re-hashed
        self._global_blob = b""
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.base_loss = math.nan  # validation loss of the current global model
        self.strategy = get_strategy(spec["aggregation"])  # built with its settings
        # the strategy's own state, that of the current model version (model_versions.state_cid)
        self.strategy_state: State = {}
        # how plain updates are encoded; a spec stored before codecs existed and no longer valid
        # (kept for a finished session) is read as it was: identity
        comp = spec.get("compression") or {}
        self.codec = get_codec(
            comp.get("codec", spec["aggregation"].get("codec", plugins.IDENTITY_CODEC))
        )
        self.compression: dict[str, Any] = dict(comp)
        # (model, held model, downlink mode) -> the model_delta for it (None: send blocks)
        self._deltas: dict[tuple[str, str, str], downlink.Delta | None] = {}
        self._wake = asyncio.Event()
        self.secure: SecureRound | None = None
        # a plain round's accepted updates, as rows read in column blocks (None between rounds)
        self.rows: RoundUpdates | None = None
        self._task: asyncio.Task[None] | None = None
        self.pending_rollback: tuple[int, str, float] | None = None  # (round, by, asked at)
        self._idle = False  # the driver waits between rounds (paused): nothing is in flight
        self.paused_for_storage = False  # paused by a storage outage: resumed when it heals
        # after a restart: the peers of the cut round, and until when the first round waits
        # for them to reconnect (rounds.regathered)
        self._regather: tuple[tuple[str, ...], float] | None = None
        # privacy.mode = "central_dp" (fednode.central_dp), set when the driver starts (σ may
        # come from Opacus's accountant): the settings, the accountant's history of the noisy
        # aggregates released so far (noise multiplier, sample rate), the eligible count of
        # the round's selection (q = selected / eligible), and the noise's entropy
        self.dp: central_dp.CentralDp | None = None
        self._dp_history: list[tuple[float, float]] = []
        self._dp_eligible = 0
        self._dp_rng = np.random.default_rng()
        # aggregation.mode = "async" (FedBuff): its own driver (a spec stored before modes
        # existed is synchronous)
        self.fedbuff: AsyncRound | None = (
            AsyncRound(self) if spec["aggregation"].get("mode") == "async" else None
        )
        # over-selection: the accepted updates that close the round being selected (0: every
        # selected participant's; fednode.rounds.plan_selection)
        self.needed = 0
        # the round's client_updates rows not yet written, and since when the oldest waits:
        # written in batches (flush_updates), not one transaction per arriving update
        self._update_rows: list[dict[str, Any]] = []
        self._rows_since = 0.0

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
        """Sleep until something changes (update, peer, operator) or the timeout; update
        rows waiting to be written wake it at most UPDATE_BATCH_S after the oldest came."""
        self._wake.clear()
        if self._update_rows:
            due = max(0.0, self._rows_since + UPDATE_BATCH_S - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        if self._update_rows and time.monotonic() - self._rows_since >= UPDATE_BATCH_S:
            self.flush_updates()

    def flush_updates(self) -> None:
        """Write the waiting client_updates rows in one transaction. Called when
        UPDATE_BATCH_ROWS wait or the oldest waited UPDATE_BATCH_S, and before anything
        reads or amends the round's rows (judging, scores, the round's outcome)."""
        if self._update_rows:
            rows, self._update_rows = self._update_rows, []
            self.coord.guard.write(self.coord.ledger.record_updates, rows)

    def _queue_update_row(self, row: dict[str, Any]) -> None:
        if not self._update_rows:
            self._rows_since = time.monotonic()
        self._update_rows.append(row)
        if len(self._update_rows) >= UPDATE_BATCH_ROWS:
            self.flush_updates()

    # --- the driver --------------------------------------------------------------------

    def resume(self, point: ResumePoint | None) -> None:
        """Drive a session that was live when the coordinator stopped (Coordinator.serve):
        from ``point`` (fednode.resume), or from the start if it had no model yet. A paused
        session's driver waits, paused, as it did."""
        self._task = asyncio.create_task(self._run(point), name=f"session-{self.session_id}")

    async def _run(self, resume_from: ResumePoint | None = None) -> None:
        stopping = False
        try:
            await self._start_central_dp()
            if resume_from is None:
                await self._prepare()
            else:
                await self._restore(resume_from)
            if self.fedbuff is not None:  # async: until rounds versions are made
                await self.fedbuff.run_session()
            while True:
                # a pause takes effect between rounds, and after the last one too: a session
                # paused while its last round ran stays paused (not completed) until resumed
                if self.state == SessionState.PAUSED:
                    await self._wait_paused()
                if self.rounds_done >= self.spec["rounds"]:
                    break
                await self._one_round(self.rounds_done + 1)
            self._set_state(SessionState.COMPLETED)
        except asyncio.CancelledError:
            stopping = self.coord.stopping
            if self.round is not None and self.round.phase != RoundPhase.DONE:
                if stopping:  # SIGTERM: the session stays live; the round runs again later
                    self.round.phase = RoundPhase.DONE
                    self.flush_updates()
                    self.coord.guard.write(
                        self.coord.ledger.abort_round,
                        self.session_id,
                        self.round.number,
                        reason="the coordinator stopped (SIGTERM) while the round ran; it "
                        "runs again when the coordinator is back",
                        now=time.time(),
                    )
                else:
                    self._finish_round_failed("aborted", "session stopped by an operator")
            raise
        except FednodeError as err:
            log.error("session %s failed: %s", self.session_id, err.message)
            self._set_state(SessionState.FAILED, f"{err.code}: {err.message}")
        except Exception as exc:  # a bug; the session fails loudly, the node keeps serving
            log.exception("session %s crashed", self.session_id)
            self._set_state(SessionState.FAILED, f"INTERNAL: {type(exc).__name__}: {exc}")
        finally:
            self.flush_updates()  # e.g. a late update refused after the last round
            if not stopping:  # a stopping coordinator's sessions have not ended
                await self.coord.broadcast_session_end(self)

    async def _wait_paused(self) -> None:
        """Wait, with nothing in flight, until the session is no longer paused; say so once
        (a ``session`` event with ``idle``: the pause has taken effect)."""
        self._idle = True
        self.coord.record(
            "session", self.session_id, {"status": self.state.value, "error": "", "idle": True}
        )
        try:
            while self.state == SessionState.PAUSED:
                await self._wait(None)
        finally:
            self._idle = False

    @property
    def idle(self) -> bool:
        """The driver waits, paused, with no round in flight."""
        return self._idle

    @property
    def evaluation_on(self) -> str:
        """Spec evaluation.on (a spec stored before it existed: the coordinator)."""
        return str(self.spec.get("evaluation", {}).get("on", "coordinator"))

    async def _load_eval_data(self) -> Dataset | None:
        """The coordinator's evaluation data, or None when it does not evaluate (evaluation.on
        = "participants": data.dataset is not read, and may be "none")."""
        if not rounds.coordinator_evaluates(self.evaluation_on):
            return None
        data = self.spec["data"]
        return await asyncio.to_thread(
            load_eval,
            data["dataset"],
            features=data["features"],
            seed=data["seed"],
            schema=Schema.from_spec(self.spec),  # the data must match what participants train
        )

    async def _prepare(self) -> None:
        spec = self.spec
        self.eval_data = await self._load_eval_data()
        # off the event loop: a python model runs its factory (fednode.factories)
        w = await asyncio.to_thread(training.init_weights, model_spec(spec), spec["model"]["seed"])
        self.shapes = weights.shapes(w)
        acc: float | None = None
        loss: float | None = None
        figures: dict[str, float] | None = None
        if self.eval_data is not None:  # else round 1's participants report on this model
            acc, loss, figures = await self._own_figures(w)
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
            metrics=figures,
        )

    async def _own_figures(self, w: weights.Weights) -> tuple[float, float, dict[str, float]]:
        """The coordinator's evaluation of ``w`` on its data: (score, loss, the task's
        metrics by name, bounded as the ledger keeps them). The score is what the accuracy
        columns and rollback use (accuracy, or R² for regression: rounds.score)."""
        figures = await asyncio.to_thread(
            training.evaluate_metrics, model_spec(self.spec), w, self.eval_data
        )
        metrics = rounds.bounded_metrics(figures)
        score = rounds.score(metrics)
        return 0.0 if score is None else score, figures["loss"], metrics

    async def _restore(self, point: ResumePoint) -> None:
        """Take the session up where the ledger says it was: the current version's model
        (from this node's own store, hash-checked), its loss, its strategy state."""
        spec = self.spec
        self.eval_data = await self._load_eval_data()
        self.shapes = training.expected_shapes(model_spec(spec))
        blob = await self.coord.guard.run(self.coord.store.get, point.model_cid)
        w = await asyncio.to_thread(weights.from_bytes, blob, expect=self.shapes)
        self.global_cid, self.global_weights, self._global_blob = point.model_cid, w, blob
        self.base_loss = point.loss if point.loss is not None else math.nan
        restore_state = getattr(self, "restore_strategy_state", None)
        if restore_state is not None:
            restore_state(point.state_cid)
        self.rounds_done = point.rounds_done
        grace = min(REGATHER_S, float(spec["wait_participants_s"]))
        self._regather = (point.regather, time.monotonic() + grace)
        log.warning(
            "session %s resumed after round %d from round %d's model %s",
            self.session_id,
            point.rounds_done,
            point.model_round,
            point.model_cid,
        )

    async def _store_state(self, state: State) -> str | None:
        """Put a strategy state in the content store (safetensors, like a model): its CID, or
        None for no state (model_versions.state_cid stays NULL)."""
        if not state:
            return None
        blob = await asyncio.to_thread(weights.to_bytes, state)
        return await self.coord.guard.run(self.coord.store.put, blob)

    def restore_strategy_state(self, state_cid: str | None) -> State:
        """Make the state stored under ``state_cid`` (None: no state) the strategy's current
        one, as it was when that model version was made: by rollback, and by resuming a session
        after the coordinator restarted. The store checks the bytes against the CID."""
        if state_cid is None:
            self.strategy_state = {}
        else:
            self.strategy_state = weights.from_bytes(self.coord.store.get(state_cid))
        return self.strategy_state

    async def _store_model(self, w: weights.Weights) -> tuple[str, int]:
        """Put a global model in the content store and make it the current one."""
        blob = weights.to_bytes(w)
        cid = await self.coord.guard.run(self.coord.store.put, blob)
        self.global_cid, self.global_weights, self._global_blob = cid, w, blob
        return cid, len(blob)

    async def model_delta(self, cid: str, have: str) -> downlink.Delta | None:
        """The current model ``cid`` as a difference from model ``have``, which a
        participant holds (compression.downlink), when that is smaller; None otherwise (or
        when ``have`` is not a model of this session's shapes in the store). One delta per
        held model and round: every participant holding the same model gets the same one."""
        mode = self.compression.get("downlink", "full")
        if mode not in downlink.MODES or cid != self.global_cid or not self._global_blob:
            return None
        key = (cid, have, mode)
        if key not in self._deltas:
            self._deltas = {k: v for k, v in self._deltas.items() if k[0] == cid}
            self._deltas[key] = await asyncio.to_thread(self._make_delta, mode, have)
        return self._deltas[key]

    def _make_delta(self, mode: str, have: str) -> downlink.Delta | None:
        store = self.coord.store
        try:
            if have == self.global_cid or not store.has(have):
                return None
            held = store.get(have)  # every block re-hashed
        except FednodeError:  # a malformed CID, a block that went missing
            return None
        delta = downlink.make(downlink.MODES[mode], held, self._global_blob, self.shapes)
        if delta is not None and delta.result_cid != self.global_cid:
            # delta_fp16: what the participant rebuilds is kept under its CID, which it
            # names as the model it holds next round
            store.put(delta.result, pin=False, durable=False)
        return delta

    def model_bytes(self, cid: str) -> bytes | None:
        """The bytes of the session's current model if ``cid`` names it (None: ask the
        store). They were hashed to that CID when stored."""
        return self._global_blob if cid == self.global_cid and self._global_blob else None

    def _eligible(self) -> list[str]:
        return rounds.eligible(
            self.coord.online_participants(),
            self.coord.names_of,
            self.coord.allowed(self),
            self.coord.monitor.excluded(),
        )

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

    def _sample(self, candidates: list[str], number: int) -> list[str] | None:
        """Round ``number``'s participants among ``candidates`` (spec [selection]; None while
        fewer than min_participants), and the updates that close it in ``self.needed`` (0:
        every selected participant's)."""
        spec, sel = self.spec, self.selection
        plan = rounds.plan_selection(
            len(candidates),
            min_participants=spec["min_participants"],
            max_participants=spec["max_participants"],
            fraction=sel["fraction"],
            over_selection=sel["over_selection"],
        )
        if plan is None:
            return None
        self.needed = plan.needed if plan.spares else 0
        # central DP: the candidates come shuffled from the OS's entropy and "first" takes a
        # uniform sample of them; a seeded draw would be one anybody holding the spec could
        # predict, which the accountant's subsampling does not allow for
        method = "first" if self.dp is not None else sel["method"]
        scores: dict[str, float | None] = {}
        if method == "quality":  # each peer's latest overall score (participants.quality_score)
            scores = {p["peer_id"]: p["quality_score"] for p in self.coord.ledger.participants()}
        return rounds.sample(
            candidates, scores, plan.asked, method, rounds.round_rng(sel["seed"], number)
        )

    @property
    def selection(self) -> dict[str, Any]:
        """The spec's [selection] (a spec stored before it existed: the defaults, which
        select as sessions did then)."""
        return {**specmod.defaults()["selection"], **self.spec.get("selection", {})}

    async def _select(self, number: int | None = None) -> list[str]:
        spec = self.spec
        deadline = time.monotonic() + spec["wait_participants_s"]
        while True:
            candidates = self._eligible()
            if self._regather is not None:
                expected, until = self._regather
                if not rounds.regathered(candidates, expected, time.monotonic(), until):
                    await self._wait(until - time.monotonic())
                    continue
                self._regather = None
            if self.dp is not None:  # central DP: a uniformly random subset, q = k / eligible
                candidates = central_dp.shuffled(candidates)
            selected = self._sample(candidates, self.rounds_done + 1 if number is None else number)
            if selected is not None:
                self._dp_eligible = len(candidates)
                return selected
            left = deadline - time.monotonic()
            if left <= 0:
                allowed = self.coord.allowed(self)
                held = [  # online and admitted, but left out: quarantined, alerted, excluded
                    p
                    for p in self.coord.online_participants()
                    if p not in candidates and self.coord.names_of(p) & allowed
                ]
                raise StateError(
                    f"only {len(candidates)} of min_participants = "
                    f"{spec['min_participants']} admitted participants online and eligible "
                    f"after {spec['wait_participants_s']:.0f} s"
                    + (
                        f" ({len(held)} more online but left out: quarantined, under an open "
                        "critical alert or excluded by an operator)"
                        if held
                        else ""
                    ),
                    hint="start more participants (listed in the spec or holding an invite "
                    "from `fedctl invite`), acknowledge or readmit the ones left out "
                    "(fedctl alerts list, participants readmit), or lower min_participants",
                )
            await self._wait(left)

    async def _one_round(self, number: int) -> None:
        try:
            await self._round(number)
        finally:  # the round's updates are let go of however it ended
            if self.rows is not None:
                self.rows.close()
                self.rows = None

    async def _round(self, number: int) -> None:
        spec = self.spec
        selected = await self._select(number)
        self._apply_pending_rollback()  # an operator's rollback takes effect between rounds
        self._log_exclusions(number)
        rnd = self.round = RoundRun(number, self.global_cid, selected, time.time())
        rnd.needed = self.needed
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
                "needed": rnd.needed or len(selected),  # over-selection: fewer than selected
            },
        )
        rnd.phase = RoundPhase.TRAINING
        try:
            self.secure = SecureRound(self, rnd) if spec["aggregation"]["secure"] else None
        except FednodeError as err:  # e.g. more participants than the fixed point fits
            self.secure = None
            self._finish_round_failed("aborted", f"secure aggregation cannot start: {err.message}")
            raise StateError(f"round {number} cannot run: {err.message}", hint=err.hint) from None
        if self.secure is None:
            assert self.global_weights is not None
            self.rows = RoundUpdates(
                self.global_weights,
                len(selected),
                ram_bytes=self.coord.round_ram_bytes,
                spill_dir=self.coord.spill_dir,
            )
        config = self.strategy.round_config(number, spec)  # the same for every participant
        for peer in selected:
            task = messages.RoundStart(
                round=number,
                model_cid=self.global_cid,
                spec=spec,
                deadline_s=spec["round_timeout_s"],
                secagg=self.secure.wire(peer) if self.secure else {},
                strategy=config,
                codec=self.codec.name,
                privacy=spec["privacy"]["mode"],
            )
            if not await self.coord.send_to(peer, task, self.session_id):
                rnd.failed[peer] = "offline when the round started"
        end = time.monotonic() + spec["round_timeout_s"]
        try:
            if self.secure is not None:
                try:
                    new, contributors = await self.secure.run_round(self._send, self._wait, end)
                finally:  # a sum the coordinator decoded was released, whatever follows
                    self._account_secure_dp(rnd)
            else:
                new, contributors = await self._collect_plain(rnd, end)
            # outliers left out still returned an update: min_participants counts them
            if len(contributors) + len(rnd.excluded) < spec["min_participants"]:
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
        while not rnd.closed(time.monotonic(), end):
            await self._wait(end - time.monotonic())
        self.flush_updates()  # judging and scoring amend the round's rows
        self.coord.uploads_closed(self.session_id, "closed")  # grants of this round lapse
        rnd.cut()  # over-selection: enough arrived; the others are not needed, not failed
        rnd.time_out()
        if not rnd.received:
            raise StateError("no update arrived")
        rnd.phase = RoundPhase.AGGREGATING
        rows = self.rows
        assert rows is not None and self.global_weights is not None
        judged = await asyncio.to_thread(self._judge_updates, rows, sorted(rnd.received))
        self._record_judgement(rnd, judged)
        kept = await self._screen(rnd, rows, sorted(rnd.received))
        if self.dp is not None:  # DP-FedAvg: clipped, uniform, noise on the sum
            new, rnd.next_state = await self._central_dp_aggregate(rnd, rows, kept)
            return new, kept
        examples = {p: rnd.received[p][0].num_examples for p in kept}
        figures = rounds.bound_plan(
            examples,
            {p: rows.norm(p) for p in kept},
            self.coord.ledger.claims(self.session_id),
            self.spec["aggregation"],
        )
        self._record_bounds(rnd, figures)
        new, rnd.next_state = await asyncio.to_thread(self._aggregate, rnd, rows, figures)
        return new, kept

    def _aggregate(
        self, rnd: RoundRun, rows: RoundUpdates, figures: dict[str, dict[str, Any]]
    ) -> tuple[weights.Weights, State]:
        """The next model and strategy state from the kept updates (``figures``' peers),
        bounded as ``figures`` say. The mean family (a strategy whose aggregate is its
        from_mean of the weighted mean: supports_secure) reads the rows a column block at a
        time, O(d); so do the robust strategies (by_columns), given the model in column
        blocks; a strategy of the operator's own gets every update as a model, clipped and
        weighted. Runs in a worker thread."""
        base = self.global_weights
        assert base is not None
        if self.strategy.supports_secure:
            step = rows.weighted_delta({p: f["share"] * f["scale"] for p, f in figures.items()})
            return self.strategy.from_mean(base, rows.model(step), self.strategy_state)
        by_columns = self.strategy.by_columns  # median, Krum, ...: a block of each at a time
        if by_columns:
            model, blocks = rows.by_columns({p: f["scale"] for p, f in figures.items()})
        updates = [
            ClientUpdate(
                p,
                blocks[p]  # type: ignore[arg-type]  # arrays when numpy asks
                if by_columns
                else bounds.scaled_update(rows.weights_of(p), base, f["scale"]),
                rnd.received[p][0].num_examples,
                rnd.received[p][0].loss,
                f["share"],
            )
            for p, f in sorted(figures.items())
        ]
        new, state = self.strategy.aggregate(
            model if by_columns else base, updates, self.strategy_state
        )
        return (rows.from_columns(new) if by_columns else new), state

    # --- central DP (fednode.central_dp, docs/privacy.md) -----------------------------------

    async def _start_central_dp(self) -> None:
        """The session's central-DP settings (σ derived off the event loop: Opacus) and the
        noisy aggregates it released before a restart, which the accountant goes on from."""
        self.dp = await asyncio.to_thread(central_dp.settings, self.spec)
        if self.dp is not None:
            released = await self.coord.guard.run(
                self.coord.ledger.central_dp_rounds, self.session_id
            )
            self._dp_history = [(r["noise_multiplier"], r["sample_rate"]) for r in released]

    async def _central_dp_aggregate(
        self, rnd: RoundRun, rows: RoundUpdates, kept: list[str]
    ) -> tuple[weights.Weights, State]:
        """A plain round's DP-FedAvg: each update clipped to clip_norm, uniform weights,
        N(0, σ²C²) on the sum; the strategy steps from the noisy mean (post-processing).
        The clipped sum is read from the rows a column block at a time."""
        dp, base = self.dp, self.global_weights
        assert dp is not None and base is not None
        norms = {p: rows.norm(p) for p in kept}
        clipped = {p: bounds.clip_scale(norms[p], dp.clip_norm) for p in kept}
        total = await asyncio.to_thread(rows.weighted_delta, clipped)
        mean = await asyncio.to_thread(
            central_dp.noisy_mean_of_sum,
            base,
            rows.split(total),
            len(kept),
            dp.clip_norm,
            dp.noise_multiplier,
            self._dp_rng,
        )
        n = len(kept)
        self._release_central_dp(
            central_dp.Release(
                round=rnd.number,
                noise_multiplier=dp.noise_multiplier,
                planned_noise_multiplier=dp.noise_multiplier,
                clip_norm=dp.clip_norm,
                sample_rate=central_dp.sample_rate(len(rnd.selected), self._dp_eligible),
                selected=len(rnd.selected),
                eligible=self._dp_eligible,
                updates=n,
                noise_std=central_dp.noise_std_on_mean(dp.noise_multiplier, dp.clip_norm, n),
                secure=False,
                share_count=None,
            ),
            norms=norms,
        )
        return await asyncio.to_thread(self.strategy.from_mean, base, mean, self.strategy_state)

    def _account_secure_dp(self, rnd: RoundRun) -> None:
        """A secure central-DP round whose sum was decoded: each of its n inputs carried a
        share sized for m, so the sum's multiplier is σ·sqrt(n/m)."""
        sec, dp = self.secure, self.dp
        if dp is None or sec is None or sec.share_count is None:
            return
        n, m = len(sec.in_sum), sec.share_count
        share = central_dp.share_std(dp.noise_multiplier, dp.clip_norm, m)
        self._release_central_dp(
            central_dp.Release(
                round=rnd.number,
                noise_multiplier=central_dp.effective_multiplier(dp.noise_multiplier, n, m),
                planned_noise_multiplier=dp.noise_multiplier,
                clip_norm=dp.clip_norm,
                sample_rate=central_dp.sample_rate(len(rnd.selected), self._dp_eligible),
                selected=len(rnd.selected),
                eligible=self._dp_eligible,
                updates=n,
                noise_std=share / math.sqrt(n),  # n shares summed, divided by n
                secure=True,
                share_count=m,
            )
        )

    def _release_central_dp(
        self, rel: central_dp.Release, norms: dict[str, float] | None = None
    ) -> None:
        """Account a noisy aggregate (counted when it is formed, published or not) and record
        it: the central_dp_rounds row and the ``central_dp`` event with the session's ε."""
        assert self.dp is not None
        self._dp_history.append((rel.noise_multiplier, rel.sample_rate))
        eps = central_dp.epsilon(self._dp_history, self.dp.delta, self.dp.accountant)
        row = {
            **dataclasses.asdict(rel),
            "epsilon": eps,
            "delta": self.dp.delta,
            "accountant": self.dp.accountant,
        }
        self.coord.guard.write(
            self.coord.ledger.record_central_dp,
            self.session_id,
            {**row, "recorded_at": time.time()},
        )
        self.coord.record("central_dp", self.session_id, {**row, "norms": norms or {}})

    async def _screen(self, rnd: RoundRun, rows: RoundUpdates, peers: list[str]) -> list[str]:
        """Outlier detection (fednode.robustness, spec [robustness]): score every update
        against the round's median update, record the figures and verdicts, leave the
        excluded ones out, and quarantine a peer excluded too often. The peers whose updates
        are aggregated."""
        rob = self.spec["robustness"]
        mode = specmod.detection_mode(self.spec)  # exclude | alert | off
        if mode == "off":
            return peers
        scores = await asyncio.to_thread(
            robustness.score,
            rows.delta_rows(peers),
            robustness.Thresholds.of(rob),
            exclude=mode == "exclude",
            keep=self.strategy.min_updates,  # never fail a Krum round by excluding
        )
        if scores is None:  # too few updates to judge
            return peers
        figures = {p: sc.as_dict() for p, sc in scores.items()}
        rnd.excluded = sorted(p for p, sc in scores.items() if sc.excluded)
        await self.coord.guard.run(
            self.coord.ledger.record_scores, self.session_id, rnd.number, figures
        )
        self.coord.record(
            "robustness",
            self.session_id,
            {
                "round": rnd.number,
                "detection": mode,
                "outliers": sorted(p for p, sc in scores.items() if sc.outlier),
                "excluded": rnd.excluded,
                "scores": figures,
            },
        )
        for peer in rnd.excluded:
            self.coord.record(
                "action",
                self.session_id,
                {
                    "action": "excluded_from_aggregate",
                    "round": rnd.number,
                    "peer_id": peer,
                    "reason": "; ".join(scores[peer].reasons),
                },
                entity_id=peer,
            )
            await self._maybe_quarantine(rnd.number, peer, rob)
        return [p for p in peers if p not in set(rnd.excluded)]

    async def _maybe_quarantine(self, number: int, peer: str, rob: dict[str, Any]) -> None:
        history = await self.coord.guard.run(
            self.coord.ledger.exclusion_history, self.session_id, peer
        )
        after, window = rob["quarantine_after"], rob["quarantine_window"]
        if not robustness.quarantine_due(history, after, window):
            return
        await self.coord.guard.run(
            self.coord.ledger.mark_quarantined, self.session_id, number, peer
        )
        reason = (
            f"its updates were left out of the aggregate as outliers in {after} of its last "
            f"{min(window, len(history))} judged rounds (round {number} the latest); it is not "
            "selected until an operator acknowledges this alert (fedctl alerts ack ID)"
        )
        self.coord.record(
            "action",
            self.session_id,
            {"action": "quarantined", "round": number, "peer_id": peer, "reason": reason},
            entity_id=peer,
        )
        self.coord.raise_alert("quarantined", peer, self.session_id, f"peer quarantined: {reason}")

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
        self.coord.ledger.record_session_claims(self.session_id, examples, time.time())

    def assigned_weights(self, selected: list[str], max_weight: int) -> dict[str, int]:
        """Secure rounds: each selected participant's whole-number weight (rounds.py); 1
        each under central DP (uniform weights bound one participant's share of the sum)."""
        if self.dp is not None:
            return dict.fromkeys(selected, 1)
        claims = self.coord.ledger.claims(self.session_id)
        return rounds.secure_weights(selected, claims, self.spec["aggregation"], max_weight)

    def _judge_updates(
        self, rows: RoundUpdates, peers: list[str]
    ) -> dict[str, tuple[float | None, float]]:
        """Each plain update alone on the validation data (its loss; None when the coordinator
        has no evaluation data: evaluation.on = "participants") and its L2 distance from
        the round's model. Secure rounds cannot do this: the coordinator never holds one
        update. One update's model at a time; runs in a worker thread, so it only computes."""
        mspec = model_spec(self.spec)
        out: dict[str, tuple[float | None, float]] = {}
        for p in peers:
            loss: float | None = None
            if self.eval_data is not None:
                _acc, loss = training.evaluate(mspec, rows.weights_of(p), self.eval_data)
            out[p] = (loss, rows.norm(p))
        return out

    def _record_judgement(
        self, rnd: RoundRun, judged: dict[str, tuple[float | None, float]]
    ) -> None:
        if math.isfinite(self.base_loss):  # else there is nothing to compare against
            for peer, (loss, _) in judged.items():
                if loss is not None:  # no coordinator data: the distances alone judge
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

    async def _complete(
        self,
        rnd: RoundRun,
        new: weights.Weights,
        contributors: list[str],
        extra: dict[str, Any] | None = None,
        notify: list[str] | None = None,
    ) -> bool:
        """Evaluate the candidate; publish and commit it, or reject it. Whether published.
        ``extra``: more figures for its round_completed event (async: the staleness);
        ``notify``: the peers told by ``round_end`` (default: the round's selected)."""
        self.flush_updates()  # the round's outcome reads and counts its updates
        rnd.phase = RoundPhase.EVALUATING
        on = self.evaluation_on
        own: tuple[float, float] | None = None
        own_metrics: dict[str, float] | None = None
        if self.eval_data is not None:  # the coordinator's figures of the candidate
            own_score, own_loss, own_metrics = await self._own_figures(new)
            own = (own_score, own_loss)
        # the participants' figures of the model this round started from (rnd.model_cid)
        reported = rounds.weighted_eval(
            {p: r for p, r in rnd.reports.items() if p in contributors},
            self.coord.ledger.claims(self.session_id),
        )
        acc, loss = rounds.round_figures(on, own, reported)
        figures = rounds.round_metrics(on, own_metrics, reported)
        factor = self.spec["aggregation"]["max_loss_factor"]
        # without coordinator data the verdict checks finiteness only (docs/architecture.md)
        decided = rounds.verdict(new, None if own is None else loss, acc, self.base_loss, factor)
        if not decided.publish:
            self._reject(rnd, decided.reason)
            return False
        parent = self.global_cid
        cid, size = await self._store_model(new)
        state = self.strategy_state if rnd.next_state is None else rnd.next_state
        state_cid = await self._store_state(state)
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
            # who did not return an update; outliers left out returned one (rnd.excluded),
            # spares of an over-selection were not waited for (rnd.not_needed)
            dropped=len(self._dropped(rnd, contributors)),
            bytes_up=rnd.bytes_up,
            bytes_down=rnd.bytes_down,
            state_cid=state_cid,
            # the participants' figures describe the round's input model, not the new one
            evaluated_cid=None if own is not None else rnd.model_cid,
            metrics=figures,
            participant_metrics=None if reported is None else reported.metrics,
        )
        self.strategy_state = state
        rnd.phase = RoundPhase.DONE
        self.rounds_done = rnd.number
        if own is not None:
            self.base_loss = own[1]
        self.coord.monitor.on_round_figures(self.session_id, figures or {}, loss)
        raw_up = self.raw_update_bytes * (len(rnd.received) or len(contributors))
        self.coord.record(
            "round_completed",
            self.session_id,
            {
                "round": rnd.number,
                "accuracy": acc,
                "loss": loss,
                "metrics": figures or {},  # by name, from the evaluation accuracy comes from
                "model_cid": cid,
                "duration_s": now - rnd.started_at,
                "participants": sorted(contributors),
                "dropped": self._dropped(rnd, contributors),
                "excluded": rnd.excluded,  # outliers left out (docs/robustness.md)
                # asked as spares and not waited for ([selection] over_selection); the
                # ledger's task history reads this (Ledger.recent_task_outcomes)
                "not_needed": rnd.not_needed,
                "bytes_up": rnd.bytes_up,
                "bytes_down": rnd.bytes_down,
                # compression (docs/compression.md): the contributors' updates as float32
                # against what the round's uplink carried
                "codec": self.codec.name,
                "bytes_up_raw": raw_up,
                "up_ratio": raw_up / rnd.bytes_up if rnd.bytes_up else None,
                "uploads_peak": rnd.uploads_peak,
                "uploads_waited": rnd.uploads_waited,
                # plain rounds: what the accepted updates took as rows, and where
                # (fednode.round_updates; fednode run --round-ram-mib)
                "updates_held_bytes": self.rows.held_bytes if self.rows is not None else 0,
                "updates_on_disk": self.rows is not None and self.rows.on_disk,
                "evaluation": on,
                "participant_eval": {}
                if reported is None
                else {
                    "examples": reported.examples,
                    "loss": reported.loss,
                    "metrics": reported.metrics,
                    "reports": reported.reports,
                    "model_cid": rnd.model_cid,
                },
                **(extra or {}),
            },
        )
        end = messages.RoundEnd(round=rnd.number, status="completed", model_cid=cid, accuracy=acc)
        for peer in rnd.selected if notify is None else notify:
            await self.coord.send_to(peer, end, self.session_id)
        self.coord.apply(self.coord.monitor.after_round(self, rnd, rnd.anomalous_pct))
        return True

    @staticmethod
    def _dropped(rnd: RoundRun, contributors: list[str]) -> list[str]:
        """Selected peers that did not return an update: not the outliers left out (they
        returned one) nor the spares an over-selection did not wait for."""
        return sorted(set(rnd.dropped) - set(contributors) - set(rnd.excluded))

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
        self.flush_updates()
        self.coord.uploads_closed(self.session_id, status)
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
        self.coord.apply(self.coord.monitor.after_round(self, rnd, None))

    # --- model versions and rollback -----------------------------------------------------

    def _rollback_spec(self) -> dict[str, Any]:
        """The spec's [rollback] table (a spec stored before it existed takes the defaults)."""
        return {**specmod.defaults()["rollback"], **self.spec.get("rollback", {})}

    def _history(self) -> list[tuple[int, float | None]]:
        return [(m["round"], m["accuracy"]) for m in self.coord.ledger.live_models(self.session_id)]

    def _check_divergence(self, number: int) -> None:
        """After a round's version is stored: has the model diverged? Then go back."""
        back = rounds.divergence(self._history(), self._rollback_spec(), number)
        if back is not None:
            self._rollback(
                back.to_round, reason=back.reason, trigger="accuracy", round_=number, by=""
            )

    def _rollback(self, to_round: int, *, reason: str, trigger: str, round_: int, by: str) -> None:
        """Make round ``to_round``'s version the global model again: mark the versions after
        it rolled back, log the "rollback" event and, for a divergence, raise its alert."""
        now = time.time()
        live = {m["round"]: m for m in self.coord.ledger.live_models(self.session_id)}
        target = live.get(to_round)
        if target is None:
            raise StateError(f"round {to_round} has no live model version to go back to")
        blob = self.coord.store.get(target["cid"])
        w = weights.from_bytes(blob, expect=self.shapes)
        self.restore_strategy_state(target.get("state_cid"))  # the state made with that model

        def write() -> None:  # ledger first, then subscribers (kept in order in an outage)
            data = self.coord.ledger.rollback_models(
                self.session_id,
                to_round,
                now=now,
                data={"round": round_, "reason": reason, "trigger": trigger, "by": by},
            )
            self.coord.events.publish("rollback", data, self.session_id)

        self.coord.guard.write(write)
        self.global_cid, self.global_weights, self._global_blob = target["cid"], w, blob
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

    def check_upload(self, peer: str, round_: int) -> None:
        """Whether ``peer`` may ask to upload its update of ``round_`` now (``upload_ready``):
        what an update of that round would be checked for first; ValidationError if not."""
        if self.fedbuff is not None:
            return self.fedbuff.check_upload(peer, round_)
        rounds.check_turn(self.round, self.session_id, peer, round_)

    def note_upload(self, waited: bool, in_flight: int) -> None:
        """An upload was asked for (fednode.uploads): whether it waited, and how many the
        coordinator has granted now; the round's figures keep the most."""
        rnd = self.round  # FedBuff's aggregation open now, too
        if rnd is not None:
            rnd.uploads_peak = max(rnd.uploads_peak, in_flight)
            rnd.uploads_waited += int(waited)

    def on_update(self, peer: str, msg: messages.Update, frame_bytes: int) -> None:
        """Accept or reject one update; raises ValidationError with the reason."""
        if self.fedbuff is not None:
            return self.fedbuff.on_update(peer, msg, frame_bytes)
        rnd = self.round
        now = time.time()
        rounds.check_turn(rnd, self.session_id, peer, msg.round)
        assert rnd is not None
        rnd.bytes_up += frame_bytes
        try:
            w = rounds.check_content(rnd, msg, lambda data: self._decode(rnd, data))
        except ValidationError as err:
            rnd.failed[peer] = f"rejected: {err.message}"
            self._record_update(
                peer, msg, frame_bytes, now, "rejected", f"{err.code}: {err.message}"
            )
            if err.code in CONTENT_REFUSALS:  # bytes it chose and signed: not an accident
                self.coord.record(
                    "security",
                    self.session_id,
                    {"code": err.code, "message": err.message},
                    entity_id=peer,
                )
            self.wake()
            raise
        # the audit copy (store.put says why it need not be fsynced)
        self.coord.guard.write(self.coord.store.put, msg.data, pin=False, durable=False)
        assert self.rows is not None  # a plain round holds its updates as rows
        try:
            self.rows.add(peer, w)
        except OSError as err:  # the coordinator's disk, not the peer's doing
            log.error("round %d: cannot hold the update of %s: %s", rnd.number, peer, err)
            rnd.failed[peer] = f"the coordinator could not hold its update ({err.strerror})"
            self.wake()
            return
        rnd.received[peer] = (dataclasses.replace(msg, data=b""), now)  # the rows hold it
        self._take_report(rnd, peer, msg)
        self._record_update(peer, msg, frame_bytes, now, "accepted", None)
        self._check_budget(peer, msg)
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
                # local DP: the ε it reports having spent in this session (None: no DP)
                "epsilon": msg.dp_epsilon,
            },
            ledger=False,
        )
        self.wake()

    def _decode(self, rnd: RoundRun, data: bytes) -> weights.Weights:
        """An update's weights from its bytes: a delta codec's difference is added to the
        round's model (the codec's decode checked every index, length and scale)."""
        params = CodecParams.of_spec(
            self.compression, round_seed(self.session_id, rnd.number, rnd.model_cid)
        )
        out = self.codec.decode(data, self.shapes, params)
        if not self.codec.on_delta:
            return out
        assert self.global_weights is not None and self.global_cid == rnd.model_cid
        return {k: self.global_weights[k] + v for k, v in out.items()}

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
        row = self.coord.ledger.update_values(
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
            **self._report_columns(msg),
            dp=self._dp_columns(msg),
            **self._size_columns(peer),
        )
        self._queue_update_row(row)

    @property
    def raw_update_bytes(self) -> int:
        """An update as float32 values: what compression ratios are measured against."""
        return 4 * sum(int(np.prod(s)) for s in self.shapes.values())

    def _size_columns(self, peer: str) -> dict[str, int | None]:
        """The ledger's compression figures of a peer's update in the current round: its
        size as float32 values, and what this coordinator sent it of the round's model."""
        assert self.round is not None
        return {
            "bytes_raw": self.raw_update_bytes,
            "down_bytes": self.round.down.get(peer),
            "down_raw": len(self._global_blob) if self._global_blob else None,
        }

    @staticmethod
    def _dp_columns(msg: messages.Update | messages.SecaggMasked) -> dict[str, Any] | None:
        """The ledger's dp_* columns of an update's local-DP figures (None without them)."""
        if msg.dp_epsilon is None:
            return None
        return {k: getattr(msg, k) for k in (*messages.DP_FIELDS, "dp_accountant")}

    def _check_budget(self, peer: str, msg: messages.Update | messages.SecaggMasked) -> None:
        """A privacy_budget alert once a participant reports having spent at least
        fednode.dpsgd.BUDGET_WARNING_SHARE of the --max-epsilon it reports."""
        spent, most = msg.dp_spent_epsilon, msg.dp_max_epsilon
        if spent is None or not most or spent < BUDGET_WARNING_SHARE * most:
            return
        self.coord.raise_alert(
            "privacy_budget",
            peer,
            self.session_id,
            f"{peer} has spent ε = {spent:.3f} of its --max-epsilon {most:g} "
            f"({100 * spent / most:.0f} %) on its data after round {msg.round}; it declines "
            "rounds that would pass it",
        )

    def _take_report(
        self, rnd: RoundRun, peer: str, msg: messages.Update | messages.SecaggMasked
    ) -> None:
        """Keep an accepted update's evaluation report for the round's figures, when the
        spec asks participants to evaluate (one sent unasked is recorded, not used)."""
        report = rounds.report_of(msg)
        if report is not None and rounds.participants_evaluate(self.evaluation_on):
            rnd.reports[peer] = report

    @staticmethod
    def _report_columns(msg: messages.Update | messages.SecaggMasked) -> dict[str, Any]:
        """The ledger's eval_* columns of an update's report (all None without one)."""
        if rounds.report_of(msg) is None:
            return {}
        return {
            "eval_examples": msg.eval_examples,
            "eval_loss": msg.eval_loss,
            "eval_metrics": msg.eval_metrics,
        }

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
        row = self.coord.ledger.update_values(
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
            **self._report_columns(msg),
            dp=self._dp_columns(msg),
            **self._size_columns(peer),
        )
        self._queue_update_row(row)
        self._check_budget(peer, msg)
        self._take_report(self.round, peer, msg)
        self.coord.monitor.on_update(peer, self.session_id, now, msg)

    def on_task_error(self, peer: str, msg: messages.TaskError) -> None:
        """A selected participant could not produce its update (it declined the task, its
        training failed or diverged, its deadline passed): recorded, and the round stops
        waiting for it at once instead of at the timeout."""
        if self.fedbuff is not None:
            return self.fedbuff.on_task_error(peer, msg)
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
        self.coord.monitor.on_task_error(peer, self.session_id, msg.round, msg.code)
        self.on_peer_lost(peer, f"task error {msg.code}: {msg.message}")

    def on_refused_update(self, peer: str, frame_type: str, err: FednodeError) -> None:
        """A selected participant's answer was refused before it could be parsed (invalid
        fields, too large): recorded like a task error, and the round stops waiting for it."""
        if self.fedbuff is not None:
            return self.fedbuff.on_refused_update(peer, frame_type, err)
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
        if self.fedbuff is not None:
            self.fedbuff.on_peer_lost(peer)
        if self.secure is not None:
            self.secure.on_peer_lost(peer)
        rnd = self.round
        if rnd is not None and rnd.phase == RoundPhase.TRAINING and peer in rnd.outstanding:
            rnd.failed[peer] = reason
        self.wake()

    def on_bytes_down(self, n: int, peer: str = "") -> None:
        if self.round is not None and self.round.phase == RoundPhase.TRAINING:
            self.round.bytes_down += n
            if peer:
                self.round.down[peer] = self.round.down.get(peer, 0) + n
