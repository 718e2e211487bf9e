"""A plain in-process FedAvg loop on digits: the reference the networked runs are held to.

No networking, no processes: split, partition, train each participant in turn, aggregate,
evaluate. `--preset bench` is the project's fixed benchmark task (docs/benchmarks.md,
"Round time of a real federation"); `--preset demo` is the demo's defaults.

    .venv/bin/python benchmarks/inprocess_fedavg.py --preset demo
    .venv/bin/python benchmarks/inprocess_fedavg.py --preset bench --hidden 1024 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode import training
from fednode.data import Dataset, apply_features, digits_split, partition_indices
from fednode.strategies import ClientUpdate, get_strategy
from fednode.training import TrainConfig, evaluate, init_weights, train

PRESETS: dict[str, dict] = {
    "demo": {
        "features": "standardize",
        "local_epochs": 2,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.9,
    },
    "bench": {
        "features": "scale16",
        "local_epochs": 1,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "momentum": 0.0,
    },
}


def run(
    preset: str,
    *,
    participants: int,
    rounds: int,
    hidden: int,
    seed: int,
    log: TextIO | None = sys.stdout,
) -> dict:
    p = PRESETS[preset]
    x_train, y_train, x_test, y_test = digits_split(seed)
    x_train, x_test = apply_features(x_train, x_test, p["features"])
    assert x_test is not None
    parts = partition_indices("iid", y_train, participants, seed=seed)
    shards = [Dataset(x_train[idx], y_train[idx]) for idx in parts]
    test = Dataset(x_test, y_test)
    spec = {"kind": "mlp", "inputs": x_train.shape[1], "hidden": [hidden, hidden], "classes": 10}
    global_w = init_weights(spec, seed)
    strategy = get_strategy("fedavg")
    history = []
    start = time.perf_counter()
    for rnd in range(1, rounds + 1):
        t0 = time.perf_counter()
        updates = []
        for k, shard in enumerate(shards):
            cfg = TrainConfig(
                local_epochs=p["local_epochs"],
                batch_size=p["batch_size"],
                lr=p["lr"],
                optimizer=p["optimizer"],
                momentum=p["momentum"],
                seed=seed * 1_000_003 + rnd * 1000 + k,
            )
            res = train(spec, global_w, shard, cfg)
            updates.append(ClientUpdate(f"p{k}", res.weights, res.num_examples, res.loss))
        global_w, _ = strategy.aggregate(global_w, updates, {})
        t_train = time.perf_counter() - t0
        acc, loss = evaluate(spec, global_w, test)
        dt = time.perf_counter() - t0
        history.append(
            {
                "round": rnd,
                "accuracy": acc,
                "loss": loss,
                "train_loss": float(np.mean([u.loss for u in updates])),
                "duration_s": dt,
                "train_s": t_train,
            }
        )
        if log is not None:
            print(
                f"round {rnd:2d}  acc {acc:.4f}  loss {loss:.4f}  "
                f"train_loss {history[-1]['train_loss']:.4f}  {dt * 1000:.0f} ms",
                file=log,
            )
    return {
        "preset": preset,
        "participants": participants,
        "rounds": rounds,
        "hidden": hidden,
        "threads": torch.get_num_threads(),
        "final_accuracy": history[-1]["accuracy"] if history else None,
        "duration_s": time.perf_counter() - start,
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--participants", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=128, help="H of the MLP 64-H-H-10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    training.warm_up()  # keep torch's one-time import cost out of round 1
    out = run(
        args.preset,
        participants=args.participants,
        rounds=args.rounds,
        hidden=args.hidden,
        seed=args.seed,
        log=sys.stderr if args.json else sys.stdout,
    )
    if args.json:
        print(json.dumps(out))
    else:
        rt = [h["duration_s"] for h in out["history"]]
        print(
            f"{out['preset']}: final accuracy {out['final_accuracy']:.4f} after "
            f"{out['rounds']} rounds; {np.mean(rt) * 1000:.0f} ms/round "
            f"(median {np.median(rt) * 1000:.0f} ms, {out['threads']} threads)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
