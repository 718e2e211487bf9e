"""Local DP-SGD's price and effect: final accuracy and membership-inference AUC for
ε ∈ {1, 3, 8, ∞} on digits (the default MLP) and on the MNIST-shaped CNN of
examples/mnist-cnn-idx, 3 participants, 10 rounds.

    .venv/bin/python benchmarks/privacy.py [--rounds 10] [--models mlp,cnn] [--shadows 8]

A federation in one process, through the code the nodes run: each participant plans its
round with fednode.dpsgd.plan_round (Opacus's noise multiplier for the target ε over the
planned rounds, its accountant history) and trains with fednode.dpsgd.train_private
(Opacus's PrivacyEngine: per-example clipping, Gaussian noise, Poisson sampling); ε = ∞ is
plain fednode.training.train, the reference measured in the same run. The coordinator's
FedAvg is fednode.strategies' weighted mean. The final model is attacked with
fednode.audit (`fedctl audit privacy`): members = the three participants' training data,
non-members = held-out data of the same distribution (the digits test split; the IDX t10k
files), shadow models trained like the participants on the rest.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "mnist-cnn-idx"))

from fednode import audit, data, dpsgd, training  # noqa: E402
from fednode.data import Dataset  # noqa: E402
from fednode.schema import Schema  # noqa: E402
from fednode.session import model_spec  # noqa: E402
from fednode.strategies import aggregate as arith  # noqa: E402
from protocol import spec as specmod  # noqa: E402

N = 3
EPSILONS = (1.0, 3.0, 8.0, float("inf"))


def _setup(model: str, work: Path) -> tuple[dict[str, Any], list[Dataset], Dataset]:
    """(spec, the participants' training data, held-out data of the same distribution)."""
    if model == "mlp":
        spec = specmod.validate({"rounds": 10})
        feats = spec["data"]["features"]
        parts = [
            data.load_partition(f"digits:{k}/{N}", features=feats, partition="iid", seed=0)
            for k in range(N)
        ]
        test = data.load_eval("digits", features=feats, seed=0)
        assert test is not None
        return spec, parts, test
    import make_data  # examples/mnist-cnn-idx: digits scaled up to 28×28 IDX files

    folders = make_data.write_participants(work / "idx", N)
    spec = specmod.load(ROOT / "examples" / "mnist-cnn-idx" / "spec.toml")
    spec = specmod.validate(spec)
    schema = Schema.from_spec(spec)
    splits = [
        data.load_split(f"idx:{f}", features=spec["data"]["features"], schema=schema)
        for f in folders
    ]
    test = Dataset(
        np.concatenate([s[1].x for s in splits]), np.concatenate([s[1].y for s in splits])
    )
    return spec, [s[0] for s in splits], test


def federate(
    spec: dict[str, Any], parts: list[Dataset], eps: float, rounds: int
) -> tuple[dict[str, np.ndarray], float]:
    """The final global model and the largest ε any participant spent."""
    mspec = model_spec(spec)
    t = spec["training"]
    cfg = training.TrainConfig.of_spec(t)
    privacy = {**spec["privacy"], "target_epsilon": eps}
    g = training.init_weights(mspec, 0)
    history: list[list[tuple[float, float, int]]] = [[] for _ in parts]
    spent = 0.0
    for r in range(rounds):
        results = []
        for k, part in enumerate(parts):
            if np.isinf(eps):
                res = training.train(mspec, g, part, cfg)
            else:
                dp = dpsgd.plan_round(
                    privacy, t, rounds, len(part), session_history=history[k], seed=100 * r + k
                )
                res = dpsgd.train_private(mspec, g, part, cfg, dp)
                history[k].append(dp.entry)
                spent = max(spent, dp.session_epsilon())
            order = list(g)
            results.append((arith.to_arrays(res.weights, order), float(res.num_examples)))
        g = arith.from_arrays(arith.weighted_mean(results), list(g))
    return g, spent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--shadows", type=int, default=8)
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument(
        "--training",
        default="",
        help="[training] settings for every run, e.g. batch_size=96,lr=0.5,local_epochs=1",
    )
    a = ap.parse_args()
    overrides = {
        k: (float(v) if "." in v else int(v)) if v[0].isdigit() else v
        for k, v in (kv.split("=", 1) for kv in a.training.split(",") if kv)
    }
    print(f"[training] overrides: {overrides or 'none (the spec)'}; {a.rounds} rounds")
    print(
        "| model | ε target | ε spent (largest) | final accuracy | accuracy − non-private | "
        "shadow AUC | LiRA AUC | LiRA TPR @ 1 % FPR | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            spec, parts, held_out = _setup(model, Path(tmp) / model)
            if overrides:
                spec = specmod.validate({**spec, "training": {**spec["training"], **overrides}})
            mspec = model_spec(spec)
            members = Dataset(
                np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts])
            )
            ev, en, pool = audit.audit_sets(members, held_out, seed=0)
            shadow_cfg = audit.shadow_config({**spec, "rounds": a.rounds})
            rows = []
            for eps in (float(e) for e in a.epsilons.split(",")):
                t0 = time.perf_counter()
                g, spent = federate(spec, parts, eps, a.rounds)
                acc, _ = training.evaluate(mspec, g, held_out)
                res = audit.audit(mspec, g, ev, en, pool, shadow_cfg, shadows=a.shadows)
                rows.append((eps, spent, acc, res, time.perf_counter() - t0))
            base = next(r[2] for r in rows if np.isinf(r[0]))
            for eps, spent, acc, res, secs in rows:
                sh, li = res.attacks["shadow"], res.attacks["lira"]
                print(
                    f"| {model} | {'∞' if np.isinf(eps) else f'{eps:g}'} | "
                    f"{'–' if np.isinf(eps) else f'{spent:.2f}'} | {acc:.4f} | "
                    f"{100 * (acc - base):+.1f} pts | {sh.auc:.3f} | {li.auc:.3f} | "
                    f"{li.tpr_at_1pct_fpr:.3f} | {secs:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
