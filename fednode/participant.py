"""The participant node: joins a coordinator, takes training tasks, uploads updates.

Raw data never leaves this process: what goes out is the trained weights (safetensors) and
a few numbers (examples, loss, time). The global model is fetched by CID and its hash is
checked before it is parsed; a model whose bytes do not match is refused. The connection is
kept up with heartbeats and re-dialled with backoff if it drops.

The coordinator chooses the model and the training, so it chooses what this machine spends:
the participant's own operator bounds that with Limits (fednode run --max-params,
--max-memory, --max-train-seconds). A task is priced by arithmetic (protocol.modelspec)
before anything is fetched or allocated, and declined with a task_error (LIMIT_PARAMS,
LIMIT_MEMORY) when it is beyond them; training is cancelled at the round's deadline or the
operator's time limit (TRAIN_DEADLINE). Every task ends with a status in this node's ledger
(done, declined or failed) and, while the connection is up, a task_error for any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch
from websockets.exceptions import ConnectionClosed

from fednode import (
    __version__,
    bounds,
    central_dp,
    downlink,
    dpsgd,
    factories,
    quality,
    round_config,
    rounds,
    training,
    weights,
)
from fednode.attacks import Attack, Probe
from fednode.codecs import CodecParams, Shapes, randk, round_seed
from fednode.data import Dataset, DatasetRef, load_partition, load_split
from fednode.ledger import Ledger
from fednode.noisy_reports import ReportPrivacy, noisy_report
from fednode.privacy import TrainFn
from fednode.schema import PROBE, Schema
from fednode.session import model_spec
from fednode.store import BlockStore
from fednode.transport import MAX_FRAME_BYTES, Connection, dial
from fednode.uplink import Uplink
from protocol import messages, modelspec, plugins, secagg, spec
from protocol.blockstream import BlockStream
from protocol.cid import file_cid
from protocol.errors import (
    BlockStreamError,
    DataError,
    FednodeError,
    ModelCodeError,
    SchemaMismatch,
    SpecError,
    Unsupported,
)
from protocol.identity import Identity
from protocol.modelspec import format_size
from protocol.rotation import Rotation

log = logging.getLogger("fednode.participant")
FETCH_TIMEOUT_S = 60.0
MAX_BACKOFF_S = 10.0
ADMIT_TIMEOUT_S = 30.0
# --poison-round: the factor a poisoned update's weights are multiplied by. Negative, because
# a ReLU network scaled by a positive factor keeps most of its predictions; this one does not.
POISON_FACTOR = -10.0


# Default limits (fednode run --max-memory / --max-params / --max-train-seconds): half of the
# machine's RAM, the parameters that budget holds at 48 bytes each (Adam with weight decay:
# protocol.modelspec.MAX_PLAIN_BYTES_PER_PARAM), and one hour of training per round
# (round_timeout_s goes to a day).
DEFAULT_MAX_TRAIN_S = 3600.0
# Training must end this long before the round's deadline so the update can still travel:
# 10% of the round's time, at most 5 s.
UPLOAD_MARGIN_S = 5.0
UPLOAD_MARGIN_FRACTION = 0.1
MAX_ERROR_CHARS = 1000  # a task_error's message (the wire allows 4096)


class LimitExceeded(FednodeError):
    """A task beyond what this participant's operator allows; the code names the limit."""

    code = "LIMIT_MEMORY"
    hint = "use a smaller model or batch, or ask the participant's operator to raise the limit"


def default_max_memory() -> int:
    """modelspec.DEFAULT_MEMORY_FRACTION of this machine's total RAM (psutil)."""
    return modelspec.default_max_memory(psutil.virtual_memory().total)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What this participant's operator lets a coordinator spend here."""

    max_params: int  # parameters of the model
    max_memory: int  # bytes local training may need (protocol.modelspec.training_memory)
    max_train_s: float  # seconds of local training per round; 0 = only the round's deadline

    @classmethod
    def for_machine(
        cls,
        *,
        max_params: int | None = None,
        max_memory: int | None = None,
        max_train_s: float = DEFAULT_MAX_TRAIN_S,
    ) -> Limits:
        """The defaults of this machine, for each limit not given."""
        memory = default_max_memory() if max_memory is None else max_memory
        params = modelspec.default_max_params(memory) if max_params is None else max_params
        return cls(max_params=params, max_memory=memory, max_train_s=max_train_s)

    def check(self, s: dict[str, Any], n_examples: int, *, secure: bool = False) -> None:
        """Raise LimitExceeded if the validated spec ``s`` is beyond a limit; nothing is
        allocated to find out (protocol.modelspec works on the spec's numbers)."""
        m = model_spec(s)
        params = modelspec.param_count(m)
        if params > self.max_params:
            what = (  # a python model is priced by its fingerprint, before any import
                f"factory = {m['factory']!r}, {len(m['fingerprint'])} tensors in its fingerprint"
                if modelspec.is_python(m)
                else f"inputs = {m['inputs']}, hidden = {m['hidden']}, classes = {m['classes']}"
            )
            raise LimitExceeded(
                f"the model has {params:,} parameters (model.kind = {m['kind']!r}, {what}), "
                f"above this participant's limit of {self.max_params:,} (--max-params)",
                code="LIMIT_PARAMS",
                hint="use a smaller model (model.hidden, model.inputs), or ask this "
                "participant's operator to raise --max-params",
            )
        need = modelspec.training_memory(m, s["training"], n_examples, secure=secure)
        if need > self.max_memory:
            raise LimitExceeded(
                f"local training would need about {format_size(need)} ({need:,} bytes for "
                f"{params:,} parameters, optimizer {s['training']['optimizer']}, batch_size "
                f"{s['training']['batch_size']}, {n_examples:,} examples"
                f"{', secure aggregation' if secure else ''}), above this participant's limit "
                f"of {format_size(self.max_memory)} (--max-memory)",
                code="LIMIT_MEMORY",
                hint="use a smaller model or batch_size, or ask this participant's operator "
                "to raise --max-memory",
            )


def upload_margin(deadline_s: float) -> float:
    """Seconds kept after training for the upload, out of a round of ``deadline_s``."""
    return min(UPLOAD_MARGIN_S, UPLOAD_MARGIN_FRACTION * deadline_s)


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# The data as loaded, before any session's features or partition: what the checks look at.
_AS_LOADED = {"partition": "iid", "seed": 0, "features": "none", "alpha": 0.5, "labels_per_part": 2}


_CUT = ("features", "partition", "seed", "alpha", "labels_per_part")


def _cut(d: dict[str, Any]) -> dict[str, Any]:
    """What of a session's [data] decides the local data as cut: the keyword arguments of
    load_partition and load_split, and (as a tuple) the data cache's key."""
    return {k: d[k] for k in _CUT}


def _timed_train(
    mspec: dict[str, Any],
    w: weights.Weights,
    data: Any,
    cfg: training.TrainConfig,
    deadline: float | None = None,
    stop: threading.Event | None = None,
    train: TrainFn = training.train,  # what the round's privacy mechanism made of it
) -> tuple[training.TrainResult, float]:
    """Train in a worker thread and return the CPU time that thread spent."""
    start = time.thread_time()
    result = train(mspec, w, data, cfg, deadline=deadline, stop=stop)
    return result, time.thread_time() - start


def evaluates(s: dict[str, Any]) -> bool:
    """Whether the spec asks the participants to evaluate each round's model."""
    return rounds.participants_evaluate(s.get("evaluation", {}).get("on", "coordinator"))


def check_test_part(test: Dataset, s: dict[str, Any], source: str) -> None:
    """A participant asked to evaluate needs held-out rows: none is a DataError, refused
    before the round trains (the coordinator hears why), never a silent skip."""
    if len(test) == 0:
        raise DataError(
            f"{source} holds out no test rows (no t10k files or split column, and "
            f"data.test_fraction = {s['data']['test_fraction']:g}), but evaluation.on asks "
            "the participants to evaluate",
            hint='set data.test_fraction, e.g. 0.2, or evaluation.on = "coordinator"',
        )


def eval_report(mspec: dict[str, Any], w: weights.Weights, test: Any) -> dict[str, Any]:
    """The round's model on the held-out split, as the update's eval_* fields. A figure the
    wire would refuse (a non-finite loss of a diverged model) is not sent: no report, so the
    update itself still counts."""
    # the task's metrics by name (protocol.messages.EVAL_METRICS bounds them) and the loss
    metrics = training.evaluate_metrics(mspec, w, test)
    loss = metrics.pop("loss")
    metrics = {k: v for k, v in metrics.items() if k in messages.EVAL_METRICS}
    finite = all(math.isfinite(v) for v in metrics.values())
    if not (finite and math.isfinite(loss) and 0 <= loss <= messages.MAX_EVAL_LOSS):
        log.warning(
            "the round's model has loss %s, metrics %s on the held-out split; not reported",
            loss,
            metrics,
        )
        return {}
    return {"eval_examples": len(test), "eval_loss": loss, "eval_metrics": metrics}


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
        limits: Limits | None = None,
        probe: Probe | None = None,
        schema: Schema | None = None,
        attack: Attack | None = None,
        report_privacy: ReportPrivacy | None = None,
        max_epsilon: float | None = None,
    ):
        self.chain = chain or []
        # fednode run --max-epsilon: the most ε this node's data may spend under local DP-SGD,
        # over every session (its own ledger's privacy_spending, per dataset source)
        self.max_epsilon = max_epsilon
        # The schema this node was started with (fednode run --spec): its data is checked
        # against it before it registers; each task still checks the task's own schema.
        self.schema = schema
        self.probe = probe or Probe()  # a test option: a hostile participant
        # fednode run --attack: this node red-teams its federation (fednode.attacks); the
        # noise of a gaussian attack comes from this node's own entropy
        self.attack = attack
        self._attack_rng = np.random.default_rng()
        self.limits = limits if limits is not None else Limits.for_machine()
        self.num_examples = 0  # set by run(), from the data as loaded
        self.identity = identity
        self.ledger = ledger
        self.uplink = Uplink(ledger)  # the codec step, with error feedback in the ledger
        self.store = store
        self.url = url
        self.coordinator_id = coordinator_id
        self.dataset = dataset
        self.join_token = join_token
        self.train_delay_s = train_delay_s  # a test option: a deliberately slow participant
        self.poison_round = poison_round  # a test option: this round's update diverges
        # model CID -> the download's outcome: the file, or a model_delta to rebuild it from
        self._fetches: dict[str, asyncio.Future[bytes | messages.ModelDelta]] = {}
        # session -> the CID of the last model of it this node holds (compression.downlink)
        self._held: dict[str, str] = {}
        # root CID -> the block stream of its download from the coordinator, while it runs
        self._streams: dict[str, BlockStream] = {}
        self._task: asyncio.Task[None] | None = None
        # (session, round) of a plain round's task until its update leaves: a round_end for
        # it first means the round closed without it (over-selection), so it stops
        self._task_round: tuple[str, int] | None = None
        self._not_needed: tuple[str, int] | None = None  # the task stopped for that reason
        # (session, round) -> the coordinator's upload_grant, awaited before an update is sent
        self._grants: dict[tuple[str, int], asyncio.Future[None]] = {}
        self._data_cache: dict[tuple[Any, ...], Any] = {}
        self._secagg_inbox: asyncio.Queue[messages.Message] = asyncio.Queue()
        self._proc = psutil.Process()
        self._cpu_efficiency: float | None = None  # of the last training, for heartbeats
        self._fetched: dict[str, tuple[int, float]] = {}  # cid -> (bytes, seconds) downloaded
        self.data_report: dict[str, Any] = {}
        # [privacy] noisy_reports of the spec it was started with (fednode run --spec): the
        # data report is released through the Laplace mechanism (fednode.noisy_reports)
        self.report_privacy = report_privacy
        # (session, round) -> the eval_* fields of that round's update (eval_report)
        self._evaluations: dict[tuple[str, int], dict[str, Any]] = {}
        # a python model spec (as canonical JSON) -> None once built and checked here, or
        # why not: the factory runs once per spec, not every round
        self._verified: dict[str, ModelCodeError | None] = {}
        # fednode swarm (fednode.swarm): the participants of one process share these bounds,
        # handshakes in flight and trainings at once; a node of its own has neither
        self.dial_slots: asyncio.Semaphore | None = None
        self.train_slots: asyncio.Semaphore | None = None
        # connected, handshaken and admitted by the coordinator now (fednode.health: ready)
        self.joined = False

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; re-dial with backoff on failures."""
        # Load the data and warm torch before joining, so round 1 measures training only.
        await asyncio.to_thread(training.warm_up)
        self.num_examples = await asyncio.to_thread(self._num_examples)
        base = self._load_data(_AS_LOADED)
        self.data_report = await asyncio.to_thread(quality.data_report, base.x, base.y)
        if self.report_privacy is not None:  # the exact report never leaves this node
            self.data_report = noisy_report(self.data_report, self.report_privacy)
        backoff = 0.5
        while not stop.is_set():
            try:
                async with self.dial_slots or contextlib.nullcontext():
                    conn = await dial(
                        self.url, self.identity, self.coordinator_id, chain=self.chain
                    )
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
            # Jitter: after a coordinator restart, its participants must not all dial back
            # in the same instant (half to all of the backoff, at random).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff * random.uniform(0.5, 1.0))
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

    def check_data(self) -> None:
        """Load the data as this node registers it, against the schema it was started with
        (fednode run --spec) if any: a DataError here means it must not join (cached, so
        run() does not read the data twice)."""
        self._num_examples()

    def _local_data(self, s: dict[str, Any]) -> tuple[Dataset, Dataset | None]:
        """(training data, held-out test data or None) for a session's spec. When the
        participants evaluate, the test part is what the source holds out (IDX t10k files, a
        table's split column, an npz's x_test) or else a seeded data.test_fraction of the
        rows (fednode.data.load_split), kept out of training in every round; otherwise all
        the local data trains."""
        schema = Schema.from_spec(s)
        if not evaluates(s):
            return self._load_data(s["data"], schema), None
        cut = _cut(s["data"])
        key = ("split", *cut.values(), schema)
        if key not in self._data_cache:
            train, test = load_split(self.dataset, **cut, schema=schema)
            check_test_part(test, s, str(self.dataset))
            self._data_cache[key] = (train, test)
        return self._data_cache[key]

    def _load_data(self, data_spec: dict[str, Any], schema: Schema | None = None) -> Any:
        """The local data as a session's [data] cuts it, checked against its schema
        (Schema.from_spec; SchemaMismatch on any difference). Without a schema: the data as
        found, before any session is known (the registration's count and data report)."""
        schema = schema or self.schema or PROBE
        cut = _cut(data_spec)
        key = (*cut.values(), schema)
        if key not in self._data_cache:
            self._data_cache[key] = load_partition(self.dataset, **cut, schema=schema)
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
        self.joined = True
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
                    # The round's deadline counts from now, not from when training starts.
                    arrived = time.monotonic()
                    self._task_round = None if msg.secagg else (env.session, msg.round)
                    self._task = asyncio.create_task(
                        self._do_round(conn, env.session, msg, arrived)
                    )
                elif isinstance(msg, messages.SECAGG_TO_PARTICIPANT):
                    self._secagg_inbox.put_nowait(msg)
                elif isinstance(msg, messages.Block):
                    self._on_block(msg)
                elif isinstance(msg, messages.ModelDelta):
                    self._on_delta(msg)
                elif isinstance(msg, messages.UploadGrant):  # unasked for: nothing to do
                    grant = self._grants.get((env.session, msg.round))
                    if grant is not None and not grant.done():
                        grant.set_result(None)
                elif isinstance(msg, messages.Error):
                    log.warning("coordinator says %s: %s", msg.code, msg.message)
                    self._streams.clear()
                    for fut in (*self._fetches.values(), *self._grants.values()):
                        if not fut.done():  # e.g. an upload_ready refused: STALE_UPDATE
                            fut.set_exception(FednodeError(msg.message, code=msg.code))
                elif isinstance(msg, messages.RoundEnd | messages.SessionEnd):
                    self.ledger.append_event(
                        msg.TYPE, session_id=env.session, data=messages.payload(msg)
                    )
                    if isinstance(msg, messages.RoundEnd):
                        await self._stop_unneeded(env.session, msg.round)
                    elif self._task_round is not None and self._task_round[0] == env.session:
                        await self._stop_unneeded(*self._task_round)  # the session ended
        finally:
            self.joined = False
            beat.cancel()
            if self._task is not None:
                self._task.cancel()
        return None

    async def _upload_slot(
        self, conn: Connection, session: str, round_: int, size: int, until: float
    ) -> None:
        """Say the update is ready and wait for the coordinator's grant to send it
        (fednode.uploads: it bounds the uploads in flight), at most until the round's
        deadline (``until``, monotonic); NO_UPLOAD_SLOT after that."""
        key = (session, round_)
        grant: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._grants[key] = grant
        try:
            await conn.send(messages.UploadReady(round=round_, bytes=size), session)
            await asyncio.wait_for(grant, max(0.0, until - time.monotonic()))
        except TimeoutError:
            raise FednodeError(
                f"the coordinator granted no upload slot for round {round_} before its deadline",
                code="NO_UPLOAD_SLOT",
                hint="the coordinator had more uploads in flight than it takes at once "
                "(fednode run --max-uploads, --max-upload-mib)",
            ) from None
        finally:
            self._grants.pop(key, None)

    async def _stop_unneeded(self, session: str, round_: int) -> None:
        """The coordinator ended round ``round_`` while this node still trains for it: the
        round closed on the updates it needed ([selection] over_selection), so this one
        would be refused as stale. Stop it, and wait until it has stopped, so that the next
        round_start finds this node free (not BUSY)."""
        task = self._task
        if task is None or task.done() or self._task_round != (session, round_):
            return
        self._not_needed = (session, round_)
        task.cancel()
        await asyncio.wait([task])

    async def _verify_model(self, s: dict[str, Any]) -> None:
        """For ``model.kind = "python"``: build the model from this node's allowed code and
        compare it with the spec's fingerprint (fednode.factories.verify, in a worker
        thread); ModelCodeError (not allowed, mismatch, factory error) otherwise."""
        m = model_spec(s)
        if not modelspec.is_python(m):
            return
        key = json.dumps(m, sort_keys=True)
        if key not in self._verified:
            try:
                await asyncio.to_thread(factories.verify, m)
                self._verified[key] = None
            except ModelCodeError as err:
                self._verified[key] = err
        err = self._verified[key]
        if err is not None:
            raise type(err)(err.message, hint=err.hint, code=err.code)

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
        self,
        conn: Connection,
        session: str,
        cid: str,
        via: str = "coordinator",
        max_bytes: int = MAX_FRAME_BYTES,
        delta_from: tuple[str, Shapes] | None = None,
    ) -> bytes:
        """The model by CID, every block verified: from the local store if present, from
        this node's IPFS daemon when the spec says ``model.fetch = "ipfs"``, else (or when the
        daemon cannot give it) from the coordinator, block by block, never more than
        ``max_bytes`` (the spec's model: fednode.weights.max_file_bytes).

        ``delta_from`` (compression.downlink, and the model's shapes): the coordinator is told
        the last model of the session this node holds, and may answer with a difference
        from it (fednode.downlink), rebuilt here and checked against the CID it names; with
        delta_fp16 that is the coordinator's rebuild, not ``cid`` itself, and the model
        returned is that rebuild."""
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
            if delta_from is not None:
                self._held[session] = cid
            return await asyncio.to_thread(self.store.get, cid)  # verified block by block
        held = self._held.get(session, "") if delta_from is not None else ""
        fut, stream = self._expect_blocks(cid, max_bytes)
        started = time.perf_counter()
        await conn.send(messages.Fetch(cid=cid, have=held), session)
        got, down = await self._receive_blocks(cid, fut, stream)
        if isinstance(got, messages.ModelDelta):
            data, down = await self._rebuild(got, held, delta_from), len(got.data)
        else:
            data = got
        took = time.perf_counter() - started
        self._fetched[cid] = (down, took)  # reported with the update: bandwidth
        # a cache: the coordinator has the model, so no fsync on the round's critical path
        await asyncio.to_thread(self.store.put, data, pin=False, durable=False)
        if delta_from is not None:  # what to name as held next round
            self._held[session] = got.result if isinstance(got, messages.ModelDelta) else cid
        return data

    async def _rebuild(
        self, msg: messages.ModelDelta, held: str, asked: tuple[str, Shapes] | None
    ) -> bytes:
        """The model a ``model_delta`` makes of the held one, checked against the CID it
        names, which a lossless delta must name as the model asked for; ``asked``: the
        session's downlink mode and model shapes (None: no delta was asked for)."""
        if asked is None or not held or msg.base != held:
            raise BlockStreamError(
                f"the coordinator sent a difference from {msg.base}; this node "
                + (f"holds {held} of the session" if asked and held else "asked for none")
            )
        mode, shapes = asked
        if msg.encoding != downlink.MODES[mode] or (mode == "delta" and msg.result != msg.cid):
            raise BlockStreamError(
                f"the coordinator sent a {msg.encoding} difference giving {msg.result}; the "
                f"session's downlink is {mode} of {msg.cid}"
            )
        base = await asyncio.to_thread(self.store.get, held)  # verified block by block
        return await asyncio.to_thread(
            downlink.rebuild, msg.encoding, base, msg.data, msg.result, shapes
        )

    def _expect_blocks(
        self, cid: str, max_bytes: int
    ) -> tuple[asyncio.Future[bytes | messages.ModelDelta], BlockStream]:
        """Get ready for the blocks of model ``cid`` (before asking, so that none is missed):
        the future gets the file once every block came and was checked."""
        fut: asyncio.Future[bytes | messages.ModelDelta] = (
            asyncio.get_running_loop().create_future()
        )
        stream = BlockStream(cid, max_bytes)
        self._fetches[cid], self._streams[cid] = fut, stream
        return fut, stream

    async def _receive_blocks(
        self, cid: str, fut: asyncio.Future[bytes | messages.ModelDelta], stream: BlockStream
    ) -> tuple[bytes | messages.ModelDelta, int]:
        """The file of a download ``_expect_blocks`` started, and the bytes of its blocks
        (what came over the wire); or the ``model_delta`` the coordinator sent instead.
        FETCH_TIMEOUT if the stream does not finish in time; BAD_BLOCK_STREAM or
        CID_MISMATCH as soon as a block is not the one expected."""
        try:
            data = await asyncio.wait_for(fut, FETCH_TIMEOUT_S)
        except TimeoutError:
            raise FednodeError(
                f"the coordinator sent {stream.blocks} blocks of model {cid} in "
                f"{FETCH_TIMEOUT_S:.0f} s, not all of them",
                code="FETCH_TIMEOUT",
            ) from None
        finally:
            if self._streams.get(cid) is stream:
                del self._streams[cid]
            if self._fetches.get(cid) is fut:
                del self._fetches[cid]
        return data, stream.block_bytes

    def _on_block(self, msg: messages.Block) -> None:
        """A block from the coordinator: to the download that expects it next, checked there
        (protocol.blockstream). A block no download expects fails the one in flight (the
        coordinator is not sending the model it named); with none in flight it is dropped."""
        root = next((r for r, st in self._streams.items() if st.expected() == msg.cid), None)
        if root is None and len(self._streams) == 1:
            root = next(iter(self._streams))  # its stream names what it expected instead
        if root is None:
            if not self._streams:
                log.warning("the coordinator sent block %s, which no download asked for", msg.cid)
                return
            err: FednodeError = BlockStreamError(
                f"block {msg.cid} is not the next block of any model being downloaded"
            )
            for r in list(self._streams):
                self._fail_download(r, err)
            return
        stream = self._streams[root]
        try:
            stream.feed(msg.cid, msg.data)
            if stream.done:
                data = stream.result()
                del self._streams[root]
                fut = self._fetches.get(root)
                if fut is not None and not fut.done():
                    fut.set_result(data)
        except FednodeError as err:
            self._fail_download(root, err)

    def _on_delta(self, msg: messages.ModelDelta) -> None:
        """A model_delta: the answer to the download of ``msg.cid`` instead of its blocks
        (rebuilt and checked by the download itself)."""
        fut = self._fetches.get(msg.cid)
        if fut is None or fut.done():
            log.warning("the coordinator sent a delta of %s, which no download asked for", msg.cid)
            return
        self._streams.pop(msg.cid, None)
        fut.set_result(msg)

    def _fail_download(self, root: str, err: FednodeError) -> None:
        self._streams.pop(root, None)
        fut = self._fetches.get(root)
        if fut is not None and not fut.done():
            fut.set_exception(err)

    async def _train(
        self,
        conn: Connection,
        session: str,
        task: messages.RoundStart,
        s: dict[str, Any],
        round_end: float,
        dp: dpsgd.DPRound | None = None,
    ) -> tuple[training.TrainResult, weights.Weights]:
        """Fetch the round's model by CID, train on the local data, return the result and
        the model it trained from (a delta codec and a secure round encode against it).
        With ``dp`` (local DP-SGD), the round's spending goes to this node's ledger as soon
        as training ends: an update could leave from then on.

        Training stops at ``round_end`` (monotonic: the round's deadline less the upload
        margin) or after --max-train-seconds, whichever comes first (TRAIN_DEADLINE). When
        this coroutine is cancelled the worker thread is told to stop too: a thread cannot
        be killed, but it checks its stop flag before every batch.
        """
        mspec = model_spec(s)
        # The download is bounded by the spec's model, and the header is checked against the
        # spec's shapes before anything is allocated for the tensors.
        shapes = training.expected_shapes(mspec)
        mode = s["compression"]["downlink"]
        blob = await self._fetch(
            conn,
            session,
            task.model_cid,
            s["model"]["fetch"],
            weights.max_file_bytes(shapes),
            delta_from=None if mode == "full" else (mode, shapes),
        )
        global_w = await asyncio.to_thread(weights.from_bytes, blob, expect=shapes)
        del blob
        data, test = await asyncio.to_thread(self._local_data, s)
        if test is not None:  # the round's model, before training: reported with the update
            self._evaluations[(session, task.round)] = await asyncio.to_thread(
                eval_report, mspec, global_w, test
            )
        if self.attack is not None:  # label_flip: training only; the test split stays true
            data = self.attack.training_data(data, mspec)
        t = s["training"]
        plan = round_config.plan(task)  # checked in _do_round before anything was fetched
        cfg = training.TrainConfig.of_spec(
            t,
            seed=shuffle_seed(s["data"]["seed"], task.round, self.identity.peer_id),
            **plan.training,  # the strategy's settings for this round (FedProx: proximal_mu)
        )
        wall0, proc0 = time.perf_counter(), self._proc.cpu_times()
        if self.train_delay_s:  # a test option: the delay counts as (slow) training time
            await asyncio.sleep(self.train_delay_s)
        deadline = round_end
        why = (
            f"the round's deadline: round_timeout_s {task.deadline_s:g} s from round_start, "
            f"less {upload_margin(task.deadline_s):g} s for the upload"
        )
        own_limit = time.monotonic() + self.limits.max_train_s
        if self.limits.max_train_s > 0 and own_limit < deadline:
            deadline = own_limit
            why = f"this participant's --max-train-seconds {self.limits.max_train_s:g}"
        stop = threading.Event()
        if self.train_slots is not None:  # a swarm's turn: the wait is not training time
            queued = time.perf_counter()
            await self.train_slots.acquire()
            wall0 += time.perf_counter() - queued
        try:
            result, thread_cpu = await asyncio.to_thread(
                _timed_train,
                mspec,
                global_w,
                data,
                cfg,
                deadline,
                stop,
                plan.privacy.wrap(training.train, dp),
            )
        except training.TrainingStopped as err:
            if err.code != "TRAIN_DEADLINE":
                raise
            raise training.TrainingStopped(f"{err.message} ({why})") from None
        finally:
            stop.set()  # cancelled (connection lost, node stopping): the thread stops too
            if self.train_slots is not None:
                self.train_slots.release()
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
        if dp is not None:  # its ε was computed in the training thread (DPRound.report)
            self._record_dp(session, task.round, dp)
        if self.attack is not None:
            result = await self._attacked(session, task.round, result, global_w)
        return dataclasses.replace(result, duration_s=wall), global_w

    def _plan_dp(
        self, session: str, s: dict[str, Any], rows: list[dict[str, Any]]
    ) -> dpsgd.DPRound:
        """This round's DP-SGD (fednode.dpsgd.plan_round) from the spec, this node's training
        examples and its ledger's spending on this data (``rows``); LimitExceeded
        (LIMIT_EPSILON) when training it would take the data's ε past --max-epsilon,
        Unsupported for a python model with layers Opacus cannot train privately."""
        m = model_spec(s)
        if modelspec.is_python(m):  # declared layers were checked with the spec
            dpsgd.check_module(factories.build(m), f"model factory {m['factory']!r}")
        train, _test = self._local_data(s)

        def entries(rs: list[dict[str, Any]]) -> list[dpsgd.Entry]:
            return [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in rs]

        dp = dpsgd.plan_round(
            s["privacy"],
            s["training"],
            s["rounds"],
            len(train),
            session_history=entries([r for r in rows if r["session_id"] == session]),
            dataset_history=entries(rows),
            max_epsilon=self.max_epsilon,
        )
        if self.max_epsilon is not None and dp.spent_epsilon() > self.max_epsilon:
            before = dpsgd.epsilon(dp.dataset_history, dp.delta, dp.accountant)
            raise LimitExceeded(
                f"training this round would take the ε spent on {self.dataset} from "
                f"{before:.3f} to {dp.spent_epsilon():.3f} (δ = {dp.delta:g}, "
                f"{dp.accountant}, σ = {dp.noise_multiplier:.3f}, {dp.steps} steps), above "
                f"this participant's limit of {self.max_epsilon:g} (--max-epsilon)",
                code="LIMIT_EPSILON",
                hint="this participant's data has spent its privacy budget: its operator may "
                "raise --max-epsilon; the session goes on with the others",
            )
        return dp

    def _record_dp(self, session: str, round_: int, dp: dpsgd.DPRound) -> None:
        """The round's spending in this node's ledger, and a warning (a privacy_budget
        event) once it has spent dpsgd.BUDGET_WARNING_SHARE of --max-epsilon."""
        spent = dp.spent_epsilon()
        self.ledger.record_privacy_spending(
            str(self.dataset),
            session,
            round_,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=dp.sample_rate,
            steps=dp.steps,
            accountant=dp.accountant,
            delta=dp.delta,
            epsilon=dp.session_epsilon(),
            spent_epsilon=spent,
            now=time.time(),
        )
        if self.max_epsilon is not None and spent >= dpsgd.BUDGET_WARNING_SHARE * self.max_epsilon:
            log.warning(
                "the data %s has spent ε = %.3f of its --max-epsilon %g",
                self.dataset,
                spent,
                self.max_epsilon,
            )
            self.ledger.append_event(
                "privacy_budget",
                session_id=session,
                data={
                    "round": round_,
                    "dataset": str(self.dataset),
                    "spent_epsilon": spent,
                    "max_epsilon": self.max_epsilon,
                    "share": spent / self.max_epsilon if self.max_epsilon else None,
                },
            )

    async def _attacked(
        self, session: str, round_: int, result: training.TrainResult, global_w: weights.Weights
    ) -> training.TrainResult:
        """What --attack makes of the trained update (fednode.attacks), recorded in this
        node's own ledger with both norms; the coordinator is told nothing."""
        assert self.attack is not None
        sent = await asyncio.to_thread(
            self.attack.update, result.weights, global_w, self._attack_rng
        )
        self.ledger.append_event(
            "attack",
            session_id=session,
            data={
                "attack": str(self.attack),
                "round": round_,
                "honest_norm": bounds.update_norm(result.weights, global_w),
                "sent_norm": bounds.update_norm(sent, global_w),
            },
        )
        return dataclasses.replace(result, weights=sent)

    def _close_task(self, task_id: int | None, status: str, started: float, error: str) -> None:
        """End a task that did not complete; a ledger failure is logged, not raised, so the
        coordinator still hears of the task (the caller sends the task_error next)."""
        if task_id is None:  # its start could not be recorded either
            return
        try:
            self.ledger.finish_task(
                task_id,
                status=status,
                finished_at=time.time(),
                total_s=time.time() - started,
                error=_bounded(error),
            )
        except Exception:
            log.exception("could not record the end of task %d (%s)", task_id, status)

    async def _task_failed(
        self,
        conn: Connection,
        session: str,
        task: messages.RoundStart,
        task_id: int | None,
        started: float,
        err: FednodeError,
        *,
        status: str = "failed",
    ) -> None:
        """Record a task that ends without an update and tell the coordinator why, so the
        round stops waiting for this node at once instead of at its timeout."""
        message = _bounded(err.message)
        try:
            self.ledger.append_event(
                "task_declined" if status == "declined" else "task_failed",
                session_id=session,
                data={"round": task.round, "code": err.code, "message": message},
            )
        except Exception:
            log.exception("could not record the %s task of round %d", status, task.round)
        self._close_task(task_id, status, started, f"{err.code}: {message}")
        try:
            await conn.send(
                messages.TaskError(round=task.round, code=err.code, message=message), session
            )
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("could not send the task_error of round %d", task.round)

    async def _do_round(
        self,
        conn: Connection,
        session: str,
        task: messages.RoundStart,
        arrived: float | None = None,
    ) -> None:
        """One task, from round_start to a final status: done, declined or failed."""
        arrived = time.monotonic() if arrived is None else arrived
        started = time.time()
        task_id: int | None = None
        try:
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
            s = spec.validate(task.spec)
            # Priced before anything is fetched or allocated: beyond a limit, declined.
            self.limits.check(s, self.num_examples, secure=bool(task.secagg))
            # A python model: this node's allowed code must build the spec's fingerprint,
            # checked once per spec before anything is fetched (ModelCodeError: declined).
            await self._verify_model(s)
            # The data against the session's schema before anything is fetched: data that
            # differs (a column, a class, a shape) is declined, never trained on.
            await asyncio.to_thread(self._local_data, s)
            # The round's strategy settings, codec and privacy, each one this node has or
            # declined (fednode.round_config says why a setting is never ignored).
            plan = round_config.plan(task)
            # Local DP-SGD: the round's noise and steps, and this node's own budget, before
            # anything is fetched (LIMIT_EPSILON: declined; the session goes on without it).
            dp = None
            if plan.privacy.name == plugins.LOCAL_DP:
                spent = self.ledger.privacy_spending(str(self.dataset))  # the loop's thread
                dp = await asyncio.to_thread(self._plan_dp, session, s, spent)
            round_end = arrived + task.deadline_s - upload_margin(task.deadline_s)
            if task.secagg:
                result, sent = await self._secure_round(
                    conn, session, task, s, arrived, round_end, dp
                )
                own = await asyncio.to_thread(weights.to_bytes, result.weights)
            else:
                result, base = await self._train(conn, session, task, s, round_end, dp)
                if task.round == self.poison_round:  # the test option: a diverging update
                    poisoned = {k: v * POISON_FACTOR for k, v in result.weights.items()}
                    result = dataclasses.replace(result, weights=poisoned)
                if self.probe.on:  # the test option: the probe's scaled weights and claim
                    result = dataclasses.replace(
                        result,
                        weights=self.probe.weights(result.weights),
                        num_examples=self.probe.claim or result.num_examples,
                    )
                if not math.isfinite(result.loss):  # train() refuses these; never send one
                    raise training.NonFiniteUpdate(f"the training loss is {result.loss}")
                enc = await asyncio.to_thread(
                    self.uplink.encode,
                    session,
                    task.round,
                    plan.codec,
                    CodecParams.of_spec(
                        s["compression"], round_seed(session, task.round, task.model_cid)
                    ),
                    s["compression"],
                    result.weights,
                    base,
                    self.uplink.residual(session, plan.codec.name, weights.shapes(base)),
                )
                own = out = enc.data
                await self._upload_slot(
                    conn, session, task.round, len(out), arrived + task.deadline_s
                )
                self._task_round = None  # the update leaves: a round_end no longer stops it
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
                        **self._evaluations.pop((session, task.round), {}),
                        **(result.privacy or {}),  # local DP-SGD: what it has spent
                    ),
                    session,
                )
                enc.commit()  # the update has left: what it did not carry is the residual
            # The participant keeps its own update: its data, its audit trail.
            own_cid = self.store.put(own, pin=False, durable=False)  # an audit copy
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
                    "applied": plan.describe(),  # the round's settings as this node used them
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
        # what it will not do (SchemaMismatch: its data is not what the session's schema says)
        except (LimitExceeded, SpecError, Unsupported, SchemaMismatch, ModelCodeError) as err:
            log.warning("declined round %d: %s: %s", task.round, err.code, err.message)
            await self._task_failed(conn, session, task, task_id, started, err, status="declined")
        except FednodeError as err:
            log.error("round %d failed here: %s: %s", task.round, err.code, err.message)
            await self._task_failed(conn, session, task, task_id, started, err)
        except (ConnectionClosed, asyncio.CancelledError) as exc:
            unneeded = isinstance(exc, asyncio.CancelledError) and self._not_needed == (
                session,
                task.round,
            )
            self._close_task(
                task_id,
                "not_needed" if unneeded else "failed",
                started,
                "the round closed on the updates it needed before this one (over-selection)"
                if unneeded
                else "the connection to the coordinator closed during the task"
                if isinstance(exc, ConnectionClosed)
                else "the task was cancelled (the connection closed or the node is stopping)",
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:  # MemoryError, a torch RuntimeError, a bug: still end the task
            log.exception("round %d failed here with an unexpected error", task.round)
            internal = FednodeError(
                _bounded(f"{type(exc).__name__}: {exc}"),
                code="INTERNAL",
                hint="a bug or a resource failure on the participant; see its log",
            )
            await self._task_failed(conn, session, task, task_id, started, internal)

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

    async def _next_unless_failed(
        self,
        want: type[messages.Message],
        round_: int,
        end: float,
        training_task: asyncio.Task[training.TrainResult],
    ) -> Any:
        """``_next``, but a training that fails meanwhile ends the wait with its error, so the
        coordinator hears of it now rather than after the next protocol step."""
        nxt = asyncio.ensure_future(self._next(want, round_, end))
        try:
            await asyncio.wait({nxt, training_task}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done() and training_task.done() and not training_task.cancelled():
                err = training_task.exception()
                if err is not None:
                    raise err
            return await nxt
        finally:
            nxt.cancel()

    async def _secure_round(
        self,
        conn: Connection,
        session: str,
        task: messages.RoundStart,
        s: dict[str, Any],
        arrived: float,
        round_end: float,
        dp: dpsgd.DPRound | None = None,
    ) -> tuple[training.TrainResult, int]:
        """The participant's side of protocol.secagg: keys, shares, masked input, unmask.

        Training has the same deadline as in a plain round (``round_end``); the protocol's
        own messages are awaited until the round's deadline itself (``arrived`` plus
        deadline_s). A failure in training surfaces here and ends the task like any other.
        """
        p = secagg.params_from_wire(task.secagg)
        weight, max_norm = secagg.assignment_from_wire(task.secagg, p)
        share: central_dp.Share | None = None
        if task.privacy == plugins.CENTRAL_DP:  # checked before a key is sent: declined
            selected = len(task.secagg.get("participants") or ())
            share = await asyncio.to_thread(
                central_dp.share_plan, s, p.clip, p.threshold, p.neighbours, selected, weight
            )
        n = task.round
        end = arrived + task.deadline_s
        self._secagg_inbox = asyncio.Queue()
        client = secagg.Client(self.identity.peer_id, p)
        keys = client.advertise()
        sent = await conn.send(messages.SecaggKeys(round=n, **keys), session)
        training_task = asyncio.create_task(self._train(conn, session, task, s, round_end, dp))
        try:
            roster = await self._next_unless_failed(messages.SecaggRoster, n, end, training_task)
            shares = client.share_keys(roster.roster)
            sent += await conn.send(messages.SecaggShares(round=n, shares=shares), session)
            relay = await self._next_unless_failed(messages.SecaggRelay, n, end, training_task)
            result, base = await training_task
            shapes = training.expected_shapes(model_spec(s))
            # The update is masked, not the model: w - g against the model trained from, which
            # _train fetched and verified by CID; the coordinator adds g back. The weight is
            # the one the coordinator assigned (it checks their sum after unmasking), and the
            # update is clipped to its L2 bound here, since nobody else sees it: the
            # coordinator can only check the sum's norm.
            if self.probe.on:  # the test option: its own weight, no norm clip, scaled
                weight = min(self.probe.claim, p.max_weight) if self.probe.claim else weight
                max_norm = 0.0
                result = dataclasses.replace(result, weights=self.probe.weights(result.weights))
            if share is not None:  # central DP: sized for the roster (U1) the graph is over
                share = central_dp.share_plan(
                    s, p.clip, p.threshold, p.neighbours, len(roster.roster), weight
                )
                max_norm = min(max_norm, share.clip_norm) if max_norm > 0 else share.clip_norm
            bounded, norm, scale = bounds.clip_update(result.weights, base, max_norm)
            flat, g = weights.flatten(bounded, shapes), weights.flatten(base, shapes)
            commit: Callable[[], None] | None = None
            if task.codec == plugins.RANDK:  # the round's shared coordinates, plus error feedback
                coords = randk.coordinates(
                    flat.size,
                    s["compression"]["fraction"],
                    round_seed(session, n, task.model_cid),
                )
                picked, commit = self.uplink.secure_select(
                    session, n, plugins.RANDK, s["compression"], flat - g, coords, shapes
                )
                # what is sent keeps the L2 bound (the residual may have added to it)
                picked = bounds.clip_vector(picked, max_norm)
                flat, g = g[coords] + picked, g[coords]
            if share is not None:  # this node's share of the noise, before masking
                flat = central_dp.add_share(flat, share.std, np.random.default_rng())
            x, clipped = secagg.encode_update(flat, g, weight, p)
            if clipped:
                log.warning(
                    "round %d: the update exceeded clip %g in %d of %d coordinates (clipped)",
                    n,
                    p.clip,
                    clipped,
                    flat.size,
                )
            # Kept here, never sent: what this participant contributed, for its own audit.
            own_cid = self.store.put(weights.to_bytes(result.weights), pin=False, durable=False)
            self.ledger.append_event(
                "secagg_input",
                session_id=session,
                data={
                    "round": n,
                    "update_cid": own_cid,
                    "samples": result.num_examples,
                    "weight": weight,
                    "update_norm": norm,
                    "max_update_norm": max_norm,
                    "norm_scale": scale,  # 1.0 when the update was within the bound
                    "clip": p.clip,
                    "clipped": clipped,  # coordinates of w - g that the clip cut
                    "bits": p.bits,
                    "frac_bits": p.frac_bits,
                    **({"central_dp": share.describe()} if share is not None else {}),
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
                    **self._evaluations.pop((session, n), {}),
                    **(result.privacy or {}),  # local DP-SGD: what it has spent
                ),
                session,
            )
            if commit is not None:  # the masked input has left: the rest is the residual
                commit()
            req = await self._next(messages.SecaggUnmaskRequest, n, end)
            out = client.unmask(req.survivors, req.dropped)
            sent += await conn.send(messages.SecaggUnmask(round=n, b=out["b"], s=out["s"]), session)
        finally:
            training_task.cancel()  # its own finally tells the training thread to stop
            if training_task.done() and not training_task.cancelled():
                training_task.exception()  # retrieved: it is reported through this task
        return result, sent
