"""Robust aggregation and outlier detection against participant attacks: final accuracy of
each strategy for each attack with 0, 1 and 3 attackers of 10 participants on digits (IID
and Dirichlet alpha = 0.5), and the detection's precision and recall.

    .venv/bin/python benchmarks/robustness.py [--rounds 10] [--out bench-out/robustness.md]

A federation in one process, through the code a coordinator and its participants run, in
the order a plain round runs it (fednode.session): every participant trains with
fednode.training on its digits shard; an attacker's model is made by fednode.attacks (the
code behind `fednode run --attack`); the coordinator scores the updates with
fednode.robustness (detection, when on), bounds them with fednode.rounds.bound_updates
(weight share, update norm) and aggregates with the strategy of fednode.strategies that the
spec names. What it leaves out of a real session is the wire: signatures, CIDs, timing;
those change no figure here. The reference is clean FedAvg (no attacker) in the same run.

Columns: `fedavg` without detection (the undefended mean), `fedavg+det` (the mean behind
detection, the default spec), each robust strategy without detection, so that each
defence is measured alone, and `trimmed_mean+det`, both together. Precision/recall: of
fedavg+det's exclusions, over all rounds (an excluded honest update is a false positive; a
kept attacker's a false negative).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode import attacks, data, robustness, rounds, training
from fednode.session import model_spec
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate
from protocol import spec as specmod

N = 10
ATTACKS = ("sign_flip", "scale:10", "gaussian:1", "label_flip", "constant:0.5", "free_rider")
# strategy column -> (aggregation settings, detection)
COLUMNS: dict[str, tuple[dict[str, Any], str]] = {
    "fedavg": ({"strategy": "fedavg"}, "off"),
    "fedavg+det": ({"strategy": "fedavg"}, "exclude"),
    "median": ({"strategy": "median"}, "off"),
    "trimmed_mean": ({"strategy": "trimmed_mean", "beta": 0.3}, "off"),
    "krum": ({"strategy": "krum", "num_malicious": 3}, "off"),
    "multikrum": ({"strategy": "multikrum", "num_malicious": 3}, "off"),
    "bulyan": ({"strategy": "bulyan", "num_malicious": 1}, "off"),
    "trimmed_mean+det": ({"strategy": "trimmed_mean", "beta": 0.3}, "exclude"),
}


def _spec(partition: str, agg: dict[str, Any], detection: str) -> dict[str, Any]:
    return specmod.validate(
        {
            "min_participants": N,
            "data": {"partition": partition, "alpha": 0.5},
            "model": {"kind": "mlp", "hidden": [128]},
            "aggregation": agg,
            "robustness": {"detection": detection},
        }
    )


def run(
    partition: str, column: str, attack: str | None, attackers: int, n_rounds: int
) -> tuple[float, int, int, int]:
    """Final accuracy, and detection's true positives, false positives, false negatives."""
    agg, detection = COLUMNS[column]
    spec = _spec(partition, agg, detection)
    mspec = model_spec(spec)
    feats = spec["data"]["features"]
    shards = [
        data.load_partition(
            f"digits:{k}/{N}", features=feats, partition=partition, seed=0, alpha=0.5
        )
        for k in range(N)
    ]
    test = data.load_eval("digits", features=feats, seed=0)
    assert test is not None
    bad = {f"p{k}" for k in range(N - attackers, N)}
    attack_of = attacks.parse(attack) if attack else None
    cfg = training.TrainConfig.of_spec(spec["training"])
    strategy = get_strategy(spec["aggregation"])
    state: dict[str, np.ndarray] = {}
    g = training.init_weights(mspec, spec["data"]["seed"])
    rng = np.random.default_rng(0)
    tp = fp = fn = 0
    for r in range(n_rounds):
        updates = []
        for k in range(N):
            peer = f"p{k}"
            shard = shards[k]
            atk = attack_of if peer in bad else None
            if atk is not None:
                shard = atk.training_data(shard, mspec)
            res = training.train(mspec, g, shard, dataclasses.replace(cfg, seed=r))
            w = res.weights if atk is None else atk.update(res.weights, g, rng)
            updates.append(ClientUpdate(peer, w, res.num_examples, res.loss))
        if detection != "off":
            deltas = {u.peer_id: [u.weights[n] - g[n] for n in g] for u in updates}
            scores = robustness.score(deltas, robustness.Thresholds.of(spec["robustness"]))
            if scores is not None:
                out = {p for p, s in scores.items() if s.excluded}
                tp += len(out & bad)
                fp += len(out - bad)
                fn += len(bad - out)
                updates = [u for u in updates if u.peer_id not in out]
        claims = {u.peer_id: u.num_examples for u in updates}
        bounded, _ = rounds.bound_updates(updates, g, claims, spec["aggregation"])
        g, state = strategy.aggregate(g, bounded, state)
    acc, _loss = training.evaluate(mspec, g, test)
    return acc, tp, fp, fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--partitions", default="iid,dirichlet")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--columns", default=",".join(COLUMNS))
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = ap.parse_args()
    cols = a.columns.split(",")
    lines = [
        f"digits, {N} participants, MLP H=128, {a.rounds} rounds; final accuracy on the "
        "digits test split",
        "",
        "| partition | attack | attackers | " + " | ".join(cols) + " | best robust − clean "
        "fedavg | detection precision / recall |",
        "|" + "---|" * (len(cols) + 5),
    ]
    print("\n".join(lines), flush=True)
    t0 = time.perf_counter()
    for partition in a.partitions.split(","):
        clean = run(partition, "fedavg", None, 0, a.rounds)[0]
        cases: list[tuple[str | None, int]] = [(None, 0)]
        cases += [(atk, n) for atk in a.attacks.split(",") for n in (1, 3)]
        for atk, n in cases:
            accs, det = {}, (0, 0, 0)
            for col in cols:
                acc, tp, fp, fn = (
                    (clean, 0, 0, 0)
                    if (col == "fedavg" and n == 0)
                    else run(partition, col, atk, n, a.rounds)
                )
                accs[col] = acc
                if col == "fedavg+det":
                    det = (tp, fp, fn)
            robust = [accs[c] for c in cols if c != "fedavg"]
            best = max(robust) if robust else float("nan")
            tp, fp, fn = det
            prec = "–" if tp + fp == 0 else f"{tp / (tp + fp):.2f}"
            rec = "–" if tp + fn == 0 else f"{tp / (tp + fn):.2f}"
            row = (
                f"| {partition} | {atk or 'none'} | {n} | "
                + " | ".join(f"{accs[c]:.4f}" for c in cols)
                + f" | {100 * (best - clean):+.1f} pts | {prec} / {rec} |"
            )
            lines.append(row)
            print(row, flush=True)
    tail = f"\n{time.perf_counter() - t0:.0f} s on this machine"
    print(tail)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(lines) + tail + "\n")


if __name__ == "__main__":
    main()
