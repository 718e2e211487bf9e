"""The session's driver in ``[aggregation] mode = "async"`` (FedBuff): the I/O shell.

What differs from a synchronous round (fednode.session ``_one_round``): nobody waits for a
cohort. The driver keeps ``concurrency`` participants training, each on the model version
that was current when it was given its task (a ``round_start`` with the number of the
aggregation then open); an accepted update goes into the buffer with the version it was
trained from; every ``buffer_size`` updates the pure step (fednode.fedbuff) makes the next
version, which is published exactly as a synchronous round's model (fednode.session
``_complete``: the coordinator's evaluation and verdict, the ledger's round row and model
version in one transaction, ``round_completed`` with the staleness figures). The peer that
answered is given a new task at once (with ``concurrency`` below the participants, the one
that waited longest goes first). A participant takes one task at a time: it is never sent a
second one while its first is outstanding, and its ``BUSY`` answer (still training a task
the coordinator gave up on) puts it back in line after ``BUSY_BACKOFF_S``.

The ledger keeps one round row per aggregation (``rounds`` counts them): ``selected`` lists
the peers training when it opened, its updates (``client_updates``) are those it
aggregated, refusals are filed under the aggregation open when they arrived.

Each update is checked as a synchronous round checks it (``rounds.check_content``: the model
it names is the one its task sent, the bytes hash to the CID, the codec decodes them) plus
its staleness (``fedbuff.check_staleness``: TOO_STALE); its weight and step are bounded as
fednode.bounds bounds a round's (``fedbuff.step``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from fednode import fedbuff, rounds, versions, weights
from fednode.codecs import CodecParams, round_seed
from fednode.rounds import RoundRun
from protocol import messages
from protocol.errors import FednodeError, StateError, ValidationError
from protocol.lifecycle import RoundPhase, SessionState

#: A participant that answered BUSY (still training a task the coordinator gave up on) is
#: not given a task again before this many seconds.
BUSY_BACKOFF_S = 1.0
#: After any other task error, so that a participant that declines every task (its limits)
#: is not asked again in a tight loop.
ERROR_BACKOFF_S = 2.0


#: Of each aggregated update, what the round_completed event keeps under ``staleness``.
STALENESS_FIGURES = ("participant", "trained_on", "staleness", "staleness_weight")


@dataclass(frozen=True)
class Task:
    """A task in flight: what the peer was sent, and until when it is waited for."""

    round: int  # the aggregation open when it was sent: the round_start's and update's round
    version: int  # the model version it trains from (fedbuff's staleness counts from it)
    model_cid: str
    deadline: float  # monotonic


class AsyncRound:
    # ``run`` is the fednode.session.SessionRun that owns this driver; it is typed Any
    # because naming it here would be an import cycle (tests/test_imports.py)
    def __init__(self, run: Any) -> None:
        self.run = run
        agg = run.spec["aggregation"]
        self.settings = fedbuff.Settings.of(agg)
        self.concurrency = int(agg["concurrency"])
        self.buffer = fedbuff.Buffer(self.settings.buffer_size)
        self.version = -1  # set from the current model when the driver starts
        self.bases: dict[int, tuple[str, weights.Weights]] = {}  # version -> (cid, model)
        self.tasks: dict[str, Task] = {}
        self.last_task: dict[str, float] = {}  # monotonic time of each peer's last task
        self.backoff: dict[str, float] = {}  # peer -> no task before this monotonic time
        self._claimed: set[str] = set()
        self._last_accepted = 0.0

    # --- the driver ---------------------------------------------------------------------

    async def run_session(self) -> None:
        """Aggregate until ``rounds`` versions are made (a rejected or failed one counts, as
        a synchronous round does). Pause takes effect between aggregations: the tasks in
        flight finish and their updates wait in the buffer; no new task is given."""
        run = self.run
        run._regather = None  # a restarted async session does not wait for a cohort
        while run.rounds_done < run.spec["rounds"]:
            while run.state == SessionState.PAUSED:
                run._idle = True
                try:
                    await run._wait(None)
                finally:
                    run._idle = False
            run._apply_pending_rollback()
            self._sync_version()
            await self._aggregation(run.rounds_done + 1)

    def _sync_version(self) -> None:
        """Follow the session's current model: a rollback (or the start) makes it a new
        version with no older ones to apply deltas to (updates trained on the abandoned
        lineage are refused)."""
        run = self.run
        assert run.global_weights is not None
        current = self.bases.get(self.version)
        if current is None or current[0] != run.global_cid:
            self.version = max(self.version + 1, run.rounds_done)
            self.bases = {self.version: (run.global_cid, run.global_weights)}

    async def _aggregation(self, number: int) -> None:
        run, spec = self.run, self.run.spec
        rnd = run.round = RoundRun(number, run.global_cid, sorted(self.tasks), time.time())
        await run.coord.guard.run(
            run.coord.ledger.start_round,
            run.session_id,
            number,
            selected=rnd.selected,
            model_cid_in=run.global_cid,
            started_at=rnd.started_at,
        )
        run.coord.record(
            "round_started",
            run.session_id,
            {
                "round": number,
                "selected": rnd.selected,
                "model_cid": run.global_cid,
                "started_at": rnd.started_at,
                "deadline_s": spec["round_timeout_s"],
                "mode": "async",
                "buffer_size": self.settings.buffer_size,
                "buffered": len(self.buffer),
            },
        )
        rnd.phase = RoundPhase.TRAINING
        self._last_accepted = time.monotonic()
        starved_since: float | None = None
        try:
            while True:
                now = time.monotonic()
                self._expire(now)
                if self.buffer.full:
                    taken, stale = fedbuff.split_stale(
                        self.buffer.take(), self.version, self.settings.max_staleness
                    )
                    for e, err in stale:
                        self._record_entry(rnd, e, "rejected", f"{err.code}: {err.message}")
                    if taken:
                        break
                    continue
                await self._dispatch(rnd)
                if not self.tasks:
                    starved_since = now if starved_since is None else starved_since
                    if now - starved_since >= spec["wait_participants_s"]:
                        raise StateError(
                            f"no participant could be given a task for "
                            f"{spec['wait_participants_s']:.0f} s (fewer than min_participants "
                            f"= {spec['min_participants']} admitted participants online)",
                            hint="start more participants, or lower min_participants",
                        )
                else:
                    starved_since = None
                if now - self._last_accepted >= spec["round_timeout_s"]:
                    raise StateError(
                        f"{len(self.buffer)} of buffer_size = {self.settings.buffer_size} "
                        f"updates arrived, none in the last round_timeout_s = "
                        f"{spec['round_timeout_s']:g} s"
                    )
                await run._wait(self._next_event(now, starved_since) - now)
            new, step = await self._aggregate(rnd, taken)
        except FednodeError as err:
            rnd.selected = sorted(set(rnd.selected))
            run._finish_round_failed("failed", err.message)
            if spec["on_round_failure"] == "continue":
                run.rounds_done = number
                return
            raise StateError(f"aggregation {number} failed: {err.message}") from None
        contributors = sorted({e.peer for e in taken})
        rnd.selected = contributors  # who this version is made of (round_end goes to them)
        if not versions.is_finite(new):
            run._reject(rnd, "the aggregate has non-finite weights (NaN or inf)")
            return
        stale = step.staleness
        extra = {
            "mode": "async",
            "updates": len(taken),
            "staleness": {
                **fedbuff.summary(stale),
                "updates": [{k: f[k] for k in STALENESS_FIGURES} for f in step.figures],
            },
        }
        # A contributor given its next task while this aggregation was open holds a task of
        # the same number: a round_end of it would stop that task as not needed (fednode.
        # participant), and the peer would sit out until the task's deadline. Not told.
        training = {p for p, t in self.tasks.items() if t.round == number}
        told = [p for p in contributors if p not in training]
        if await run._complete(rnd, new, contributors, extra=extra, notify=told):
            self.version += 1
            assert run.global_weights is not None
            self.bases[self.version] = (run.global_cid, run.global_weights)
            oldest = self.version - self.settings.max_staleness
            self.bases = {v: b for v, b in self.bases.items() if v >= oldest}
            run._check_divergence(number)

    def _next_event(self, now: float, starved_since: float | None) -> float:
        """When the driver must look again without being woken: a task's deadline, a
        backoff's end, the aggregation's or the starvation's limit."""
        spec = self.run.spec
        times = [self._last_accepted + spec["round_timeout_s"]]
        times += [t.deadline for t in self.tasks.values()]
        times += [t for t in self.backoff.values() if t > now]
        if starved_since is not None:
            times.append(starved_since + spec["wait_participants_s"])
        return max(now + 0.01, min(times))

    def _expire(self, now: float) -> None:
        """Tasks past their deadline are given up: the peer may have a new one (it answers
        BUSY while it still trains the old one)."""
        for peer, task in list(self.tasks.items()):
            if now >= task.deadline:
                del self.tasks[peer]
                self._task_failed(peer, task.round, "TIMEOUT", "no update before round_timeout_s")

    async def _dispatch(self, rnd: RoundRun) -> None:
        """Give idle eligible peers a task, up to ``concurrency`` in flight."""
        run, spec = self.run, self.run.spec
        # paused: the aggregation in flight is still made (as a synchronous round in flight
        # completes); no task is given between aggregations (run_session waits)
        if run.state not in (SessionState.RUNNING, SessionState.PAUSED):
            return
        eligible = run._eligible()
        if len(eligible) < spec["min_participants"] and not self.tasks:
            return  # the session starts, or goes on, with min_participants online
        now = time.monotonic()
        idle = [p for p in eligible if p not in self.tasks and self.backoff.get(p, 0.0) <= now]
        cap = self.concurrency or len(eligible)
        chosen = fedbuff.pick(idle, self.last_task, cap - len(self.tasks))
        if not chosen:
            return
        new = [p for p in chosen if p not in self._claimed]
        if new:  # what each registered is the most its weight may count in this session
            await run.coord.guard.run(
                run._record_claims, {p: run.coord.registered_examples(p) for p in new}
            )
            self._claimed |= set(new)
        config = run.strategy.round_config(rnd.number, spec)
        for peer in chosen:
            task = Task(rnd.number, self.version, run.global_cid, now + spec["round_timeout_s"])
            self.tasks[peer] = task
            self.last_task[peer] = now
            if peer not in rnd.selected:
                rnd.selected.append(peer)
            msg = messages.RoundStart(
                round=rnd.number,
                model_cid=task.model_cid,
                spec=spec,
                deadline_s=spec["round_timeout_s"],
                strategy=config,
                codec=run.codec.name,
                privacy=spec["privacy"]["mode"],
            )
            sent = await run.coord.send_to(peer, msg, run.session_id)
            if not sent and self.tasks.get(peer) is task:
                del self.tasks[peer]

    async def _aggregate(
        self, rnd: RoundRun, taken: list[fedbuff.Entry]
    ) -> tuple[weights.Weights, fedbuff.Step]:
        run = self.run
        rnd.phase = RoundPhase.AGGREGATING
        assert run.global_weights is not None
        claims = run.coord.ledger.claims(run.session_id)
        step = await asyncio.to_thread(
            fedbuff.step, run.global_weights, self.version, taken, claims, self.settings
        )
        for e, fig in zip(taken, step.figures, strict=True):
            self._record_entry(rnd, e, "accepted", None)
            msg, _size, arrived = e.note  # type: ignore[misc]
            # filed under this aggregation: the monitor counts the tasks of the round's peers
            msg = dataclasses.replace(msg, round=rnd.number)
            rnd.received[e.peer] = (msg, arrived)
            run.coord.monitor.on_update(e.peer, run.session_id, arrived, msg)
            fig.pop("participant", None)
        keyed: dict[str, dict[str, Any]] = {}
        for e, fig in zip(taken, step.figures, strict=True):
            key, k = e.peer, 1
            while key in keyed:  # a fast peer with two updates in one buffer
                k += 1
                key = f"{e.peer}#{k}"
            keyed[key] = fig
        run._record_bounds(rnd, keyed)
        for e, fig in zip(taken, step.figures, strict=True):
            fig["participant"] = e.peer
        return step.weights, step

    def _record_entry(
        self, rnd: RoundRun, e: fedbuff.Entry, status: str, reason: str | None
    ) -> None:
        """The ledger row of a buffered update, under the aggregation that took it."""
        msg, size, arrived = e.note  # type: ignore[misc]
        self.run._record_update(
            e.peer, dataclasses.replace(msg, round=rnd.number), size, arrived, status, reason
        )

    # --- input from participants (SessionRun forwards these in async mode) --------------

    def check_upload(self, peer: str, round_: int) -> None:
        """An ``upload_ready`` is checked as its update will be (``_task_for``)."""
        self._task_for(peer, round_)

    def _task_for(self, peer: str, round_: int) -> Task:
        """The task ``peer`` answers with round ``round_``: in flight, of that round, while
        the session runs; ValidationError STALE_UPDATE otherwise."""
        run = self.run
        task = self.tasks.get(peer)
        if run.state not in (SessionState.RUNNING, SessionState.PAUSED) or task is None:
            raise ValidationError(
                f"update for round {round_}, but {peer} has no task in flight in session "
                f"{run.session_id}",
                code="STALE_UPDATE",
            )
        if round_ != task.round:
            raise ValidationError(
                f"update for round {round_}, but {peer}'s task is of round {task.round}",
                code="STALE_UPDATE",
            )
        return task

    def on_update(self, peer: str, msg: messages.Update, frame_bytes: int) -> None:
        run = self.run
        task = self._task_for(peer, msg.round)
        del self.tasks[peer]
        now = time.time()
        rnd = run.round
        if rnd is not None:
            rnd.bytes_up += frame_bytes
        base = self.bases.get(task.version)
        try:
            if base is None or base[0] != task.model_cid:
                raise ValidationError(
                    f"update trained on {task.model_cid}, a model version the session rolled "
                    "back or no longer keeps",
                    code="TOO_STALE",
                )
            fedbuff.check_staleness(self.version - task.version, self.settings.max_staleness)
            view = RoundRun(task.round, task.model_cid, [peer], 0.0)
            w = rounds.check_content(view, msg, lambda data: self._decode(task, base[1], data))
        except ValidationError as err:
            self._refuse(peer, msg, frame_bytes, now, err)
            raise
        run.coord.guard.write(run.coord.store.put, msg.data, pin=False, durable=False)
        delta = {k: w[k] - base[1][k] for k in base[1]}
        kept = dataclasses.replace(msg, data=b"")
        self.buffer.add(
            fedbuff.Entry(
                peer,
                delta,
                msg.num_examples,
                task.version,
                msg.loss,
                note=(kept, frame_bytes, now),
            )
        )
        self._last_accepted = time.monotonic()
        run._check_budget(peer, msg)
        run.coord.record(
            "update_received",
            run.session_id,
            {
                "round": rnd.number if rnd is not None else msg.round,
                "participant": peer,
                "samples": msg.num_examples,
                "loss": msg.loss,
                "train_s": msg.train_s,
                "bytes": frame_bytes,
                "received": len(self.buffer),
                "selected": self.settings.buffer_size,
                "epsilon": msg.dp_epsilon,
                "trained_on": task.version,
                "staleness": self.version - task.version,
            },
            ledger=False,
        )
        run.wake()

    def _refuse(
        self, peer: str, msg: messages.Update, size: int, now: float, err: ValidationError
    ) -> None:
        run = self.run
        number = run.round.number if run.round is not None else msg.round
        run._record_update(
            peer,
            dataclasses.replace(msg, round=number, data=b""),
            size,
            now,
            "rejected",
            f"{err.code}: {err.message}",
        )
        if err.code in rounds.CONTENT_REFUSALS:  # bytes it chose and signed: not an accident
            run.coord.record(
                "security",
                run.session_id,
                {"code": err.code, "message": err.message},
                entity_id=peer,
            )
        run.wake()

    def _decode(self, task: Task, base: weights.Weights, data: bytes) -> weights.Weights:
        """An update's weights: a delta codec's difference is added to the task's model."""
        run = self.run
        params = CodecParams.of_spec(
            run.compression, round_seed(run.session_id, task.round, task.model_cid)
        )
        out = run.codec.decode(data, run.shapes, params)
        if not run.codec.on_delta:
            return out
        return {k: base[k] + v for k, v in out.items()}

    def on_task_error(self, peer: str, msg: messages.TaskError) -> None:
        task = self.tasks.get(peer)
        if task is None or msg.round != task.round:
            raise ValidationError(
                f"task error for round {msg.round}, but {peer} has no task of that round in "
                f"session {self.run.session_id}",
                code="STALE_UPDATE",
            )
        del self.tasks[peer]
        self._task_failed(peer, msg.round, msg.code, msg.message)

    def on_refused_update(self, peer: str, frame_type: str, err: FednodeError) -> None:
        task = self.tasks.pop(peer, None)
        if task is not None:
            self._task_failed(
                peer, task.round, err.code, f"its {frame_type} was refused: {err.message}"
            )

    def on_peer_lost(self, peer: str) -> None:
        self.tasks.pop(peer, None)
        self.run.wake()

    def _task_failed(self, peer: str, round_: int, code: str, message: str) -> None:
        run = self.run
        run.coord.record(
            "task_error",
            run.session_id,
            {"round": round_, "peer_id": peer, "code": code, "message": message},
            entity_id=peer,
        )
        run.coord.monitor.on_task_error(peer, run.session_id, round_, code)
        wait = BUSY_BACKOFF_S if code == "BUSY" else ERROR_BACKOFF_S
        self.backoff[peer] = time.monotonic() + wait
        run.wake()
