"""Aggregation throughput and memory: the streaming weighted mean against numpy's own sum.

The weighted mean (``fednode.strategies.aggregate.WeightedMean``) takes the updates one at a
time as they arrive: ``add(arrays, weight)`` per update, ``result()`` once. Its figure is
the bytes of float32 updates it accumulates per second (n × d × 4 over the time of the n
``add`` calls; ``result()``, one O(d) pass, is printed on its own). References, measured in
the same run on the same arrays:

- ``np.sum(stack, axis=0)``: numpy summing the same float32 values, pre-stacked into one
  (n, d) array, stacking not timed, unweighted, in float32. The strictest reference (no
  weights, no float64, no arrival order) and the one the goal (≥ 0.7×) is measured against.
- ``np.sum(stack, axis=0, dtype=np.float64)``: the same sum at the accumulator's precision.
- ``functools.reduce(np.add, arrays)``: the arrays as they arrive, in float32, a new array
  per step.

Each update is one float32 tensor of d values (the tensor count does not change the work),
weights are example counts drawn from 1..1000 (so every ``add`` multiplies: a weight of 1
takes a faster path). Every time is the best of ``--repeat`` runs.

The robust rules (median, trimmed_mean, krum, bulyan) are timed on n updates of d values,
and their memory is measured with tracemalloc (numpy reports its buffers to it): the peak
of the bytes allocated during the call, beyond the inputs, also as a multiple of the
updates' own size n × d × 4. The weighted mean's memory is measured the same way.

    .venv/bin/python benchmarks/aggregate.py
    .venv/bin/python benchmarks/aggregate.py --mean 10x100000 100x1000000 --robust 10x100000
    .venv/bin/python benchmarks/aggregate.py --json
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from fednode.strategies import aggregate

Results = list[tuple[list[np.ndarray], float]]


def best(fn: Callable[[], object], repeat: int) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        tracemalloc.stop()
    return peak - before


def updates(n: int, d: int, seed: int = 0) -> Results:
    rng = np.random.default_rng(seed)
    return [
        ([rng.standard_normal(d, dtype=np.float32)], float(rng.integers(1, 1001))) for _ in range(n)
    ]


def size(text: str) -> tuple[int, int]:
    """'10x100000' -> (10, 100000)."""
    n, _, d = text.lower().partition("x")
    return int(n), int(float(d))


def measure_mean(n: int, d: int, repeat: int) -> dict[str, Any]:
    results = updates(n, d)
    arrays = [a[0] for a, _ in results]
    stack = np.stack(arrays)
    nbytes = n * d * 4

    def stream() -> aggregate.WeightedMean:
        acc = aggregate.WeightedMean()
        for arr, w in results:
            acc.add(arr, w)
        return acc

    filled = stream()
    t_add = best(stream, repeat)
    t_result = best(filled.result, repeat)
    t_sum32 = best(lambda: np.sum(stack, axis=0), repeat)
    t_sum64 = best(lambda: np.sum(stack, axis=0, dtype=np.float64), repeat)
    t_reduce = best(lambda: functools.reduce(np.add, arrays), repeat)
    mem = peak_bytes(lambda: stream().result())
    return {
        "n": n,
        "d": d,
        "update_bytes": nbytes,
        "stream_GBps": nbytes / t_add / 1e9,
        "result_ms": t_result * 1e3,
        "np_sum_f32_GBps": nbytes / t_sum32 / 1e9,
        "np_sum_f64_GBps": nbytes / t_sum64 / 1e9,
        "reduce_add_GBps": nbytes / t_reduce / 1e9,
        "ratio_vs_np_sum_f32": t_sum32 / t_add,
        "ratio_vs_np_sum_f64": t_sum64 / t_add,
        "ratio_vs_reduce_add": t_reduce / t_add,
        "peak_extra_bytes": mem,
    }


def robust_calls(n: int) -> dict[str, Callable[[Results], object]]:
    """The robust rules with the parameters a session would use for n updates: trimmed_mean
    cuts 20 % from each end; krum and bulyan assume the most attackers f the rule allows
    (krum n >= 2f + 3, bulyan n >= 4f + 3), Multi-Krum keeps n - f, Bulyan selects n - 2f."""
    f_krum = max(0, (n - 3) // 2)
    f_bulyan = max(0, (n - 3) // 4)
    ag: Any = aggregate  # the robust rules are looked up by name: a missing one is skipped
    calls: dict[str, Callable[[Results], object]] = {}
    if hasattr(ag, "median"):
        calls["median"] = ag.median
    if hasattr(ag, "trimmed_mean"):
        calls["trimmed_mean(beta=0.2)"] = lambda r: ag.trimmed_mean(r, 0.2)
    if hasattr(ag, "krum"):
        calls[f"krum(f={f_krum}, m={n - f_krum})"] = lambda r: ag.krum(r, f_krum, n - f_krum)
    if hasattr(ag, "bulyan"):
        m = n - 2 * f_bulyan
        calls[f"bulyan(f={f_bulyan}, m={m})"] = lambda r: ag.bulyan(r, f_bulyan, m)
    return calls


def measure_robust(n: int, d: int, repeat: int) -> list[dict[str, Any]]:
    results = updates(n, d)
    nbytes = n * d * 4
    rows = []
    for name, call in robust_calls(n).items():
        t = best(lambda call=call: call(results), repeat)
        mem = peak_bytes(lambda call=call: call(results))
        rows.append(
            {
                "rule": name,
                "n": n,
                "d": d,
                "ms": t * 1e3,
                "GBps": nbytes / t / 1e9,
                "peak_extra_bytes": mem,
                "peak_vs_updates": mem / nbytes,
            }
        )
    if "median" not in {r["rule"] for r in rows}:
        return rows
    # numpy's own median over the same arrays, stacking included (the robust rules must
    # gather the n values of each coordinate somehow): the floor for a coordinate-wise rule
    arrays = [a[0] for a, _ in results]
    t = best(lambda: np.median(np.stack(arrays), axis=0), repeat)
    rows.append(
        {
            "rule": "np.median(np.stack(...), axis=0)",
            "n": n,
            "d": d,
            "ms": t * 1e3,
            "GBps": nbytes / t / 1e9,
            "peak_extra_bytes": peak_bytes(lambda: np.median(np.stack(arrays), axis=0)),
            "peak_vs_updates": None,
        }
    )
    rows[-1]["peak_vs_updates"] = rows[-1]["peak_extra_bytes"] / nbytes
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mean",
        nargs="*",
        type=size,
        default=[(10, 100_000), (100, 100_000), (10, 1_000_000), (100, 1_000_000)],
        help="weighted-mean sizes, NxD (default 10x1e5 100x1e5 10x1e6 100x1e6)",
    )
    ap.add_argument(
        "--robust",
        nargs="*",
        type=size,
        default=[(10, 100_000), (10, 1_000_000), (30, 100_000)],
        help="robust-rule sizes, NxD (default 10x1e5 10x1e6 30x1e5)",
    )
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    mean_rows = [measure_mean(n, d, args.repeat) for n, d in args.mean]
    robust_rows = [row for n, d in args.robust for row in measure_robust(n, d, args.repeat)]
    machine = {"python": platform.python_version(), "numpy": np.__version__}
    if args.json:
        print(json.dumps({"machine": machine, "mean": mean_rows, "robust": robust_rows}))
        return 0
    print(f"Python {machine['python']}, numpy {machine['numpy']}, best of {args.repeat}")
    print()
    print("weighted mean, streaming (GB/s of float32 updates added)")
    print(
        f"{'n':>4} {'d':>9} {'stream':>7} {'np.sum f32':>10} {'ratio':>6} "
        f"{'np.sum f64':>10} {'ratio':>6} {'reduce add':>10} {'ratio':>6} "
        f"{'result ms':>9} {'peak extra':>11}"
    )
    for r in mean_rows:
        print(
            f"{r['n']:4} {r['d']:9,} {r['stream_GBps']:7.2f} {r['np_sum_f32_GBps']:10.2f} "
            f"{r['ratio_vs_np_sum_f32']:6.2f} {r['np_sum_f64_GBps']:10.2f} "
            f"{r['ratio_vs_np_sum_f64']:6.2f} {r['reduce_add_GBps']:10.2f} "
            f"{r['ratio_vs_reduce_add']:6.2f} {r['result_ms']:9.2f} "
            f"{r['peak_extra_bytes'] / 1e6:8.1f} MB"
        )
    print()
    print("robust rules (peak extra = tracemalloc peak beyond the inputs; × = of n·d·4)")
    print(f"{'rule':34} {'n':>4} {'d':>9} {'ms':>9} {'GB/s':>6} {'peak extra':>11} {'×':>6}")
    for r in robust_rows:
        print(
            f"{r['rule']:34} {r['n']:4} {r['d']:9,} {r['ms']:9.1f} {r['GBps']:6.2f} "
            f"{r['peak_extra_bytes'] / 1e6:8.1f} MB {r['peak_vs_updates']:6.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
