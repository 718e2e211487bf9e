"""The participant node: joins a coordinator, takes training tasks, uploads updates.

Raw data never leaves this process: what goes out is the trained weights (safetensors) and
a few numbers (examples, loss, time). The global model is fetched by CID and its hash is
checked before it is parsed; a model whose bytes do not match is refused. The connection is
kept up with heartbeats and re-dialled with backoff if it drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from typing import Any

import psutil
import torch
from websockets.exceptions import ConnectionClosed

from fednode import __version__, quality, training, weights
from fednode.data import DatasetRef, load_partition
from fednode.ledger import Ledger
from fednode.session import model_spec
from fednode.store import BlockStore
from fednode.transport import Connection, dial
from protocol import messages, secagg, spec
from protocol.cid import file_cid
from protocol.errors import CIDError, FednodeError
from protocol.identity import Identity
from protocol.rotation import Rotation

log = logging.getLogger("fednode.participant")
FETCH_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 10.0
ADMIT_TIMEOUT_S = 30.0
# --poison-round: the factor a poisoned update's weights are multiplied by. Negative, because
# a ReLU network scaled by a positive factor keeps most of its predictions; this one does not.
POISON_FACTOR = -10.0


# The data as loaded, before any session's features or partition: what the checks look at.
_AS_LOADED = {"partition": "iid", "seed": 0, "features": "none", "alpha": 0.5, "labels_per_part": 2}


def _timed_train(
    mspec: dict[str, Any], w: weights.Weights, data: Any, cfg: training.TrainConfig
) -> tuple[training.TrainResult, float]:
    """Train in a worker thread and return the CPU time that thread spent."""
    start = time.thread_time()
    result = training.train(mspec, w, data, cfg)
    return result, time.thread_time() - start


def shuffle_seed(session_seed: int, round_: int, peer_id: str) -> int:
    """Each participant's minibatch order: reproducible, and different between participants."""
    digest = hashlib.sha256(f"{session_seed}/{round_}/{peer_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class Participant:
    def __init__(
        self,
        identity: Identity,
        ledger: Ledger,
        store: BlockStore,
        *,
        url: str,
        coordinator_id: str,
        dataset: DatasetRef,
        join_token: str = "",
        train_delay_s: float = 0.0,
        poison_round: int = 0,
        chain: list[Rotation] | None = None,
    ):
        self.chain = chain or []
        self.identity = identity
        self.ledger = ledger
        self.store = store
        self.url = url
        self.coordinator_id = coordinator_id
        self.dataset = dataset
        self.join_token = join_token
        self.train_delay_s = train_delay_s  # a test option: a deliberately slow participant
        self.poison_round = poison_round  # a test option: this round's update diverges
        self._fetches: dict[str, asyncio.Future[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._data_cache: dict[tuple[Any, ...], Any] = {}
        self._secagg_inbox: asyncio.Queue[messages.Message] = asyncio.Queue()
        self._proc = psutil.Process()
        self._cpu_efficiency: float | None = None  # of the last training, for heartbeats
        self._fetched: dict[str, tuple[int, float]] = {}  # cid -> (bytes, seconds) downloaded
        self.data_report: dict[str, Any] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; re-dial with backoff on failures."""
        # Load the data and warm torch before joining, so round 1 measures training only.
        await asyncio.to_thread(training.warm_up)
        self.num_examples = await asyncio.to_thread(self._num_examples)
        base = self._load_data(_AS_LOADED)
        self.data_report = await asyncio.to_thread(quality.data_report, base.x, base.y)
        backoff = 0.5
        while not stop.is_set():
            try:
                conn = await dial(self.url, self.identity, self.coordinator_id, chain=self.chain)
                if conn.peer_id != self.coordinator_id:
                    log.warning(
                        "coordinator %s rotated its key; it is now %s (update --coordinator-id)",
                        self.coordinator_id,
                        conn.peer_id,
                    )
            except FednodeError as err:
                if err.code == "PEER_MISMATCH":
                    raise  # retrying cannot turn this node into the coordinator we named
                log.warning("cannot join %s: %s", self.url, err.message)
            else:
                refusal = await self._connected(conn, stop)
                if stop.is_set():
                    return
                if refusal is not None and refusal.code.startswith("TOKEN_"):
                    raise refusal  # an expired, forged or used-up invite will not heal
                if refusal is not None:  # not admitted yet: the operator may list us later
                    log.warning("not admitted: %s; retrying in %.0f s", refusal.message, backoff)
                else:
                    backoff = 0.5
                    log.warning("lost the coordinator; reconnecting")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _connected(self, conn: Connection, stop: asyncio.Event) -> FednodeError | None:
        """Serve one connection until it ends; the coordinator's refusal, if it refused."""
        serve = asyncio.create_task(self._serve(conn))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({serve, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not serve.done():
            await conn.close(1001, "participant shutting down")
        try:
            return await serve
        except (asyncio.CancelledError, ConnectionClosed):
            return None
        except Exception:  # a bug must not take the node down; log it, re-dial
            log.exception("participant loop crashed; reconnecting")
            return None

    def _num_examples(self) -> int:
        return len(self._load_data(_AS_LOADED))

    def _load_data(self, data_spec: dict[str, Any]) -> Any:
        key = (
            data_spec["features"],
            data_spec["partition"],
            data_spec["seed"],
            data_spec["alpha"],
            data_spec["labels_per_part"],
        )
        if key not in self._data_cache:
            self._data_cache[key] = load_partition(
                self.dataset,
                features=data_spec["features"],
                partition=data_spec["partition"],
                seed=data_spec["seed"],
                alpha=data_spec["alpha"],
                labels_per_part=data_spec["labels_per_part"],
            )
        return self._data_cache[key]

    async def _serve(self, conn: Connection) -> FednodeError | None:
        await conn.send(
            messages.Register(
                dataset=str(self.dataset),
                num_examples=self.num_examples,
                version=__version__,
                join_token=self.join_token,
                data_report=self.data_report,
            )
        )
        try:
            _env, first = await asyncio.wait_for(conn.recv(), ADMIT_TIMEOUT_S)
        except TimeoutError:
            return FednodeError(
                "the coordinator did not answer the registration", code="NOT_ADMITTED"
            )
        if isinstance(first, messages.Error):
            return FednodeError(first.message, code=first.code, hint=first.hint)
        if not isinstance(first, messages.Admitted):
            return FednodeError(f"expected 'admitted', got {first.TYPE!r}", code="NOT_ADMITTED")
        assert conn.welcome is not None
        beat = asyncio.create_task(self._heartbeat(conn, conn.welcome.heartbeat_s))
        self.ledger.append_event(
            "joined",
            entity_id=conn.peer_id,
            data={"url": self.url, "dataset": str(self.dataset), "sessions": first.sessions},
        )
        try:
            async for env, msg in conn.messages():
                if isinstance(msg, messages.RoundStart):
                    if self._task is not None and not self._task.done():
                        await conn.send(
                            messages.TaskError(
                                round=msg.round,
                                code="BUSY",
                                message="still training the previous round",
                            ),
                            env.session,
                        )
                        continue
                    self._task = asyncio.create_task(self._do_round(conn, env.session, msg))
                elif isinstance(msg, messages.SECAGG_TO_PARTICIPANT):
                    self._secagg_inbox.put_nowait(msg)
                elif isinstance(msg, messages.Block):
                    fut = self._fetches.pop(msg.cid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.data)
                elif isinstance(msg, messages.Error):
                    log.warning("coordinator says %s: %s", msg.code, msg.message)
                    for fut in self._fetches.values():
                        if not fut.done():
                            fut.set_exception(FednodeError(msg.message, code=msg.code))
                elif isinstance(msg, messages.RoundEnd | messages.SessionEnd):
                    self.ledger.append_event(
                        msg.TYPE, session_id=env.session, data=messages.payload(msg)
                    )
        finally:
            beat.cancel()
            if self._task is not None:
                self._task.cancel()
        return None

    async def _heartbeat(self, conn: Connection, every: float) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(every)
                busy = self._task is not None and not self._task.done()
                await conn.send(
                    messages.Heartbeat(
                        status="training" if busy else "idle",
                        ts=time.time(),
                        cpu_efficiency=self._cpu_efficiency,
                        memory_efficiency=self._memory_efficiency(),
                    )
                )

    def _memory_efficiency(self) -> float | None:
        """100 minus this process' share of the machine's memory (docs/quality.md)."""
        try:
            return max(0.0, min(100.0, 100.0 - float(self._proc.memory_percent())))
        except psutil.Error:
            return None

    async def _fetch(
        self, conn: Connection, session: str, cid: str, via: str = "coordinator"
    ) -> bytes:
        """The model by CID, every block verified: from the local store if present, from
        this node's IPFS daemon when the spec says ``model.fetch = "ipfs"``, else (or when the
        daemon cannot give it) from the coordinator."""
        from fednode.ipfs import IpfsStore

        on_ipfs = isinstance(self.store, IpfsStore)
        if via == "ipfs" and not on_ipfs:
            log.warning(
                "the session fetches models from IPFS, but this node runs without --ipfs-api: "
                "fetching %s from the coordinator",
                cid,
            )
        if via == "ipfs" and on_ipfs:
            started = time.perf_counter()
            try:  # the daemon finds the blocks (locally or from its peers); each is re-hashed here
                data = await asyncio.to_thread(self.store.get, cid)
            except FednodeError as err:
                log.warning(
                    "IPFS did not give model %s (%s: %s): fetching it from the coordinator",
                    cid,
                    err.code,
                    err.message,
                )
            else:
                self._fetched[cid] = (len(data), time.perf_counter() - started)
                return data
        elif await asyncio.to_thread(self.store.has, cid):
            return await asyncio.to_thread(self.store.get, cid)  # verified block by block
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._fetches[cid] = fut
        started = time.perf_counter()
        await conn.send(messages.Fetch(cid=cid), session)
        try:
            data = await asyncio.wait_for(fut, FETCH_TIMEOUT_S)
        except TimeoutError:
            raise FednodeError(
                f"the coordinator sent no block {cid} within {FETCH_TIMEOUT_S:.0f} s",
                code="FETCH_TIMEOUT",
            ) from None
        took = time.perf_counter() - started
        if file_cid(data) != cid:
            raise CIDError(f"model bytes from the coordinator do not hash to {cid}")
        self._fetched[cid] = (len(data), took)  # reported with the update: bandwidth
        await asyncio.to_thread(self.store.put, data, pin=False)
        return data

    async def _train(
        self, conn: Connection, session: str, task: messages.RoundStart, s: dict[str, Any]
    ) -> training.TrainResult:
        """Fetch the round's model by CID, train on the local data, return the result."""
        blob = await self._fetch(conn, session, task.model_cid, s["model"]["fetch"])
        mspec = model_spec(s)
        global_w = weights.from_bytes(blob, expect=training.expected_shapes(mspec))
        data = await asyncio.to_thread(self._load_data, s["data"])
        t = s["training"]
        cfg = training.TrainConfig(
            local_epochs=t["local_epochs"],
            batch_size=t["batch_size"],
            lr=t["lr"],
            optimizer=t["optimizer"],
            momentum=t["momentum"],
            weight_decay=t["weight_decay"],
            seed=shuffle_seed(s["data"]["seed"], task.round, self.identity.peer_id),
        )
        wall0, proc0 = time.perf_counter(), self._proc.cpu_times()
        if self.train_delay_s:  # a test option: the delay counts as (slow) training time
            await asyncio.sleep(self.train_delay_s)
        result, thread_cpu = await asyncio.to_thread(_timed_train, mspec, global_w, data, cfg)
        wall, proc1 = time.perf_counter() - wall0, self._proc.cpu_times()
        threads = torch.get_num_threads()
        # One torch thread computes in the calling thread, whose CPU clock is precise; with a
        # pool, the process' times (10 ms ticks) are the only ones that see every thread.
        cpu = (
            thread_cpu
            if threads == 1
            else ((proc1.user - proc0.user) + (proc1.system - proc0.system))
        )
        if wall > 0:
            self._cpu_efficiency = min(100.0, 100.0 * cpu / (wall * threads))
        return dataclasses.replace(result, duration_s=wall)

    async def _do_round(self, conn: Connection, session: str, task: messages.RoundStart) -> None:
        started = time.time()
        # What the coordinator asked of this node, in its own ledger, before doing any of it.
        task_id = self.ledger.record_task_start(
            session,
            task.round,
            coordinator=conn.peer_id,
            model_cid=task.model_cid,
            deadline_s=task.deadline_s,
            secure=bool(task.secagg),
            asked_at=started,
        )
        try:
            s = spec.validate(task.spec)
            if task.secagg:
                result, sent = await self._secure_round(conn, session, task, s)
            else:
                result = await self._train(conn, session, task, s)
                if task.round == self.poison_round:  # the test option: a diverging update
                    poisoned = {k: v * POISON_FACTOR for k, v in result.weights.items()}
                    result = dataclasses.replace(result, weights=poisoned)
                out = weights.to_bytes(result.weights)
                sent = await conn.send(
                    messages.Update(
                        round=task.round,
                        base_cid=task.model_cid,
                        num_examples=result.num_examples,
                        loss=result.loss,
                        train_s=result.duration_s,
                        update_cid=file_cid(out),
                        data=out,
                        fetch_bytes=self._fetched.get(task.model_cid, (0, 0.0))[0],
                        fetch_s=self._fetched.get(task.model_cid, (0, 0.0))[1],
                        cpu_efficiency=self._cpu_efficiency,
                        memory_efficiency=self._memory_efficiency(),
                    ),
                    session,
                )
            # The participant keeps its own update: its data, its audit trail.
            own_cid = self.store.put(weights.to_bytes(result.weights), pin=False)
            self.ledger.append_event(
                "task_done",
                session_id=session,
                data={
                    "round": task.round,
                    "model_cid": task.model_cid,
                    "update_cid": own_cid,
                    "secure": bool(task.secagg),
                    "samples": result.num_examples,
                    "loss": result.loss,
                    "train_s": result.duration_s,
                    "bytes_up": sent,
                    "total_s": time.time() - started,
                },
            )
            self.ledger.finish_task(
                task_id,
                status="done",
                finished_at=time.time(),
                train_s=result.duration_s,
                total_s=time.time() - started,
                samples=result.num_examples,
                loss=result.loss if math.isfinite(result.loss) else None,
                bytes_up=sent,
                bytes_down=self._fetched.pop(task.model_cid, (0, 0.0))[0],
            )
        except FednodeError as err:
            log.error("round %d failed here: %s", task.round, err.message)
            self.ledger.append_event(
                "task_failed",
                session_id=session,
                data={"round": task.round, "code": err.code, "message": err.message},
            )
            self.ledger.finish_task(
                task_id,
                status="failed",
                finished_at=time.time(),
                total_s=time.time() - started,
                error=f"{err.code}: {err.message}",
            )
            with contextlib.suppress(ConnectionClosed):
                await conn.send(
                    messages.TaskError(round=task.round, code=err.code, message=err.message),
                    session,
                )
        except (ConnectionClosed, asyncio.CancelledError) as exc:
            self.ledger.finish_task(
                task_id,
                status="failed",
                finished_at=time.time(),
                total_s=time.time() - started,
                error="the connection to the coordinator closed during the task",
            )
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _next(self, want: type[messages.Message], round_: int, end: float) -> Any:
        """The next secure-aggregation message of this round, or a timeout error."""
        while True:
            left = end - time.monotonic()
            try:
                msg = await asyncio.wait_for(self._secagg_inbox.get(), max(left, 0.001))
            except TimeoutError:
                raise FednodeError(
                    f"no {want.TYPE!r} from the coordinator before the round's deadline",
                    code="SECAGG_TIMEOUT",
                ) from None
            if isinstance(msg, want) and getattr(msg, "round", None) == round_:
                return msg
            log.warning("ignoring %s for round %s", msg.TYPE, getattr(msg, "round", "?"))

    async def _secure_round(
        self, conn: Connection, session: str, task: messages.RoundStart, s: dict[str, Any]
    ) -> tuple[training.TrainResult, int]:
        """The participant's side of protocol.secagg: keys, shares, masked input, unmask."""
        p = secagg.params_from_wire(task.secagg)
        n = task.round
        end = time.monotonic() + task.deadline_s
        self._secagg_inbox = asyncio.Queue()
        client = secagg.Client(self.identity.peer_id, p)
        keys = client.advertise()
        sent = await conn.send(messages.SecaggKeys(round=n, **keys), session)
        training_task = asyncio.create_task(self._train(conn, session, task, s))
        try:
            roster = await self._next(messages.SecaggRoster, n, end)
            shares = client.share_keys(roster.roster)
            sent += await conn.send(messages.SecaggShares(round=n, shares=shares), session)
            relay = await self._next(messages.SecaggRelay, n, end)
            result = await training_task
            shapes = training.expected_shapes(model_spec(s))
            flat = weights.flatten(result.weights, shapes)
            # The update is masked, not the model: w - g against the model trained from, which
            # _train fetched and verified by CID (now in the local store); the coordinator adds
            # g back. The weight bound is the coordinator's (p.max_weight): frac_bits fits it.
            base = weights.from_bytes(
                await self._fetch(conn, session, task.model_cid), expect=shapes
            )
            x, clipped = secagg.encode_update(
                flat, weights.flatten(base, shapes), min(result.num_examples, p.max_weight), p
            )
            if clipped:
                log.warning(
                    "round %d: the update exceeded clip %g in %d of %d coordinates (clipped)",
                    n,
                    p.clip,
                    clipped,
                    flat.size,
                )
            # Kept here, never sent: what this participant contributed, for its own audit.
            own_cid = self.store.put(weights.to_bytes(result.weights), pin=False)
            self.ledger.append_event(
                "secagg_input",
                session_id=session,
                data={
                    "round": n,
                    "update_cid": own_cid,
                    "samples": result.num_examples,
                    "weight": min(result.num_examples, p.max_weight),
                    "clip": p.clip,
                    "clipped": clipped,  # coordinates of w - g that the clip cut
                    "bits": p.bits,
                    "frac_bits": p.frac_bits,
                },
            )
            y = await asyncio.to_thread(client.masked_input, relay.shares, x)
            sent += await conn.send(
                messages.SecaggMasked(
                    round=n,
                    data=secagg.pack(y, p),  # ceil(bits/8) bytes per value
                    loss=result.loss,
                    train_s=result.duration_s,
                    fetch_bytes=self._fetched.get(task.model_cid, (0, 0.0))[0],
                    fetch_s=self._fetched.get(task.model_cid, (0, 0.0))[1],
                    cpu_efficiency=self._cpu_efficiency,
                    memory_efficiency=self._memory_efficiency(),
                ),
                session,
            )
            req = await self._next(messages.SecaggUnmaskRequest, n, end)
            out = client.unmask(req.survivors, req.dropped)
            sent += await conn.send(messages.SecaggUnmask(round=n, b=out["b"], s=out["s"]), session)
        finally:
            training_task.cancel()
        return result, sent
