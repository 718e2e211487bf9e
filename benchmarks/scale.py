"""How the coordinator's cost grows with the number of participants: median round time,
coordinator CPU and RSS for N virtual participants (`fednode swarm`) against a real
coordinator process, each setting beside the in-process reference (the same round's
training and FedAvg in one process, no network, one torch thread).

For each N: one coordinator and one swarm of N identities (`fednode swarm --workers W`),
then one session per (model, selected fraction), one after another: digits, IID, the
round's participants drawn at random (`[selection] method = "random"`); `min_participants`
is the number selected; outlier detection scores every update but leaves none out
(`[robustness] detection = "alert"`: see session_spec). Round times are the coordinator
ledger's (start to publish); coordinator CPU is its process' CPU seconds over the
session's wall time (100 % = one core), RSS its peak (sampled every 0.25 s). The reference
trains the same number of shards of the same split one after another and averages them.

    .venv/bin/python benchmarks/scale.py                          # N 10, 100, 500, 1000
    .venv/bin/python benchmarks/scale.py --n 10,100 --rounds 3 --svg bench-out/scale.svg
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedctl.client import Target, call  # noqa: E402
from fedctl.demo import Processes  # noqa: E402
from fednode.home import NodeHome  # noqa: E402
from protocol.identity import Identity  # noqa: E402

MODELS: dict[str, dict[str, Any]] = {
    "logreg": {"kind": "logreg"},
    "mlp128": {"kind": "mlp", "hidden": [128]},
}


class Sampler:
    """Peak RSS and CPU seconds of one process, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def __enter__(self) -> Sampler:
        self.peak_rss = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def session_spec(name: str, peers: list[str], model: str, fraction: float, rounds: int) -> dict:
    n = len(peers)
    k = max(1, math.ceil(fraction * n - 1e-9))
    return {
        "name": name,
        "rounds": rounds,
        "participants": peers,
        "min_participants": k,
        "max_participants": k,
        "wait_participants_s": 120,
        "round_timeout_s": 600,
        "data": {"dataset": "digits", "partition": "iid", "seed": 0},
        "model": MODELS[model],
        "selection": {"method": "random", "seed": 1},
        # every update is still scored (its cost is measured), but none is left out: with
        # 500+ IID shards of about 3 digits each, a few honest updates sit far enough from
        # the median to be excluded three rounds running, then quarantined, and a session
        # that needs all N would stop for want of them (measured: 3 of 500 at round 3)
        "robustness": {"detection": "alert"},
    }


def run_session(target: Target, spec: dict, sampler: Sampler, timeout_s: float) -> dict:
    sid = call(target, "session.create", spec=spec)["session_id"]
    cpu0, wall0 = sampler.cpu(), time.perf_counter()
    sampler.peak_rss = sampler.proc.memory_info().rss
    call(target, "session.start", session_id=sid)
    end = time.monotonic() + timeout_s
    while True:
        status = call(target, "session.status", session_id=sid)
        if status["status"] in ("completed", "failed", "stopped"):
            break
        if time.monotonic() > end:
            raise TimeoutError(f"session {sid} still {status['status']} after {timeout_s} s")
        time.sleep(0.5)
    wall = time.perf_counter() - wall0
    rounds = [h["duration_s"] for h in status["history"]]
    return {
        "status": status["status"],
        "rounds": len(rounds),
        "median_round_s": statistics.median(rounds) if rounds else None,
        "coordinator_cpu_pct": 100 * (sampler.cpu() - cpu0) / wall,
        "coordinator_peak_rss_mib": sampler.peak_rss / 2**20,
        "accuracy": status.get("final_accuracy"),
    }


def reference_round_s(model: str, n: int, k: int, rounds: int = 2) -> float:
    """The in-process reference: k of n IID digits shards trained one after another with
    the nodes' own training code and the spec's default training, then averaged (FedAvg);
    the median of ``rounds`` rounds."""
    import torch

    from fednode import training
    from fednode.data import Dataset, apply_features, digits_split, partition_indices
    from fednode.session import model_spec
    from fednode.strategies import ClientUpdate, get_strategy
    from protocol import spec as specmod

    torch.set_num_threads(1)
    training.warm_up()  # torch's one-time costs out of the first round
    spec = specmod.validate({"model": MODELS[model], "rounds": 1})
    mspec = model_spec(spec)
    x, y, x_test, _y_test = digits_split(0)
    x, _ = apply_features(x, x_test, spec["data"]["features"])
    shards = partition_indices("iid", y, n, seed=0)[:k]
    g = training.init_weights(mspec, 0)
    strategy = get_strategy(spec["aggregation"])
    times = []
    for rnd in range(rounds):
        t0 = time.perf_counter()
        updates = []
        for j, idx in enumerate(shards):
            cfg = training.TrainConfig.of_spec(spec["training"], seed=rnd * 100_003 + j)
            res = training.train(mspec, g, Dataset(x[idx], y[idx]), cfg)
            updates.append(ClientUpdate(f"p{j}", res.weights, res.num_examples, res.loss))
        g, _state = strategy.aggregate(g, updates, {})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix=f"scale{n}-") as tmp:
            root = args.keep / f"n{n}" if args.keep else Path(tmp)
            root.mkdir(parents=True, exist_ok=True)
            (root / "logs").mkdir(exist_ok=True)
            procs = Processes(root / "logs")
            operator = Identity.generate()
            operator.save(root / "operator.key")
            home = NodeHome(root / "coordinator")
            home.init()
            try:
                ready = procs.start_coordinator(home, operator.peer_id, "--max-pending", "256")
                target = Target(ready["url"], ready["peer_id"], root / "operator.key")
                t0 = time.perf_counter()
                swarm = procs.start_swarm(root / "swarm", ready, n, "--workers", str(args.workers))
                started_s = time.perf_counter() - t0
                peers = list(swarm["peer_ids"])
                coord = Sampler(procs.procs["coordinator"].pid)
                with coord:
                    for model in args.models:
                        for fraction in args.fractions:
                            name = f"scale-n{n}-{model}-f{fraction:g}"
                            spec = session_spec(name, peers, model, fraction, args.rounds)
                            got = run_session(target, spec, coord, args.timeout)
                            k = spec["min_participants"]
                            row = {
                                "n": n,
                                "model": model,
                                "fraction": fraction,
                                "selected": k,
                                "swarm_start_s": started_s,
                                **got,
                                "reference_round_s": reference_round_s(model, n, k),
                            }
                            out.append(row)
                            print(_line(row), file=sys.stderr, flush=True)
            finally:
                procs.stop_all()
    return out


def _line(r: dict[str, Any]) -> str:
    return (
        f"N={r['n']:>5} {r['model']:>7} {r['selected']:>5} selected: median round "
        f"{_num(r['median_round_s'])} s (in-process {r['reference_round_s']:.2f} s), "
        f"coordinator CPU {r['coordinator_cpu_pct']:.0f} %, peak RSS "
        f"{r['coordinator_peak_rss_mib']:.0f} MiB, {r['status']}"
    )


def _num(v: float | None, pattern: str = "{:.2f}") -> str:
    return "–" if v is None else pattern.format(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| N | model | selected | median round (s) | in-process round (s) | coordinator CPU "
        "| coordinator peak RSS | accuracy |\n|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['n']:,} | {r['model']} | {r['selected']:,} | {_num(r['median_round_s'])} | "
        f"{r['reference_round_s']:.2f} | {r['coordinator_cpu_pct']:.0f} % | "
        f"{r['coordinator_peak_rss_mib']:.0f} MiB | {_num(r['accuracy'], '{:.3f}')} |\n"
        for r in rows
    )


def svg(rows: list[dict[str, Any]]) -> str:
    """Median round time against N, one line per (model, fraction), log-log."""
    w, h, ml, mr, mt, mb = 640, 360, 60, 150, 20, 40
    ns = sorted({r["n"] for r in rows})
    ts = [r["median_round_s"] for r in rows if r["median_round_s"]]
    if not ns or not ts:
        return ""
    lx0, lx1 = math.log10(min(ns)), math.log10(max(ns)) or 1.0
    ly0, ly1 = math.log10(min(ts)) - 0.1, math.log10(max(ts)) + 0.1

    def sx(n: float) -> float:
        span = (lx1 - lx0) or 1.0
        return ml + (math.log10(n) - lx0) / span * (w - ml - mr)

    def sy(t: float) -> float:
        return mt + (ly1 - math.log10(t)) / (ly1 - ly0) * (h - mt - mb)

    colors = ["#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#c62828", "#00838f"]
    el = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#444"/>',
        f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#444"/>',
        f'<text x="{(ml + w - mr) / 2}" y="{h - 8}" text-anchor="middle">participants N</text>',
        f'<text x="14" y="{(mt + h - mb) / 2}" transform="rotate(-90 14 {(mt + h - mb) / 2})" '
        'text-anchor="middle">median round (s)</text>',
    ]
    for n in ns:
        el.append(f'<text x="{sx(n):.1f}" y="{h - mb + 14}" text-anchor="middle">{n:,}</text>')
    for t in (0.1, 0.3, 1, 3, 10, 30, 100):
        if ly0 <= math.log10(t) <= ly1:
            y = sy(t)
            el.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="#eee"/>')
            el.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["median_round_s"]:
            key = f"{r['model']}, {r['fraction'] * 100:g} % selected"
            series.setdefault(key, []).append((r["n"], r["median_round_s"]))
    for i, (key, pts) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(n):.1f},{sy(t):.1f}" for n, t in sorted(pts))
        el.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for n, t in pts:
            el.append(f'<circle cx="{sx(n):.1f}" cy="{sy(t):.1f}" r="3" fill="{c}"/>')
        ly = mt + 14 * i + 6
        x0, x1 = w - mr + 10, w - mr + 26
        el.append(f'<line x1="{x0}" y1="{ly}" x2="{x1}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        el.append(f'<text x="{w - mr + 30}" y="{ly + 4}">{key}</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", default="10,100,500,1000", help="numbers of virtual participants")
    ap.add_argument("--models", default="logreg,mlp128", help=", ".join(MODELS))
    ap.add_argument("--fractions", default="0.1,1.0", help="shares of N selected per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2, help="the swarm's concurrent trainings")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds a session may take")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--svg", type=Path, help="also write the plot of round time against N")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--keep", type=Path, help="keep the nodes' homes and logs under this folder (per N)"
    )
    args = ap.parse_args()
    args.n = [int(v) for v in args.n.split(",")]
    args.models = args.models.split(",")
    args.fractions = [float(v) for v in args.fractions.split(",")]
    t0 = time.perf_counter()
    rows = bench(args)
    text = table(rows)
    print(text)
    print(f"{time.perf_counter() - t0:.0f} s on this machine")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.svg:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
