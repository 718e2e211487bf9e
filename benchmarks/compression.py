"""Update compression: uplink bytes and final accuracy of every codec, against identity.

    .venv/bin/python benchmarks/compression.py                  # the full grid (14 min)
    .venv/bin/python benchmarks/compression.py --models cnn     # the CNN's part (~6 min)
    .venv/bin/python benchmarks/compression.py --quick          # a small grid, a smoke check
    .venv/bin/python benchmarks/compression.py --models mlp128 --n 3 --codecs identity,topk0.01

A federation in one process, through the code a coordinator and its participants run, as
benchmarks/robustness.py does: every participant trains from the round's model g with
fednode.training on its IID digits shard; a delta codec's participant passes ``w - g``
through its own fednode.codecs.feedback.ErrorFeedback (one per participant, kept across
rounds, as fednode.uplink keeps it in the participant's ledger) with the round's
CodecParams (the spec's ``[compression]`` and ``round_seed`` of the session, round and
model CID); the coordinator decodes each update's bytes with the codec (fednode.session
``_decode``: ``g + D(bytes)``), bounds the updates with fednode.rounds.bound_updates and
aggregates them with the spec's strategy (FedAvg). identity sends the trained weights as
safetensors, as updates did before codecs.

Secure rounds with randk (``randk…+secagg``) run the participant's and the coordinator's
steps of fednode.participant / fednode.secure_round: the update clipped to
max_update_norm, the round's shared coordinates (fednode.codecs.randk.coordinates) of
``w - g + residual`` selected through the same ErrorFeedback, clipped again, encoded with
protocol.secagg.encode_update against ``g`` at those coordinates with the weight the
coordinator assigns (fednode.rounds.secure_weights); the sum modulo 2**bits is decoded
with decode_average and the strategy steps with ``from_mean``. The pairwise masks are left
out: they cancel exactly in that modular sum, so the unmasked total is this sum bit for
bit (benchmarks/secagg.py measures the masking itself). The uplink figure of a secure row
is the masked vector's size, protocol.secagg.packed_size(k + 1) for k coordinates and the
weight slot; the key agreement and share messages of a secure round (a few hundred bytes
per neighbour, independent of the model) are not counted. ``fixed-point error`` is the
largest difference, over all rounds and coordinates, between the decoded mean and the
same weighted mean in float64.

What is left out of a real session: the wire (signatures, CIDs, timing) and the
coordinator's publish check (a loss jump rolls the round back); neither changes a figure
here unless a round diverges.

Uplink bytes: the length of each update's bytes (what ``update.data`` carries), averaged
over all updates of the run; the reference is the update as raw float32 values, 4 bytes
per parameter ("NNx fewer"); identity's safetensors is that plus its header. Accuracy: the
final global model's on the digits test split (the CNN: every participant's held-out t10k
images together), after ``--rounds`` rounds; the difference is in points from identity in
the same run (same model, N, data, seeds).

Models: ``mlp128`` / ``mlp1024``, the project's benchmark MLP 64 -> H -> H -> 10 on digits
(features standardised), the spec's default training (2 local epochs, batch 32, SGD lr 0.05
momentum 0.9); ``cnn``, examples/mnist-cnn-idx/spec.toml as it is (its CNN, Adam lr 0.001,
1 epoch, batch 64) on the digits drawn as 28x28 images by that example's make_data.py, read
through the idx source as its participants read them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode import bounds, data, rounds, training, weights
from fednode.codecs import CodecParams, get_codec, randk, round_seed
from fednode.codecs.feedback import ErrorFeedback
from fednode.data import Dataset
from fednode.schema import Schema
from fednode.session import model_spec
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate
from protocol import plugins, secagg
from protocol import spec as specmod
from protocol.cid import file_cid

ROOT = Path(__file__).resolve().parents[1]
SESSION = "bench-compression"  # the session ID every round seed is derived from
CNN_EXAMPLE = ROOT / "examples" / "mnist-cnn-idx"
MODELS = ("mlp128", "mlp1024", "cnn")
GOAL_RATIO, GOAL_LOSS = 50.0, 1.0  # >= 50x fewer uplink bytes, <= 1 point lost
SECURE_RATIO, SECURE_LOSS = 10.0, 2.0  # randk under SecAgg+: >= 10x, <= 2 points


@dataclasses.dataclass(frozen=True)
class Case:
    """One codec setting: the spec's ``[compression]`` section, and whether rounds are
    secure (SecAgg+, randk only)."""

    codec: str
    settings: tuple[tuple[str, Any], ...] = ()
    secure: bool = False
    aggregation: tuple[tuple[str, Any], ...] = ()  # secure rows: the fixed point's settings

    def compression(self) -> dict[str, Any]:
        return {"codec": self.codec, **dict(self.settings)}


CASES: dict[str, Case] = {
    "identity": Case(plugins.IDENTITY_CODEC),
    "fp16": Case("fp16"),
    "bf16": Case("bf16"),
    "quantize8": Case("quantize", (("bits", 8),)),
    "quantize4": Case("quantize", (("bits", 4),)),
    "quantize2": Case("quantize", (("bits", 2),)),
    "topk0.1": Case("topk", (("fraction", 0.1),)),
    "topk0.01": Case("topk", (("fraction", 0.01),)),
    "topk_quantize0.01/8": Case("topk_quantize", (("fraction", 0.01), ("bits", 8))),
    "topk_quantize0.02/8": Case("topk_quantize", (("fraction", 0.02), ("bits", 8))),
    "topk_quantize0.02/4": Case("topk_quantize", (("fraction", 0.02), ("bits", 4))),
    "topk_quantize0.03/8": Case("topk_quantize", (("fraction", 0.03), ("bits", 8))),
    "topk_quantize0.04/4": Case("topk_quantize", (("fraction", 0.04), ("bits", 4))),
    "topk_quantize0.05/4": Case("topk_quantize", (("fraction", 0.05), ("bits", 4))),
    "topk_quantize0.06/2": Case("topk_quantize", (("fraction", 0.06), ("bits", 2))),
    "randk0.1": Case("randk", (("fraction", 0.1),)),
    "randk0.05": Case("randk", (("fraction", 0.05),)),
    "randk0.1+secagg": Case("randk", (("fraction", 0.1),), secure=True),
    "randk0.05+secagg": Case("randk", (("fraction", 0.05),), secure=True),
    # 10x needs 5 (k + 1) <= 4 d / 10: k just under 0.08 d (the weight slot is one value)
    "randk0.075+secagg": Case("randk", (("fraction", 0.075),), secure=True),
    # 32-bit arithmetic (4 bytes a value); max_weight 1024 (a digits shard has <= 479
    # examples) keeps 14 fraction bits for 10 participants
    "randk0.095+secagg/32bit": Case(
        "randk",
        (("fraction", 0.095),),
        secure=True,
        aggregation=(("bits", 32), ("max_weight", 1024)),
    ),
}
QUICK = {
    "models": ["mlp128"],
    "n": [3],
    "rounds": 3,
    "codecs": ["identity", "quantize8", "topk0.01", "randk0.1+secagg"],
}


# --- the task: spec, data ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    model: str
    n: int
    spec: dict[str, Any]  # validated, compression unset (identity)
    shards: list[Dataset]
    test: Dataset


def _raw_spec(model: str, n: int) -> dict[str, Any]:
    if model == "cnn":
        raw = tomllib.loads((CNN_EXAMPLE / "spec.toml").read_text())
        raw["min_participants"] = n
        return raw
    if model.startswith("mlp") and model[3:].isdigit():
        width = int(model[3:])
        return {"min_participants": n, "model": {"kind": "mlp", "hidden": [width, width]}}
    raise SystemExit(f"unknown model {model!r}: choose from {', '.join(MODELS)} or mlpH")


def case_spec(raw: dict[str, Any], case: Case) -> dict[str, Any]:
    """The session spec of one case, validated as a coordinator validates it (so a codec
    setting the spec refuses fails here, not silently)."""
    agg = {**raw.get("aggregation", {}), "secure": case.secure, **dict(case.aggregation)}
    return specmod.validate({**raw, "aggregation": agg, "compression": case.compression()})


@cache
def _example_data_module() -> ModuleType:
    """examples/mnist-cnn-idx/make_data.py, loaded by its path (it is not a package)."""
    loader = importlib.util.spec_from_file_location(
        "mnist_cnn_make_data", CNN_EXAMPLE / "make_data.py"
    )
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def load_task(model: str, n: int) -> Task:
    """The spec and every participant's shard; the test split the final model is scored on."""
    raw = _raw_spec(model, n)
    spec = case_spec(raw, CASES["identity"])
    feats = spec["data"]["features"]
    if model != "cnn":
        shards = [
            data.load_partition(f"digits:{k}/{n}", features=feats, partition="iid", seed=0)
            for k in range(n)
        ]
        test = data.load_eval("digits", features=feats, seed=0)
        assert test is not None
        return Task(model, n, raw, shards, test)
    schema = Schema.from_spec(spec)
    with tempfile.TemporaryDirectory(prefix="fednode-bench-") as tmp:
        folders = _example_data_module().write_participants(Path(tmp), n)
        parts = [data.load_split(f"idx:{f}", features=feats, schema=schema) for f in folders]
    test = Dataset(np.concatenate([p[1].x for p in parts]), np.concatenate([p[1].y for p in parts]))
    return Task(model, n, raw, [p[0] for p in parts], test)


# --- one run --------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    model: str
    n: int
    codec: str  # the CASES key
    rounds: int
    params: int  # d, the model's parameters
    float32_bytes: int  # 4 d: the reference
    bytes_per_update: float  # mean over all updates of the run
    accuracy: float
    seconds: float
    fixed_point_error: float | None = None  # secure rows only

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.bytes_per_update


def _delta(w: weights.Weights, g: weights.Weights) -> weights.Weights:
    return {k: np.asarray(w[k], np.float32) - g[k] for k in g}


def run(task: Task, name: str, n_rounds: int) -> Outcome:
    """``n_rounds`` rounds of the task's federation with the codec setting ``name``."""
    case = CASES[name]
    spec = case_spec(task.spec, case)
    mspec = model_spec(spec)
    comp, agg = spec["compression"], spec["aggregation"]
    codec = get_codec(comp["codec"])
    cfg = training.TrainConfig.of_spec(spec["training"])
    strategy = get_strategy(agg)
    g = training.init_weights(mspec, spec["model"]["seed"])
    shapes = weights.shapes(g)
    d = weights.num_params(g)
    feedback = codec.lossy and comp["error_feedback"]
    residuals = [ErrorFeedback() for _ in range(task.n)]  # one per participant, kept
    rngs = [np.random.default_rng(1000 + k) for k in range(task.n)]  # stochastic rounding
    peers = [f"p{k}" for k in range(task.n)]
    state: dict[str, np.ndarray] = {}
    sizes: list[int] = []
    fp_error = 0.0
    start = time.perf_counter()
    for r in range(1, n_rounds + 1):
        model_cid = file_cid(weights.to_bytes(g))  # what names the round's model
        params = CodecParams.of_spec(comp, round_seed(SESSION, r, model_cid))
        results = [
            training.train(mspec, g, task.shards[k], dataclasses.replace(cfg, seed=r))
            for k in range(task.n)
        ]
        claims = {p: res.num_examples for p, res in zip(peers, results, strict=True)}
        if case.secure:
            g, state, err = _secure_round(
                g, results, peers, claims, spec, params, residuals, rngs, sizes, r, state
            )
            fp_error = max(fp_error, err)
            continue
        updates = []
        for k, res in enumerate(results):
            # the participant (fednode.uplink.Uplink.encode)
            if not codec.on_delta:
                payload = codec.encode(res.weights, params, rngs[k])
            elif feedback:
                payload, _sent = residuals[k].step(
                    _delta(res.weights, g), codec, params, shapes, rngs[k]
                )
            else:
                payload = codec.encode(_delta(res.weights, g), params, rngs[k])
            sizes.append(len(payload))
            # the coordinator (fednode.session._decode): the bytes back to weights
            out = codec.decode(payload, shapes, params)
            w = {k2: g[k2] + out[k2] for k2 in g} if codec.on_delta else out
            updates.append(ClientUpdate(peers[k], w, res.num_examples, res.loss))
        bounded, _ = rounds.bound_updates(updates, g, claims, agg)
        g, state = strategy.aggregate(g, bounded, state)
    acc, _loss = training.evaluate(mspec, g, task.test)
    return Outcome(
        task.model,
        task.n,
        name,
        n_rounds,
        d,
        4 * d,
        float(np.mean(sizes)),
        float(acc),
        time.perf_counter() - start,
        fp_error if case.secure else None,
    )


def _secure_round(
    g: weights.Weights,
    results: Sequence[training.TrainResult],
    peers: list[str],
    claims: dict[str, int],
    spec: dict[str, Any],
    params: CodecParams,
    residuals: Sequence[ErrorFeedback],
    rngs: Sequence[np.random.Generator],
    sizes: list[int],
    round_no: int,
    state: dict[str, np.ndarray],
) -> tuple[weights.Weights, dict[str, np.ndarray], float]:
    """One secure randk round: the participants' inputs (fednode.participant's secure
    round), their sum modulo 2**bits, and the coordinator's decoding (fednode.secure_round).
    Returns the new model, the strategy's state and the fixed point's largest error."""
    agg, comp = spec["aggregation"], spec["compression"]
    codec = get_codec(comp["codec"])
    shapes = weights.shapes(g)
    base = weights.flatten(g, shapes)
    p = secagg.params_from_spec(agg, len(peers), f"round {round_no}".encode(), bytes(32))
    coords = randk.coordinates(base.size, comp["fraction"], params.seed)
    assigned = rounds.secure_weights(peers, claims, agg, p.max_weight)
    max_norm = float(agg["max_update_norm"])
    total = np.zeros(coords.size + 1, dtype=np.uint64)
    plain_sum = np.zeros(coords.size, dtype=np.float64)
    for k, res in enumerate(results):
        clipped, _norm, _scale = bounds.clip_update(res.weights, g, max_norm)
        delta = _delta(clipped, g)
        if comp["error_feedback"]:
            _bytes, sent = residuals[k].step(delta, codec, params, shapes, rngs[k])
            picked = weights.flatten(sent, shapes)[coords].astype(np.float64)
        else:
            picked = weights.flatten(delta, shapes)[coords].astype(np.float64)
        picked = bounds.clip_vector(picked, max_norm)
        x, _cut = secagg.encode_update(base[coords] + picked, base[coords], assigned[peers[k]], p)
        total = secagg.add_mod(total, x, p)
        plain_sum += assigned[peers[k]] * picked
        sizes.append(secagg.packed_size(coords.size + 1, p))  # the masked vector's bytes
    _weight, mean = secagg.decode_average(total, base[coords], p)
    err = float(np.max(np.abs(mean - base[coords] - plain_sum / sum(assigned.values()))))
    average = base.copy()
    average[coords] = mean
    # the strategy's step from the decoded mean, as fednode.secure_round takes it
    new, state = get_strategy(agg).from_mean(g, weights.unflatten(average, shapes), state)
    return new, state, err


# --- the grid and its table -----------------------------------------------------------------


def grid(
    models: Sequence[str], ns: Sequence[int], codecs: Sequence[str], n_rounds: int
) -> list[Outcome]:
    training.warm_up()  # torch's one-time costs, out of the first run's seconds
    out = []
    for model in models:
        for n in ns:
            task = load_task(model, n)
            names = ["identity"] + [c for c in codecs if c != "identity"]
            ref = None
            for name in names:
                o = run(task, name, n_rounds)
                ref = ref or o
                out.append(o)
                print(_row(o, ref), flush=True)
    return out


def meets(o: Outcome, ref: Outcome) -> str:
    """Whether a row meets the issue's goal for its kind ("–" for identity)."""
    if o.codec == "identity":
        return "–"
    loss = 100 * (ref.accuracy - o.accuracy)
    secure = CASES[o.codec].secure
    ratio, most = (SECURE_RATIO, SECURE_LOSS) if secure else (GOAL_RATIO, GOAL_LOSS)
    return "yes" if o.ratio >= ratio and loss <= most else "no"


HEADER = (
    "| model | N | codec | bytes / update | vs float32 (4d) | accuracy | vs identity "
    "| goal | fixed-point error | seconds |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _row(o: Outcome, ref: Outcome) -> str:
    fp = "–" if o.fixed_point_error is None else f"{o.fixed_point_error:.1e}"
    return (
        f"| {o.model} | {o.n} | {o.codec} | {o.bytes_per_update:,.0f} "
        f"| {o.ratio:.1f}x fewer | {o.accuracy:.4f} "
        f"| {100 * (o.accuracy - ref.accuracy):+.1f} pts (ref {ref.accuracy:.4f}) "
        f"| {meets(o, ref)} | {fp} | {o.seconds:.1f} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS), help="mlp128, mlp1024, cnn (any mlpH)")
    ap.add_argument("--n", default="3,10", help="numbers of participants")
    ap.add_argument("--codecs", default=",".join(CASES), help=", ".join(CASES))
    ap.add_argument("--quick", action="store_true", help="a small grid, a smoke check")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--json", action="store_true", help="print one JSON object at the end")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # as every node runs (fednode run --threads' default)
    models, ns = a.models.split(","), [int(x) for x in a.n.split(",")]
    codecs, n_rounds = a.codecs.split(","), a.rounds
    if a.quick:
        models, ns = QUICK["models"], QUICK["n"]
        codecs, n_rounds = QUICK["codecs"], QUICK["rounds"]
    unknown = [c for c in codecs if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown codec setting(s) {unknown}: choose from {', '.join(CASES)}")
    head = (
        f"digits, IID, {n_rounds} rounds, FedAvg; uplink bytes per update (mean) against the "
        "update as float32 (4 bytes per parameter); final accuracy on the test split"
    )
    print(head + "\n\n" + HEADER, flush=True)
    t0 = time.perf_counter()
    outcomes = grid(models, ns, codecs, n_rounds)
    wall = time.perf_counter() - t0
    refs = {(o.model, o.n): o for o in outcomes if o.codec == "identity"}
    lines = [_row(o, refs[(o.model, o.n)]) for o in outcomes]
    tail = (
        "\nidentity's safetensors per update: "
        + ", ".join(
            f"{m} {o.bytes_per_update:,.0f} B (float32 {o.float32_bytes:,} B)"
            for (m, n), o in refs.items()
            if n == ns[0]
        )
        + f"\n{wall:.0f} s on this machine ({platform.machine()}, "
        f"{platform.python_version()})"
    )
    print(tail)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(head + "\n\n" + HEADER + "\n" + "\n".join(lines) + "\n" + tail + "\n")
    if a.json:
        print(
            json.dumps(
                {
                    "rounds": n_rounds,
                    "wall_s": wall,
                    "rows": [
                        {
                            **dataclasses.asdict(o),
                            "ratio": o.ratio,
                            "vs_identity_pts": 100 * (o.accuracy - refs[(o.model, o.n)].accuracy),
                            "goal": meets(o, refs[(o.model, o.n)]),
                        }
                        for o in outcomes
                    ],
                }
            )
        )


if __name__ == "__main__":
    main()
