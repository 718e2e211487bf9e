"""Secure aggregation against a plain FedAvg round: compute per party and bytes on the wire.

Everything runs in one process with the project's real code: protocol.secagg's Client and
Server for the masking, protocol.messages for every message and protocol.envelope sealing
and opening real signed envelopes (each participant on its own channel, sequence numbers
and replay guard as on a connection), so every byte count is the length of a frame that the
wire would carry. The plain round is what fednode/participant.py and fednode/session.py do:
weights to safetensors, file_cid, an ``update`` envelope; the coordinator opens it, checks
the base model and the CID, decodes the safetensors and takes the FedAvg average.

For each model size d and number of participants n it runs a plain round, then secure
rounds with the complete graph (SecAgg, neighbours = 0) and with SecAgg+ (k = the smallest
even number >= log2 n, and the k >= 2 log2 n that docs/secure-aggregation.md recommends),
under two arithmetic settings: the spec's defaults (bits 40, clip 8, max_weight 2**16: 5
bytes per value) and, for comparison, the previous defaults (bits 62, clip 100, max_weight
2**20: 8 bytes per value). As in the product, each participant masks its weighted update
against the round's model (secagg.encode_update) and the coordinator adds that model back
(secagg.decode_average); the models are a random global model plus a small random update.

Definitions (printed with the results). Times are CPU seconds of the benchmark's one thread
(wall seconds are in the JSON too); each configuration runs several times (``repeats``) and
the run with the median round time is reported; every run's unmasked average is checked
against the plain FedAvg average, and the script fails if it is off by more than the
fixed-point error.
- participant compute: one participant's CPU work for the round, everything except training
  and the model's transfer (fetch -> block), which are identical in both rounds; for the
  plain round: open round_start, to_bytes, file_cid, seal update; for the secure round: open
  round_start, roster, relay and unmask request, advertise, share_keys, encode_update (with
  decoding the round's model, which the product reads back from its local store: that read
  is excluded like the transfer), masked_input, pack, unmask, sealing each of its messages.
  Median over the n participants.
- coordinator compute: sealing the frames it sends (round_start; roster, relay and unmask
  requests), opening every frame it receives, the Server stages, result and decode_average
  (secure);
  opening, base and CID checks, safetensors decode and the FedAvg average (plain).
- round time = median participant compute + coordinator compute: participants work in
  parallel on their own machines; the network transfer is excluded, and the bytes ratio
  stands for it.
- bytes sent / received per participant: the sum of its envelope frames in the round,
  including fetch (sent), round_start and the model's block (received), identical in both.

    .venv/bin/python benchmarks/secagg.py                    # the full matrix (~7.5 min, 2 cores)
    .venv/bin/python benchmarks/secagg.py --quick            # d = 10^4, 10^5; n = 10
    .venv/bin/python benchmarks/secagg.py --dims 1000000 --ns 100 --variants secagg+ --json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode import weights
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate
from protocol import messages, secagg, spec
from protocol.cid import file_cid
from protocol.envelope import ReplayGuard, open_frame, seal
from protocol.identity import Identity
from protocol.limits import check_size

FRAC_BITS_WANTED = 16
GOAL = {"d": 10**6, "n": 100, "variant": "secagg+", "bytes_ratio": 1.5, "time_ratio": 2.0}
VARIANTS = ("secagg", "secagg+", "secagg+2log")
DEFINITIONS = (
    "times are CPU seconds of the one benchmark thread (time.thread_time; wall time is in "
    "the JSON). participant compute = one participant's CPU work in the round except "
    "training and the model's transfer (identical in both); median over the n participants, "
    "every one timed. coordinator "
    "compute = sealing what it sends, opening everything it receives, checks, Server stages / "
    "FedAvg, result, decode. round time = median participant compute + coordinator compute "
    "(participants run in parallel on their own machines; network transfer excluded, the "
    "bytes ratio stands for it). bytes = sum of the participant's envelope frames in the "
    "round (sent: fetch + its messages; received: round_start + model block + secagg frames)."
)


# ---------------------------------------------------------------------------------------------
# plumbing: timers and one signed connection per participant


class Timer:
    """CPU seconds per stage for one party (and wall seconds beside); ``with t("stage"):``.

    CPU time of this thread (everything here is single-threaded: numpy without BLAS,
    OpenSSL, cbor2) is what a party's own machine would spend, and it does not count time
    this process waited for the CPU while other processes ran on the same cores.
    """

    def __init__(self) -> None:
        self.stages: dict[str, float] = defaultdict(float)
        self.wall = 0.0

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] += time.thread_time() - start
            self.wall += time.perf_counter() - wall

    @property
    def total(self) -> float:
        return sum(self.stages.values())


@dataclass
class Link:
    """The channel between one participant and the coordinator: seal and open both ways."""

    participant: Identity
    coordinator: Identity
    session: str
    channel: bytes = field(default_factory=lambda: os.urandom(32))
    seq_up: int = 0
    seq_down: int = 0
    guard_up: ReplayGuard = field(default_factory=ReplayGuard)
    guard_down: ReplayGuard = field(default_factory=ReplayGuard)
    sent: int = 0  # bytes of the participant's frames
    received: int = 0  # bytes of the coordinator's frames to it
    round_start_len: int = 0

    def _seal(self, who: Identity, seq: int, msg: messages.Message) -> bytes:
        return seal(
            who,
            channel=self.channel,
            type=msg.TYPE,
            seq=seq,
            payload=messages.payload(msg),
            ts=time.time(),
            session=self.session,
        )

    def up(self, msg: messages.Message) -> bytes:
        self.seq_up += 1
        frame = self._seal(self.participant, self.seq_up, msg)
        self.sent += len(frame)
        return frame

    def down(self, msg: messages.Message) -> bytes:
        self.seq_down += 1
        frame = self._seal(self.coordinator, self.seq_down, msg)
        self.received += len(frame)
        if self.seq_down == 1:
            self.round_start_len = len(frame)
        return frame

    def _open(self, frame: bytes, who: Identity, guard: ReplayGuard) -> messages.Message:
        env = open_frame(
            frame,
            channel=self.channel,
            sender_peer_id=who.peer_id,
            sender_public_key=who.public_key,
        )
        guard.check(env, time.time())
        check_size(env.type, env.size)
        return messages.parse(env.type, env.payload)

    def open_up(self, frame: bytes) -> messages.Message:
        """The coordinator opens a participant's frame."""
        return self._open(frame, self.participant, self.guard_up)

    def open_down(self, frame: bytes) -> messages.Message:
        """The participant opens a coordinator's frame."""
        return self._open(frame, self.coordinator, self.guard_down)


def k_log(n: int, factor: float = 1.0) -> int:
    """The smallest even k >= factor * log2(n)."""
    k = math.ceil(factor * math.log2(n) - 1e-9)
    return k + (k % 2)


def compact_bits(n: int, clip: float, max_weight: int) -> int:
    """The smallest bits in [32, 64] that leaves >= 16 fraction bits for n participants."""
    for bits in range(32, 65):
        try:
            if secagg.frac_bits_for(bits, clip, max_weight, n) >= FRAC_BITS_WANTED:
                return bits
        except secagg.SecAggError:
            continue
    raise SystemExit(f"no bits <= 64 leaves {FRAC_BITS_WANTED} fraction bits for n = {n}")


# ---------------------------------------------------------------------------------------------
# the round's inputs (what training produced; identical for both rounds)


@dataclass
class Inputs:
    d: int
    n: int
    shapes: dict[str, tuple[int, ...]]
    ids: list[Identity]
    coordinator: Identity
    updates: list[weights.Weights]
    examples: list[int]
    losses: list[float]
    global_w: weights.Weights
    model_bytes: bytes
    model_cid: str
    session: str = "s-bench0secagg"
    round: int = 1
    block_frame_len: int | None = None  # the model's block frame, sealed once (see below)


def make_inputs(d: int, n: int, people: list[Identity], coordinator: Identity) -> Inputs:
    shapes = {"fc.weight": (d - 10,), "fc.bias": (10,)} if d > 10 else {"fc.bias": (d,)}
    rng = np.random.default_rng(d * 1000 + n)
    # A model of weights ~ N(0, 0.05) and updates ~ N(0, 0.02): a participant's model is g
    # plus its update, as after local training (the demo's largest |w - g| is 0.3).
    global_w = {k: rng.normal(0.0, 0.05, size=s).astype(np.float32) for k, s in shapes.items()}
    updates = [
        {
            k: (global_w[k] + rng.normal(0.0, 0.02, size=s)).astype(np.float32)
            for k, s in shapes.items()
        }
        for _ in range(n)
    ]
    model_bytes = weights.to_bytes(global_w)
    return Inputs(
        d=d,
        n=n,
        shapes=shapes,
        ids=sorted(people[:n], key=lambda i: i.peer_id),
        coordinator=coordinator,
        updates=updates,
        examples=[int(v) for v in rng.integers(50, 5000, size=n)],
        losses=[float(v) for v in rng.uniform(0.1, 2.0, size=n)],
        global_w=global_w,
        model_bytes=model_bytes,
        model_cid=file_cid(model_bytes),
    )


def _round_start(inp: Inputs, round_spec: dict[str, Any], sec: dict[str, Any]) -> messages.Message:
    return messages.RoundStart(
        round=inp.round, model_cid=inp.model_cid, spec=round_spec, deadline_s=300.0, secagg=sec
    )


def _model_transfer(inp: Inputs, link: Link) -> None:
    """fetch -> block: identical in both rounds; counted in bytes, not in time.

    The block (the whole model) is sealed and opened for real once per Inputs; its frame has
    the same length on every link (same sender, session, sequence number 2 and payload), so
    the other links count that length and step their sequence numbers: it saves a seal and
    an open of d float32 per participant and round, a minute of the full matrix.
    """
    link.open_up(link.up(messages.Fetch(cid=inp.model_cid)))
    block = messages.Block(cid=inp.model_cid, data=inp.model_bytes)
    if inp.block_frame_len is None or link.seq_down != 1:
        link.open_down(link.down(block))
        if link.seq_down == 2:
            inp.block_frame_len = link.received - link.round_start_len
        return
    link.seq_down += 1
    link.guard_down.last_seq = link.seq_down
    link.received += inp.block_frame_len


# ---------------------------------------------------------------------------------------------
# the plain round


def plain_round(inp: Inputs) -> dict[str, Any]:
    round_spec = spec.validate({"aggregation": {"strategy": "fedavg"}})
    coord = Timer()
    parts = [Timer() for _ in range(inp.n)]
    links = [Link(u, inp.coordinator, inp.session) for u in inp.ids]
    updates: list[ClientUpdate] = []
    for i, (link, t) in enumerate(zip(links, parts, strict=True)):
        with coord("seal round_start"):
            frame = link.down(_round_start(inp, round_spec, {}))
        with t("open round_start"):
            task = link.open_down(frame)
            spec.validate(task.spec)
        _model_transfer(inp, link)
        w = inp.updates[i]
        with t("to_bytes"):
            out = weights.to_bytes(w)
        with t("file_cid"):
            cid = file_cid(out)
        with t("seal update"):
            frame = link.up(
                messages.Update(
                    round=inp.round,
                    base_cid=inp.model_cid,
                    num_examples=inp.examples[i],
                    loss=inp.losses[i],
                    train_s=0.0,
                    update_cid=cid,
                    data=out,
                )
            )
        # fednode/session.py on_update (checks) and _collect_plain (decode)
        with coord("open update"):
            msg = link.open_up(frame)
        with coord("check base and cid"):
            if msg.base_cid != inp.model_cid or file_cid(msg.data) != msg.update_cid:
                raise SystemExit("plain round: the update does not hash to its update_cid")
        with coord("decode safetensors"):
            decoded = weights.from_bytes(msg.data, expect=inp.shapes)
        updates.append(ClientUpdate(link.participant.peer_id, decoded, msg.num_examples, msg.loss))
    with coord("fedavg"):
        new, _ = get_strategy("fedavg").aggregate(inp.global_w, updates, {})
    return {
        "average": weights.flatten(new, inp.shapes),
        **_summary(parts, coord, links),
    }


# ---------------------------------------------------------------------------------------------
# the secure round


def secure_round(
    inp: Inputs, k: int, bits: int, max_weight: int, clip: float = secagg.DEFAULT_CLIP
) -> dict[str, Any]:
    agg = {
        "strategy": "fedavg",
        "secure": True,
        "neighbours": k or "all",
        "bits": bits,
        "clip": clip,
        "max_weight": max_weight,
    }
    # max_participants = n: the spec's fixed-point check is for this round's n
    round_spec = spec.validate({"max_participants": inp.n, "aggregation": agg})
    n = inp.n
    coord = Timer()
    parts = [Timer() for _ in range(n)]
    links = {u.peer_id: Link(u, inp.coordinator, inp.session) for u in inp.ids}
    timers = dict(zip(links, parts, strict=True))
    index = {u: i for i, u in enumerate(links)}
    tag = hashlib.sha256(f"fednode/secagg/{inp.session}/{inp.round}".encode()).digest()

    # fednode/secure_round.py: params from the spec, the round's wire form with the roster
    with coord("params, Server"):
        params = secagg.params_from_spec(round_spec["aggregation"], n, tag, os.urandom(32))
        dim = sum(int(np.prod(s)) for s in inp.shapes.values()) + 1
        server = secagg.Server(params, dim)
        base = weights.flatten(inp.global_w, inp.shapes)  # the model it published
        wire = {**secagg.params_to_wire(params), "participants": list(links)}
    clients: dict[str, secagg.Client] = {}
    their: dict[str, secagg.Params] = {}  # each participant's params, as it read them
    for u, link in links.items():
        t = timers[u]
        with coord("seal round_start"):
            frame = link.down(_round_start(inp, round_spec, wire))
        with t("open round_start"):
            task = link.open_down(frame)
            spec.validate(task.spec)
            their[u] = p = secagg.params_from_wire(task.secagg)
        _model_transfer(inp, link)
        with t("advertise"):
            clients[u] = secagg.Client(u, p)
            frame = link.up(messages.SecaggKeys(round=inp.round, **clients[u].advertise()))
        with coord("open + on_advertise"):
            msg = link.open_up(frame)
            server.on_advertise(u, {"c_pk": msg.c_pk, "s_pk": msg.s_pk})

    with coord("roster + seal"):
        roster = server.roster()
        frames = {
            u: links[u].down(messages.SecaggRoster(round=inp.round, roster=roster)) for u in links
        }
    for u, link in links.items():
        with timers[u]("share_keys"):
            msg = link.open_down(frames[u])
            shares = clients[u].share_keys(msg.roster)
            frame = link.up(messages.SecaggShares(round=inp.round, shares=shares))
        with coord("open + on_shares"):
            msg = link.open_up(frame)
            server.on_shares(u, msg.shares)

    with coord("relay + seal"):
        relayed = server.relay()
        frames = {
            u: links[u].down(messages.SecaggRelay(round=inp.round, shares=cts))
            for u, cts in relayed.items()
        }
    for u, link in links.items():
        t, i, p = timers[u], index[u], their[u]
        with t("open relay"):
            relay = link.open_down(frames[u])
        with t("encode_update"):
            # fednode/participant.py: the update against the model it trained from
            g = weights.flatten(weights.from_bytes(inp.model_bytes, expect=inp.shapes), inp.shapes)
            flat = weights.flatten(inp.updates[i], inp.shapes)
            x, clipped = secagg.encode_update(flat, g, min(inp.examples[i], p.max_weight), p)
            if clipped:
                raise SystemExit(f"{clipped} coordinates of an update reached clip {p.clip}")
        with t("masked_input"):
            y = clients[u].masked_input(relay.shares, x)
        with t("pack"):
            data = secagg.pack(y, p)
        with t("seal masked"):
            frame = link.up(
                messages.SecaggMasked(round=inp.round, data=data, loss=inp.losses[i], train_s=0.0)
            )
        del x, y, data, flat, g
        with coord("open masked"):
            msg = link.open_up(frame)
        with coord("unpack + on_masked"):
            want = secagg.packed_size(dim, params)
            if len(msg.data) != want:
                raise SystemExit(f"secagg_masked of {len(msg.data)} bytes, expected {want}")
            server.on_masked(u, secagg.unpack(msg.data, dim, params))
        del msg, frame

    with coord("unmask request + seal"):
        survivors, dropped = server.unmask_request()
        frames = {
            u: links[u].down(
                messages.SecaggUnmaskRequest(round=inp.round, survivors=survivors, dropped=dropped)
            )
            for u in survivors
        }
    for u in survivors:
        link = links[u]
        with timers[u]("unmask"):
            req = link.open_down(frames[u])
            out = clients[u].unmask(req.survivors, req.dropped)
            frame = link.up(messages.SecaggUnmask(round=inp.round, b=out["b"], s=out["s"]))
        with coord("open + on_unmask"):
            msg = link.open_up(frame)
            server.on_unmask(u, {"b": msg.b, "s": msg.s})

    with coord("result (reconstruct + unmask)"):
        total = server.result()
    with coord("decode"):
        weight, average = secagg.decode_average(total, base, params)
        new = weights.unflatten(average, inp.shapes)
    expected_masked = n * secagg.packed_size(dim, params)
    if server.stats["in"]["masked"] != expected_masked:
        raise SystemExit(
            f"Server.stats counts {server.stats['in']['masked']} masked bytes, expected "
            f"{expected_masked}"
        )
    return {
        "average": weights.flatten(new, inp.shapes),
        "weight": weight,
        "params": {
            "bits": params.bits,
            "frac_bits": params.frac_bits,
            "clip": params.clip,
            "max_weight": params.max_weight,
            "value_bytes": secagg.value_bytes(params),
            "neighbours": params.neighbours,
            "threshold": params.threshold,
        },
        **_summary(parts, coord, list(links.values())),
    }


def _summary(parts: list[Timer], coord: Timer, links: list[Link]) -> dict[str, Any]:
    totals = [t.total for t in parts]
    stages = sorted({s for t in parts for s in t.stages})
    return {
        "participant_s": statistics.median(totals),
        "participant_max_s": max(totals),
        "participant_stages_s": {s: statistics.median(t.stages[s] for t in parts) for s in stages},
        "participant_wall_s": statistics.median(t.wall for t in parts),
        "coordinator_s": coord.total,
        "coordinator_wall_s": coord.wall,
        "coordinator_stages_s": dict(coord.stages),
        "sent_bytes": statistics.median(lk.sent for lk in links),
        "received_bytes": statistics.median(lk.received for lk in links),
        "participants_timed": len(parts),
    }


# ---------------------------------------------------------------------------------------------
# the matrix


def check_average(plain: dict, sec: dict, inp: Inputs) -> float:
    """Fail loudly unless the unmasked average is the plain one within the fixed-point error."""
    f = sec["params"]["frac_bits"]
    a, b = plain["average"], sec["average"]
    if sec["weight"] != sum(min(e, sec["params"]["max_weight"]) for e in inp.examples):
        raise SystemExit(f"secure round: the sum of weights {sec['weight']} is wrong")
    err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    # each participant's rounding is <= 2**-(f+1), so is their weighted mean; then float32
    tol = 2.0 ** -(f + 1) + 2 * float(np.spacing(np.float32(np.max(np.abs(a)))))
    if not err <= tol:
        raise SystemExit(
            f"FAILED: d={inp.d} n={inp.n}: the unmasked average is off the plain FedAvg by "
            f"{err:.3g}, more than the fixed-point error {tol:.3g} (frac_bits {f})"
        )
    return err


def repeats(d: int, n: int, k: int, override: int | None) -> int:
    """Runs per configuration: 5 for d <= 10^5; 3 at d = 10^6; 1 for its complete graph
    at n >= 50 (tens of seconds each). The run with the median round time is reported."""
    if override:
        return override
    if d <= 10**5:
        return 5
    return 1 if k == 0 and n >= 50 else 3


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose round time is the median one (the lower median for an even count)."""
    ranked = sorted(runs, key=lambda r: r["participant_s"] + r["coordinator_s"])
    out = dict(ranked[(len(ranked) - 1) // 2])
    out["runs"] = len(runs)
    out["round_s_all"] = [r["participant_s"] + r["coordinator_s"] for r in runs]
    return out


def warm_up(coordinator: Identity, people: list[Identity]) -> None:
    """One small plain and secure round first: imports, caches and allocator warm."""
    inp = make_inputs(1000, 3, people, coordinator)
    plain_round(inp)
    secure_round(inp, 0, secagg.DEFAULT_BITS, secagg.MAX_WEIGHT)


def run(args: argparse.Namespace, log=sys.stderr) -> dict[str, Any]:
    coordinator = Identity.generate()
    people = [Identity.generate() for _ in range(max(args.ns))]
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    load_start = os.getloadavg()
    warm_up(coordinator, people)
    for d in args.dims:
        for n in args.ns:
            inp = make_inputs(d, n, people, coordinator)
            gc.collect()
            plain = median_run([plain_round(inp) for _ in range(repeats(d, n, 1, args.repeat))])
            print(
                f"d={d:>9,} n={n:>3} plain: participant {plain['participant_s'] * 1e3:8.1f} ms, "
                f"coordinator {plain['coordinator_s'] * 1e3:8.1f} ms",
                file=log,
                flush=True,
            )
            for setting in args.settings:
                bits = setting["bits"] or compact_bits(n, setting["clip"], setting["max_weight"])
                for variant in args.variants:
                    k = {"secagg": 0, "secagg+": k_log(n), "secagg+2log": k_log(n, 2.0)}[variant]
                    if k >= n - 1:
                        k = 0  # the graph would be complete anyway
                    runs, errs = [], []
                    for _ in range(repeats(d, n, k, args.repeat)):
                        gc.collect()
                        sec = secure_round(inp, k, bits, setting["max_weight"], setting["clip"])
                        errs.append(check_average(plain, sec, inp))  # every run is checked
                        runs.append(sec)
                    sec = median_run(runs)
                    row = {
                        "d": d,
                        "n": n,
                        "variant": variant,
                        "setting": setting["label"],
                        "k": k,
                        **sec["params"],
                        "max_abs_error": max(errs),
                        "plain": {key: v for key, v in plain.items() if key != "average"},
                        "secure": {
                            key: v for key, v in sec.items() if key not in ("average", "params")
                        },
                    }
                    _ratios(row)
                    rows.append(row)
                    print("  " + _line(row), file=log, flush=True)
            del inp, plain
    return {
        "ok": True,
        "definitions": DEFINITIONS,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_s": time.perf_counter() - t_all,
        "loadavg_start_end": [load_start, os.getloadavg()],  # other processes on the cores
        "rows": rows,
        "goal": goal(rows),
    }


def _ratios(row: dict[str, Any]) -> None:
    p, s = row["plain"], row["secure"]
    p["round_s"] = p["participant_s"] + p["coordinator_s"]
    s["round_s"] = s["participant_s"] + s["coordinator_s"]
    row["bytes_ratio"] = s["sent_bytes"] / p["sent_bytes"]
    row["time_ratio"] = s["round_s"] / p["round_s"]


def goal(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        if (row["d"], row["n"], row["variant"]) != (GOAL["d"], GOAL["n"], GOAL["variant"]):
            continue
        out.append(
            {
                "setting": row["setting"],
                "bits": row["bits"],
                "max_weight": row["max_weight"],
                "clip": row["clip"],
                "k": row["k"],
                "bytes_ratio": row["bytes_ratio"],
                "time_ratio": row["time_ratio"],
                "bytes_ok": row["bytes_ratio"] <= GOAL["bytes_ratio"],
                "time_ok": row["time_ratio"] <= GOAL["time_ratio"],
            }
        )
    return out


def machine() -> dict[str, Any]:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    model = None
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            None,
        )
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": version("torch"),
        "cryptography": version("cryptography"),
        "cbor2": version("cbor2"),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------------------
# output


def _b(x: float) -> str:
    return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} kB"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def _line(row: dict[str, Any]) -> str:
    s, p = row["secure"], row["plain"]
    return (
        f"{row['variant']:<11} k={row['k']:<2} {row['setting']:<8} bits {row['bits']} "
        f"({row['value_bytes']} B/value, f={row['frac_bits']}): participant "
        f"{_ms(s['participant_s'])} ms, coordinator {_ms(s['coordinator_s'])} ms, sent "
        f"{_b(s['sent_bytes'])}; x{row['bytes_ratio']:.3f} bytes, x{row['time_ratio']:.2f} "
        f"time vs plain {_ms(p['round_s'])} ms"
    )


def print_table(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, numpy {m['numpy']}, "
        f"torch {m['torch']} (not used), cryptography {m['cryptography']}, cbor2 {m['cbor2']}"
    )
    print("definitions: " + res["definitions"])
    print(
        "variants: secagg = complete graph (neighbours = 0); secagg+ = k-regular graph with "
        "k = the smallest even number >= log2(n); secagg+2log = k >= 2 log2(n), what "
        "docs/secure-aggregation.md recommends. settings: default = the spec's bits 40, clip 8, "
        "max_weight 2**16; old-62 = the previous defaults, bits 62, clip 100, max_weight 2**20; "
        "compact = the smallest bits leaving >= 16 fraction bits for that n. Every setting "
        "masks the update w - g, as the product does. Training excluded (identical in both)."
    )
    head = (
        "| d | n | variant | k | setting | bits (B/value, frac) | participant ms "
        "secure / plain | coordinator ms secure / plain | round ms secure / plain | "
        "time ratio | sent per participant secure / plain | bytes ratio | received secure / "
        "plain |"
    )
    print(head)
    print("|" + "---|" * 13)
    for r in res["rows"]:
        s, p = r["secure"], r["plain"]
        print(
            f"| {r['d']:,} | {r['n']} | {r['variant']} | {r['k']} | {r['setting']} "
            f"(clip {r['clip']:g}, mw 2^{int(math.log2(r['max_weight']))}) | {r['bits']} "
            f"({r['value_bytes']}, "
            f"{r['frac_bits']}) | {_ms(s['participant_s'])} / {_ms(p['participant_s'])} | "
            f"{_ms(s['coordinator_s'])} / {_ms(p['coordinator_s'])} | {_ms(s['round_s'])} / "
            f"{_ms(p['round_s'])} | {r['time_ratio']:.2f} | {s['sent_bytes']:,.0f} / "
            f"{p['sent_bytes']:,.0f} | {r['bytes_ratio']:.4f} | {s['received_bytes']:,.0f} / "
            f"{p['received_bytes']:,.0f} |"
        )

    def stages(st: dict[str, float]) -> str:
        return ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(st.items(), key=lambda kv: -kv[1]))

    shown_plain = False
    for r in res["rows"]:
        if (r["d"], r["n"]) != (GOAL["d"], GOAL["n"]):
            continue
        if not shown_plain:
            shown_plain = True
            print(f"\nwhere the time goes, d={r['d']:,} n={r['n']} plain:")
            print(f"  participant (ms, medians): {stages(r['plain']['participant_stages_s'])}")
            print(f"  coordinator (ms): {stages(r['plain']['coordinator_stages_s'])}")
        print(
            f"where the time goes, d={r['d']:,} n={r['n']} {r['variant']} {r['setting']} "
            f"bits {r['bits']}:"
        )
        print(f"  participant (ms, medians): {stages(r['secure']['participant_stages_s'])}")
        print(f"  coordinator (ms): {stages(r['secure']['coordinator_stages_s'])}")
    print(
        f"\ngoal at d = {GOAL['d']:,}, n = {GOAL['n']}, SecAgg+ (k = smallest even >= log2 n): "
        f"<= {GOAL['bytes_ratio']}x the bytes and <= {GOAL['time_ratio']}x the time of a plain "
        "round"
    )
    if not res["goal"]:
        print("  (not in this run's matrix)")
    for g in res["goal"]:
        verdict = "MET" if g["bytes_ok"] and g["time_ok"] else "NOT MET"
        over = []
        if not g["bytes_ok"]:
            over.append(
                f"bytes {100 * (g['bytes_ratio'] / GOAL['bytes_ratio'] - 1):.2f} % over the target"
            )
        if not g["time_ok"]:
            over.append(
                f"time {100 * (g['time_ratio'] / GOAL['time_ratio'] - 1):.2f} % over the target"
            )
        print(
            f"  {g['setting']:<8} bits {g['bits']} (clip {g['clip']:g}, max_weight "
            f"2^{int(math.log2(g['max_weight']))})"
            f", k = {g['k']}: bytes x{g['bytes_ratio']:.4f}, "
            f"time x{g['time_ratio']:.2f}: {verdict}" + (f" ({'; '.join(over)})" if over else "")
        )
    (l0, _, _), (l1, _, _) = res["loadavg_start_end"]
    print(
        f"\n{len(res['rows'])} configurations in {res['total_s']:.0f} s (1-minute load average "
        f"{l0:.2f} at the start, {l1:.2f} at the end)"
    )


OLD_DEFAULTS = {"bits": 62, "max_weight": 2**20, "clip": 100.0}  # before deltas were masked


def parse_setting(text: str) -> dict[str, Any]:
    """``BITS:MAX_WEIGHT[:CLIP]``; BITS = auto for the smallest with >= 16 fraction bits."""
    try:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise ValueError
        bits = 0 if parts[0] == "auto" else int(parts[0])
        mw = int(parts[1])
        clip = float(parts[2]) if len(parts) == 3 else secagg.DEFAULT_CLIP
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BITS:MAX_WEIGHT[:CLIP]") from None
    if mw < 1 or mw > 2**30 or (bits and not 32 <= bits <= 64) or not 1e-3 <= clip <= 1e6:
        raise argparse.ArgumentTypeError(
            f"{text!r}: bits in [32, 64] or auto, 1 <= max_weight <= 2**30, clip in [1e-3, 1e6]"
        )
    this = {"bits": bits, "max_weight": mw, "clip": clip}
    if not bits:
        label = "compact"
    elif this == {"bits": secagg.DEFAULT_BITS, "max_weight": secagg.MAX_WEIGHT,
                  "clip": secagg.DEFAULT_CLIP}:  # fmt: skip
        label = "default"
    elif this == OLD_DEFAULTS:
        label = "old-62"
    else:
        label = "custom"
    return {**this, "label": label}


# ---------------------------------------------------------------------------------------------
# how large an update is: what the default clip must cover (--deltas)

DELTA_RUNS: list[tuple[str, int, dict[str, dict[str, Any]]]] = [
    ("demo default spec", 3, {}),
    ("demo default spec", 5, {}),
    ("demo default spec", 10, {}),
    ("benchmark task, H = 128", 3, {}),
    ("benchmark task, H = 128", 10, {}),
    ("benchmark task, H = 1024", 3, {"model": {"hidden": [1024, 1024]}}),
    ("demo spec, partition dirichlet (alpha 0.5)", 5, {"data": {"partition": "dirichlet"}}),
    ("demo spec, partition label_skew (2 classes each)", 5, {"data": {"partition": "label_skew"}}),
    ("demo spec, 10 local epochs", 3, {"training": {"local_epochs": 10}}),
    ("demo spec, adam lr 0.001", 3, {"training": {"optimizer": "adam", "lr": 0.001}}),
    ("demo spec, adam lr 0.05", 3, {"training": {"optimizer": "adam", "lr": 0.05}}),
    ("demo spec, sgd lr 0.5 (diverges)", 3, {"training": {"lr": 0.5}}),
]
# the benchmark task (docs/benchmarks.md): pixels/16, 1 local epoch, batch 32, SGD lr 0.05,
# no momentum
BENCHMARK_TASK = {
    "data": {"features": "scale16", "partition": "iid"},
    "training": {"local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.0},
}


def _fedavg_loop(raw: dict[str, Any], n: int, rounds: int, p: secagg.Params | None) -> dict:
    """``rounds`` of FedAvg on the digits shards, as the nodes train; secure if ``p``.

    Participants train with fednode.training and the shuffle seeds fednode/participant.py
    uses; with ``p``, each encodes its update with secagg.encode_update and the sum is
    decoded with secagg.decode_average (the masks are left out: they cancel exactly).
    """
    import torch

    from fednode import training
    from fednode.data import load_eval, load_partition
    from fednode.participant import shuffle_seed
    from fednode.session import model_spec

    torch.set_num_threads(1)
    sp = spec.validate(raw)
    mspec, d, t = model_spec(sp), sp["data"], sp["training"]
    shapes = training.expected_shapes(mspec)
    g = training.init_weights(mspec, sp["model"]["seed"])
    parts = [
        load_partition(
            f"digits:{k}/{n}",
            features=d["features"],
            partition=d["partition"],
            seed=d["seed"],
            alpha=d["alpha"],
            labels_per_part=d["labels_per_part"],
        )
        for k in range(n)
    ]
    ev = load_eval("digits", features=d["features"], seed=d["seed"])
    biggest, clipped = [], 0
    for r in range(1, rounds + 1):
        results = []
        for k in range(n):
            cfg = training.TrainConfig(
                local_epochs=t["local_epochs"],
                batch_size=t["batch_size"],
                lr=t["lr"],
                optimizer=t["optimizer"],
                momentum=t["momentum"],
                weight_decay=t["weight_decay"],
                seed=shuffle_seed(d["seed"], r, f"participant-{k}"),
            )
            results.append(training.train(mspec, g, parts[k], cfg))
        base = weights.flatten(g, shapes)
        flats = [weights.flatten(res.weights, shapes) for res in results]
        biggest.append(max(float(np.max(np.abs(f - base))) for f in flats))
        if p is None:
            ups = [ClientUpdate(f"p{k}", res.weights, res.num_examples, res.loss)
                   for k, res in enumerate(results)]  # fmt: skip
            g, _ = get_strategy("fedavg").aggregate(g, ups, {})
        else:
            total = np.zeros(base.size + 1, dtype=np.uint64)
            for f, res in zip(flats, results, strict=True):
                x, cut = secagg.encode_update(f, base, min(res.num_examples, p.max_weight), p)
                clipped += cut
                total = secagg.add_mod(total, x, p)
            g = weights.unflatten(secagg.decode_average(total, base, p)[1], shapes)
    acc, _ = training.evaluate(mspec, g, ev)
    worst = int(np.argmax(biggest))
    return {"max_delta": biggest[worst], "round": worst + 1, "accuracy": acc, "clipped": clipped}


def measure_deltas(rounds: int = 10) -> list[dict[str, Any]]:
    """The largest |w - g| per coordinate over ``rounds``, and FedAvg through the defaults.

    Each training runs twice: plain FedAvg (whose updates are measured), and with every
    update encoded at the spec's defaults with the fraction bits of n = 100 (13, the
    coarsest the defaults give up to 100 participants), to show that the fixed point does
    not change the accuracy and that the default clip cuts nothing.
    """
    p = secagg.Params(round_tag=b"deltas")  # bits 40, frac_bits 13, clip 8, max_weight 2**16
    out = []
    for name, n, extra in DELTA_RUNS:
        raw = json.loads(json.dumps(BENCHMARK_TASK)) if name.startswith("benchmark") else {}
        for section, fields in extra.items():
            raw.setdefault(section, {}).update(fields)
        plain = _fedavg_loop(raw, n, rounds, None)
        sec = _fedavg_loop(raw, n, rounds, p)
        row = {"training": name, "participants": n, **plain, "secure_accuracy": sec["accuracy"]}
        row["secure_clipped"] = sec["clipped"]
        out.append(row)
        print(
            f"{name:<48} n={n:<3} max |w - g| {plain['max_delta']:8.4f} (round "
            f"{plain['round']:>2}), accuracy plain {plain['accuracy']:.4f}, through the "
            f"defaults {sec['accuracy']:.4f} ({sec['clipped']} coordinates clipped)",
            file=sys.stderr,
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    ap.add_argument("--ns", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument(
        "--settings",
        type=parse_setting,
        nargs="+",
        default=[parse_setting("40:65536:8"), parse_setting("62:1048576:100")],
        help="BITS:MAX_WEIGHT[:CLIP] (clip default 8), BITS = auto for the smallest with >= 16 "
        "fraction bits (default: 40:65536:8, the spec's defaults, and 62:1048576:100, the "
        "previous ones)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per configuration (default: 5 for d <= 10^5, 3 at 10^6, 1 for the "
        "complete graph at d = 10^6 and n >= 50); the median round is reported",
    )
    ap.add_argument("--quick", action="store_true", help="d = 10^4, 10^5 and n = 10 only")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument(
        "--deltas",
        action="store_true",
        help="instead: train 10 rounds of the demo's spec, the benchmark task and harder "
        "variants; print the largest |w - g| per coordinate (what clip must cover) and the "
        "accuracy of plain FedAvg against FedAvg through the default fixed point",
    )
    args = ap.parse_args(argv)
    if args.deltas:
        rows = measure_deltas()
        if args.json:
            print(json.dumps({"ok": True, "rows": rows}))
        return 0
    if args.quick:
        args.dims, args.ns = [10**4, 10**5], [10]
    if min(args.ns) < 3 or min(args.dims) < 1:
        ap.error("--ns must be >= 3 and --dims >= 1")
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
