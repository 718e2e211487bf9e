"""The Flower half of the parity check; runs under the flwr venv's python, never fednode's.

Usage (flower_parity.py calls it): ``<flwr venv>/bin/python flower_side.py WORKDIR``.
WORKDIR holds ``manifest.json`` (the cases: which Flower function, its keyword arguments)
and ``in_<id>.npz`` (each participant's arrays ``r<i>_<j>`` and ``counts``). For each case
this writes ``flwr_<id>.npz`` (the result's arrays ``a<j>``) or records the exception, and
writes ``flwr.json``: Flower's and numpy's versions and each case's outcome.

Only the functions named in FUNCTIONS can be called, and arrays are read with
allow_pickle=False: the manifest selects among fixed code, it cannot name code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.server.strategy import aggregate as flwr_aggregate

FUNCTIONS = {
    "aggregate": flwr_aggregate.aggregate,
    "aggregate_median": flwr_aggregate.aggregate_median,
    "aggregate_trimmed_avg": flwr_aggregate.aggregate_trimmed_avg,
    "aggregate_krum": flwr_aggregate.aggregate_krum,
    "aggregate_bulyan": flwr_aggregate.aggregate_bulyan,
}


def load_results(path: Path) -> list[tuple[list[np.ndarray], int]]:
    with np.load(path, allow_pickle=False) as z:
        counts = [int(c) for c in z["counts"]]
        n_arrays = sum(1 for k in z.files if k.startswith("r0_"))
        return [([z[f"r{i}_{j}"] for j in range(n_arrays)], c) for i, c in enumerate(counts)]


def run_case(case: dict[str, Any], workdir: Path) -> dict[str, Any]:
    results = load_results(workdir / f"in_{case['id']}.npz")
    kwargs = dict(case["flower_kwargs"])
    if "aggregation_rule" in kwargs:  # Bulyan's first rule, by name among FUNCTIONS
        kwargs["aggregation_rule"] = FUNCTIONS[kwargs["aggregation_rule"]]
    try:
        # aggregate_bulyan pops from the list it is given; the list is ours to lose here.
        out = FUNCTIONS[case["flower_func"]](results, **kwargs)
    except Exception as exc:  # the comparison decides whether an error was expected
        return {"id": case["id"], "error": f"{type(exc).__name__}: {exc}"}
    arrays = {f"a{j}": np.asarray(a) for j, a in enumerate(out)}
    np.savez(workdir / f"flwr_{case['id']}.npz", **arrays)
    return {"id": case["id"], "error": None}


def main(argv: list[str]) -> int:
    workdir = Path(argv[1])
    manifest = json.loads((workdir / "manifest.json").read_text())
    import flwr

    outcomes = [run_case(case, workdir) for case in manifest["cases"]]
    report = {"flwr": flwr.__version__, "numpy": np.__version__, "cases": outcomes}
    (workdir / "flwr.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
