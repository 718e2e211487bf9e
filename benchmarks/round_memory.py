"""Memory and time of a plain round's judging and aggregate: every update stacked, against rows
read in column blocks, in memory and on disk.

What a plain round does once its updates are in (fednode.session ``_collect_plain``): outlier
detection (fednode.robustness, three passes against the coordinate-wise median), the bounds
(shares, clip), and FedAvg's weighted mean. Three ways, on the same n updates of d float32
values (one tensor each; 10 % of them scaled ×20, so that detection excludes them):

- ``stacked``: as the round did before fednode.round_updates: the updates kept as tensors,
  detection over their deltas as one float64 matrix, each update clipped, the strategy's
  ``aggregate``. What is held is the n·d·4 of the updates themselves, plus the peak below.
- ``rows, memory``: fednode.round_updates.RoundUpdates in memory: the updates' float32 rows
  (n·d·4, the same), detection and the weighted mean a column block at a time.
- ``rows, disk``: the same rows in the unlinked spill file (``--round-ram-mib 0``): the
  process holds none of them.

The figures: the peak of the bytes allocated during the judging and aggregate (tracemalloc:
numpy reports its buffers to it), beside the reference n·d·4, the updates' own size; the
bytes each way holds for the round (the updates or rows, in the process); and the wall time,
beside numpy's own float32 sum over the same (n, d) stack, measured in the same run. Adding
the updates (``RoundUpdates.add``, when each arrives) is timed apart.

Then the coordinate-wise median (a robust strategy, no detection or bounds) of the same
updates: ``median, whole`` hands it every update as a model, as a robust round did;
``median, cols`` hands it the model in column blocks of the rows on disk
(``RoundUpdates.by_columns``), each update's block read as the arithmetic stacks it.

    .venv/bin/python benchmarks/round_memory.py
    .venv/bin/python benchmarks/round_memory.py --shape 1000x9610 100x1000000 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from fednode import robustness, rounds
from fednode.round_updates import RoundUpdates
from fednode.strategies import get_strategy
from fednode.strategies.base import ClientUpdate

AGG = {"weighting": "examples", "max_examples": 0, "max_weight_share": 0.5, "max_update_norm": 0}
LIMITS = robustness.Thresholds()


def measured(fn: Callable[[], Any]) -> tuple[Any, float, int]:
    """``fn()``'s result, wall time and the peak bytes it allocated (tracemalloc)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn()
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, took, peak


def make_round(n: int, d: int, seed: int = 0) -> tuple[dict, dict[str, dict], dict[str, int]]:
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(size=d).astype(np.float32)}
    ups = {}
    for i in range(n):
        step = rng.normal(scale=0.01, size=d).astype(np.float32)
        ups[f"p{i:05d}"] = {"w": base["w"] + (step * 20 if i % 10 == 0 else step)}
    examples = {p: 10 + i % 50 for i, p in enumerate(ups)}
    return base, ups, examples


def stacked(base: dict, ups: dict[str, dict], examples: dict[str, int]) -> tuple[dict, int]:
    """The round as it was: detection over the deltas stacked, the updates bounded, FedAvg."""
    deltas = {p: [w[k] - base[k] for k in base] for p, w in ups.items()}
    scores = robustness.score(deltas, LIMITS)
    assert scores is not None
    del deltas
    kept = [p for p in sorted(ups) if not scores[p].excluded]
    updates = [ClientUpdate(p, ups[p], examples[p], 0.1) for p in kept]
    bounded, _ = rounds.bound_updates(updates, base, dict(examples), AGG)
    new, _ = get_strategy("fedavg").aggregate(base, bounded, {})
    return new, len(ups) - len(kept)


def from_rows(base: dict, rows: RoundUpdates, examples: dict[str, int]) -> tuple[dict, int]:
    """The round as it is now (fednode.session ``_collect_plain`` and ``_aggregate``)."""
    peers = sorted(rows.peers)
    scores = robustness.score(rows.delta_rows(peers), LIMITS)
    assert scores is not None
    kept = [p for p in peers if not scores[p].excluded]
    figures = rounds.bound_plan(
        {p: examples[p] for p in kept}, {p: rows.norm(p) for p in kept}, dict(examples), AGG
    )
    step = rows.weighted_delta({p: f["share"] * f["scale"] for p, f in figures.items()})
    new, _ = get_strategy("fedavg").from_mean(base, rows.model(step), {})
    return new, len(peers) - len(kept)


def median_whole(base: dict, ups: dict[str, dict], examples: dict[str, int]) -> dict:
    """The coordinate-wise median as a robust round handed it before: every update a model."""
    updates = [ClientUpdate(p, ups[p], examples[p], 0.1) for p in sorted(ups)]
    return get_strategy("median").aggregate(base, updates, {})[0]


def median_columns(rows: RoundUpdates, examples: dict[str, int]) -> dict:
    """The same from the rows, a column block of every update at a time (by_columns)."""
    cols, blocks = rows.by_columns({p: 1.0 for p in rows.peers})
    updates = [
        ClientUpdate(p, blocks[p], examples[p], 0.1)  # type: ignore[arg-type]
        for p in sorted(rows.peers)
    ]
    return rows.from_columns(get_strategy("median").aggregate(cols, updates, {})[0])


def run(n: int, d: int, spill: Path) -> dict[str, Any]:
    base, ups, examples = make_round(n, d)
    stack = np.stack([ups[p]["w"] for p in sorted(ups)])
    start = time.perf_counter()
    np.sum(stack, axis=0)
    ref_s = time.perf_counter() - start
    del stack
    out: dict[str, Any] = {"n": n, "d": d, "updates_bytes": n * d * 4, "np_sum_s": ref_s}
    (want, excl), took, peak = measured(lambda: stacked(base, ups, examples))
    out["stacked"] = {"s": took, "peak": peak, "held": n * d * 4, "excluded": excl}
    for where, ram in (("memory", 2**62), ("disk", 0)):
        rows = RoundUpdates(base, n, ram_bytes=ram, spill_dir=spill)
        start = time.perf_counter()
        for p in sorted(ups):
            rows.add(p, ups[p])
        add_s = time.perf_counter() - start
        (got, excl), took, peak = measured(lambda rows=rows: from_rows(base, rows, examples))
        diff = float(np.max(np.abs(got["w"] - want["w"])))
        held = 0 if rows.on_disk else rows.held_bytes
        out[where] = {"s": took, "peak": peak, "held": held, "add_s": add_s, "excluded": excl}
        out[where]["max_abs_diff"] = diff
        rows.close()
    med, took, peak = measured(lambda: median_whole(base, ups, examples))
    out["median whole"] = {"s": took, "peak": peak, "held": n * d * 4, "excluded": 0}
    rows = RoundUpdates(base, n, ram_bytes=0, spill_dir=spill)
    for p in sorted(ups):
        rows.add(p, ups[p])
    got, took, peak = measured(lambda: median_columns(rows, examples))
    diff = float(np.max(np.abs(got["w"] - med["w"])))
    out["median columns"] = {"s": took, "peak": peak, "held": 0, "excluded": 0}
    out["median columns"]["max_abs_diff"] = diff
    rows.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs="+", default=["1000x9610", "500x100000", "100x1000000"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shape:
            n, d = (int(x) for x in shape.split("x"))
            results.append(run(n, d, Path(tmp) / "rounds"))
    if args.json:
        print(json.dumps({"machine": platform.machine(), "results": results}, indent=1))
        return
    mib = 2**20
    print(
        f"{'n':>6} {'d':>9} {'way':<13} {'held MiB':>9} {'peak MiB':>9} {'× n·d·4':>8} "
        f"{'s':>7} {'× np.sum':>9} {'add s':>7} {'excl':>5} {'Δ max':>9}"
    )
    for r in results:
        for way, key in (
            ("stacked", "stacked"),
            ("rows, memory", "memory"),
            ("rows, disk", "disk"),
            ("median, whole", "median whole"),
            ("median, cols", "median columns"),
        ):
            f = r[key]
            print(
                f"{r['n']:>6} {r['d']:>9} {way:<13} {f['held'] / mib:>9.1f} "
                f"{f['peak'] / mib:>9.1f} {f['peak'] / r['updates_bytes']:>8.2f} {f['s']:>7.3f} "
                f"{f['s'] / r['np_sum_s']:>9.1f} {f.get('add_s', 0):>7.3f} {f['excluded']:>5} "
                f"{f.get('max_abs_diff', 0):>9.2g}"
            )
        print(
            f"{'':>17} reference: updates n·d·4 = {r['updates_bytes'] / mib:.1f} MiB, "
            f"np.sum over the (n, d) float32 stack {r['np_sum_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
