"""Parity of fednode's aggregation arithmetic with Flower's, on the same seeded inputs.

fednode.strategies.aggregate's weighted_mean, median, trimmed_mean, krum and bulyan are
compared with flwr.server.strategy.aggregate's aggregate, aggregate_median,
aggregate_trimmed_avg, aggregate_krum and aggregate_bulyan. flwr is not a dependency of the
project: it lives in a venv of its own (default ``.venv-flwr/`` at the repository root,
ignored by git), and its functions run in a subprocess of that venv's python
(tests/compat/flower_side.py). The two sides exchange arrays as .npz files read with
allow_pickle=False and a JSON manifest; nothing is pickled.

    .venv/bin/python tests/compat/flower_parity.py --setup   # create the venv, then compare
    .venv/bin/python tests/compat/flower_parity.py           # compare (venv must exist)
    .venv/bin/python tests/compat/flower_parity.py --venv /tmp/flwr --seed 3

Prints one row per function: cases, the largest absolute difference, the largest
difference relative to the case's input scale, PASS/FAIL; exits 1 on any mismatch, 2 when
the venv is missing. tests/compat/README.md holds the command and a recorded result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-flwr"
FLOWER_SIDE = Path(__file__).resolve().with_name("flower_side.py")
# The Flower release the issue names; pip takes its newest patch release.
FLWR_REQUIREMENT = "flwr==1.41.*"
FLWR_FALLBACK = "flwr>=1,<2"

# "Float32 tolerance": both sides start from the same float32 inputs, but Flower sums in
# float32 (fednode in float64), so an output coordinate may differ by a few float32 ulps of
# the *inputs'* magnitude (cancellation makes a mean near 0 of large inputs carry the
# error of the inputs' scale). A coordinate passes when
#     |ours - flower| <= RTOL * |flower| + ATOL * scale,    scale = max |input| of the case.
RTOL = 1e-5
ATOL = 1e-5

Arrays = list[np.ndarray]
Results = list[tuple[Arrays, int]]


@dataclass
class Case:
    """One input set, and the call each side makes on it."""

    id: str
    group: str  # the row of the table: fednode's function name
    results: Results
    ours_kwargs: dict[str, Any]
    flower_func: str
    flower_kwargs: dict[str, Any]
    expect_error: bool = False  # both sides must refuse these inputs
    about: str = ""


@dataclass
class Outcome:
    case: Case
    ok: bool
    max_abs: float = 0.0
    max_scaled: float = 0.0
    detail: str = ""


@dataclass
class Report:
    flwr_version: str
    numpy_version: str
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.outcomes) and all(o.ok for o in self.outcomes)


# --- the venv -------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup_venv(venv: Path) -> None:
    """Create ``venv`` with flwr 1.41 (or, where that is not published, the newest 1.x)."""
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    done = subprocess.run([*pip, FLWR_REQUIREMENT], check=False)
    if done.returncode != 0:
        print(f"{FLWR_REQUIREMENT} did not install; trying {FLWR_FALLBACK}", file=sys.stderr)
        subprocess.run([*pip, FLWR_FALLBACK], check=True)


def venv_ready(venv: Path) -> bool:
    """True when ``venv`` has a python and Flower's aggregate module (looked for on disk,
    not imported: importing flwr takes most of a second; a broken install still shows,
    as the Flower side's failure)."""
    if not venv_python(venv).exists():
        return False
    return any(venv.glob("lib/python*/site-packages/flwr/server/strategy/aggregate.py"))


# --- the inputs -----------------------------------------------------------------------

SHAPES_SMALL: list[tuple[int, ...]] = [(10,), (3, 4)]
SHAPES_CNN: list[tuple[int, ...]] = [(4, 1, 3, 3), (4,), (16, 8), (16,)]
SHAPES_MLP: list[tuple[int, ...]] = [(64, 32), (32,), (32, 10), (10,)]


def model(rng: np.random.Generator, shapes: list[tuple[int, ...]], scale: float = 1.0) -> Arrays:
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in shapes]


def honest(
    rng: np.random.Generator,
    n: int,
    shapes: list[tuple[int, ...]],
    *,
    counts: list[int] | None = None,
    scale: float = 1.0,
    integers: bool = False,
) -> Results:
    """``n`` results around one centre; ``integers`` rounds every value, so coordinates tie."""
    centre = model(rng, shapes, scale)
    out: Results = []
    for i in range(n):
        arrays = [
            c + (rng.standard_normal(c.shape) * 0.1 * scale).astype(np.float32) for c in centre
        ]
        if integers:
            arrays = [np.round(a).astype(np.float32) for a in arrays]
        count = counts[i] if counts is not None else int(rng.integers(1, 1000))
        out.append((arrays, count))
    return out


def with_attackers(rng: np.random.Generator, results: Results, f: int) -> Results:
    """The last ``f`` results replaced by far-off models (what Krum and Bulyan exclude)."""
    out = list(results)
    for i in range(len(out) - f, len(out)):
        arrays, count = out[i]
        shift = np.float32(50.0 + 10 * i)
        signs = [np.sign(rng.standard_normal(a.shape)).astype(np.float32) for a in arrays]
        out[i] = ([a + shift * s for a, s in zip(arrays, signs, strict=True)], count)
    return out


def scattered(rng: np.random.Generator, n: int, shapes: list[tuple[int, ...]]) -> Results:
    """``n`` independent models, each at its own scale (0.5 to 3): no cluster, no clear
    outliers."""
    return [
        (model(rng, shapes, float(rng.uniform(0.5, 3.0))), int(rng.integers(1, 1000)))
        for _ in range(n)
    ]


def duplicate(results: Results, src: int, dst: int) -> Results:
    """Result ``dst`` becomes an exact copy of ``src`` (arrays and count): a tie whose
    winner does not change the answer."""
    out = list(results)
    out[dst] = ([a.copy() for a in results[src][0]], results[src][1])
    return out


def bulyan_kwargs(f: int) -> dict[str, Any]:
    """Flower's Bulyan with plain Krum as its first rule (to_keep=0: Bulyan looks the
    returned model up among the inputs by equality, which a Multi-Krum mean would fail)."""
    return {"num_malicious": f, "aggregation_rule": "aggregate_krum", "to_keep": 0}


def make_cases(seed: int) -> list[Case]:
    """The inputs, seeded: several n (down to each rule's minimum), f, shapes and example
    counts; ties that leave the answer defined (equal counts, tied values for the median and
    the trimmed mean, duplicated models for Krum and Bulyan); inputs both sides refuse."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []

    def add(
        group: str,
        results: Results,
        ours: dict[str, Any],
        flower: tuple[str, dict[str, Any]],
        about: str,
        *,
        error: bool = False,
    ) -> None:
        case_id = f"{group}-{len(cases)}"
        cases.append(Case(case_id, group, results, ours, flower[0], flower[1], error, about))

    mean = ("aggregate", {})
    for n in (1, 2, 3, 10, 100):
        add("weighted_mean", honest(rng, n, SHAPES_CNN), {}, mean, f"n={n}")
    add("weighted_mean", honest(rng, 7, SHAPES_MLP, counts=[32] * 7), {}, mean, "equal counts")
    zero = honest(rng, 5, SHAPES_SMALL, counts=[0, 5, 1, 1000, 3])
    add("weighted_mean", zero, {}, mean, "a zero count")
    add("weighted_mean", honest(rng, 10, SHAPES_SMALL, scale=1e4), {}, mean, "scale 1e4")

    med = ("aggregate_median", {})
    for n in (1, 2, 3, 4, 10, 11):
        add("median", honest(rng, n, SHAPES_CNN), {}, med, f"n={n}")
    for n in (4, 9):
        add("median", honest(rng, n, SHAPES_MLP, integers=True), {}, med, f"n={n}, tied values")

    def trim(beta: float) -> tuple[str, dict[str, Any]]:
        return ("aggregate_trimmed_avg", {"proportiontocut": beta})

    # 0.29·100 = 28.999…: both sides must floor the same float
    for n, beta in ((3, 0.0), (4, 0.25), (5, 0.2), (10, 0.1), (10, 0.3), (20, 0.45), (100, 0.29)):
        add(
            "trimmed_mean",
            honest(rng, n, SHAPES_CNN),
            {"beta": beta},
            trim(beta),
            f"n={n}, beta={beta}",
        )
    ties = honest(rng, 10, SHAPES_MLP, integers=True)
    add("trimmed_mean", ties, {"beta": 0.2}, trim(0.2), "n=10, beta=0.2, tied values")
    bad = honest(rng, 10, SHAPES_SMALL)
    add("trimmed_mean", bad, {"beta": 0.5}, trim(0.5), "beta=0.5 refused", error=True)

    def krum(f: int, m: int) -> tuple[dict[str, Any], tuple[str, dict[str, Any]]]:
        """num_selected = m is Flower's to_keep = m; 0 is Krum's one model in both."""
        return {"num_malicious": f, "num_selected": m}, (
            "aggregate_krum",
            {"num_malicious": f, "to_keep": m},
        )

    for n, f, m in (
        (5, 1, 0),
        (5, 1, 1),
        (5, 1, 3),
        (7, 2, 0),
        (7, 2, 2),
        (9, 2, 0),
        (10, 2, 4),
        (12, 3, 6),
        (12, 3, 9),
        (20, 4, 10),
    ):
        res = with_attackers(rng, honest(rng, n, SHAPES_CNN), f)
        add("krum", res, *krum(f, m), f"n={n}, f={f}, m={m}")
    # No planted attackers, models of spread scales: which models win depends on f through
    # the n - f - 2 neighbours each score sums, so an off-by-one there shows.
    for n, f, m in ((6, 1, 0), (8, 2, 0), (8, 1, 3), (11, 3, 4), (11, 4, 0)):
        res = scattered(rng, n, SHAPES_SMALL)
        add("krum", res, *krum(f, m), f"n={n}, f={f}, m={m}, scattered")
    res = duplicate(duplicate(with_attackers(rng, honest(rng, 8, SHAPES_MLP), 2), 0, 1), 2, 3)
    add("krum", res, *krum(2, 2), "n=8, f=2, m=2, duplicated models")
    res = duplicate(honest(rng, 7, SHAPES_MLP), 4, 5)
    add("krum", res, *krum(1, 0), "n=7, f=1, m=0, duplicated models")
    add(
        "krum",
        honest(rng, 6, SHAPES_SMALL, counts=[10] * 6),
        *krum(0, 3),
        "n=6, f=0, m=3, equal counts",
    )

    def bul(f: int, theta: int) -> tuple[dict[str, Any], tuple[str, dict[str, Any]]]:
        """num_selected = θ; Flower's θ is always n - 2f (fednode's default, 0)."""
        return {"num_malicious": f, "num_selected": theta}, ("aggregate_bulyan", bulyan_kwargs(f))

    for n, f in ((3, 0), (7, 1), (8, 1), (11, 2), (15, 3)):
        res = with_attackers(rng, honest(rng, n, SHAPES_CNN), f)
        add("bulyan", res, *bul(f, n - 2 * f), f"n={n}, f={f}, theta=n-2f")
    res = with_attackers(rng, honest(rng, 12, SHAPES_CNN), 2)
    add("bulyan", res, *bul(2, 0), "n=12, f=2, theta=0 (default n-2f)")
    res = duplicate(with_attackers(rng, honest(rng, 11, SHAPES_MLP), 2), 0, 1)
    add("bulyan", res, *bul(2, 7), "n=11, f=2, duplicated models")
    add("bulyan", honest(rng, 10, SHAPES_SMALL), *bul(2, 6), "n=10 < 4f+3 refused", error=True)
    return cases


# --- the two sides --------------------------------------------------------------------


def ours_functions() -> dict[str, Callable[..., Arrays] | None]:
    """fednode's functions by name; None for one the module lacks (its cases then fail)."""
    from fednode.strategies import aggregate

    return {name: getattr(aggregate, name, None) for name in FLOWER_NAME}


def write_inputs(cases: list[Case], workdir: Path) -> None:
    manifest = {
        "cases": [
            {"id": c.id, "flower_func": c.flower_func, "flower_kwargs": c.flower_kwargs}
            for c in cases
        ]
    }
    (workdir / "manifest.json").write_text(json.dumps(manifest))
    for c in cases:
        arrays = {f"r{i}_{j}": a for i, (res, _) in enumerate(c.results) for j, a in enumerate(res)}
        np.savez(workdir / f"in_{c.id}.npz", counts=np.array([n for _, n in c.results]), **arrays)


def run_flower(venv: Path, workdir: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(venv_python(venv)), str(FLOWER_SIDE), str(workdir)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the Flower side failed:\n{done.stderr}")
    return json.loads((workdir / "flwr.json").read_text())


def load_arrays(path: Path) -> Arrays:
    with np.load(path, allow_pickle=False) as z:
        return [z[f"a{j}"] for j in range(len(z.files))]


def compare(
    case: Case, ours: Callable[..., Arrays] | None, flwr_error: str | None, flwr_path: Path
) -> Outcome:
    if ours is None:
        return Outcome(case, False, detail=f"fednode has no {case.group}")
    try:
        mine = ours([(list(a), n) for a, n in case.results], **case.ours_kwargs)
        my_error = None
    except Exception as exc:
        mine, my_error = [], f"{type(exc).__name__}: {exc}"
    if case.expect_error:
        ok = my_error is not None and flwr_error is not None
        return Outcome(case, ok, detail=f"fednode: {my_error}; flower: {flwr_error}")
    if my_error or flwr_error:
        return Outcome(case, False, detail=f"fednode: {my_error}; flower: {flwr_error}")
    theirs = load_arrays(flwr_path)
    if [a.shape for a in mine] != [a.shape for a in theirs]:
        return Outcome(
            case, False, detail=f"shapes {[a.shape for a in mine]} vs {[a.shape for a in theirs]}"
        )
    scale = max(float(np.max(np.abs(a))) for res, _ in case.results for a in res) or 1.0
    max_abs = max_scaled = 0.0
    ok = True
    for m, t in zip(mine, theirs, strict=True):
        m64, t64 = m.astype(np.float64), t.astype(np.float64)
        diff = np.abs(m64 - t64)
        ok &= bool(np.all(diff <= RTOL * np.abs(t64) + ATOL * scale))
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_scaled = max(max_scaled, float(diff.max(initial=0.0)) / scale)
    return Outcome(case, ok, max_abs, max_scaled)


def run(venv: Path, seed: int = 0) -> Report:
    """Compare every case; the Flower side runs in ``venv``."""
    cases = make_cases(seed)
    funcs = ours_functions()
    with tempfile.TemporaryDirectory(prefix="flwr-parity-") as tmp:
        workdir = Path(tmp)
        write_inputs(cases, workdir)
        flower = run_flower(venv, workdir)
        errors = {c["id"]: c["error"] for c in flower["cases"]}
        report = Report(flower["flwr"], flower["numpy"])
        for c in cases:
            report.outcomes.append(
                compare(c, funcs[c.group], errors[c.id], workdir / f"flwr_{c.id}.npz")
            )
    return report


# --- output ---------------------------------------------------------------------------

FLOWER_NAME = {
    "weighted_mean": "aggregate",
    "median": "aggregate_median",
    "trimmed_mean": "aggregate_trimmed_avg(proportiontocut=beta)",
    "krum": "aggregate_krum(to_keep=num_selected)",
    "bulyan": "aggregate_bulyan(aggregate_krum, to_keep=0)",
}


def table(report: Report) -> str:
    import numpy

    lines = [
        f"flwr {report.flwr_version} (numpy {report.numpy_version} in its venv); "
        f"fednode side numpy {numpy.__version__}",
        f"tolerance per coordinate: |diff| <= {RTOL:g}*|flower| + {ATOL:g}*max|input|",
        "",
        f"| {'fednode':13} | {'Flower':44} | cases | refusals "
        "| max abs diff | max diff / scale | result |",
        f"|{'-' * 15}|{'-' * 46}|-------|----------|--------------|------------------|--------|",
    ]
    for group, flower_name in FLOWER_NAME.items():
        rows = [o for o in report.outcomes if o.case.group == group]
        if not rows:
            continue
        refusals = sum(o.case.expect_error for o in rows)
        max_abs = max(o.max_abs for o in rows)
        max_scaled = max(o.max_scaled for o in rows)
        verdict = "PASS" if all(o.ok for o in rows) else "FAIL"
        lines.append(
            f"| {group:13} | {flower_name:44} | {len(rows):5} | {refusals:8} | "
            f"{max_abs:12.3g} | {max_scaled:16.3g} | {verdict:6} |"
        )
    failed = [o for o in report.outcomes if not o.ok]
    for o in failed:
        lines.append(f"FAIL {o.case.id} ({o.case.about}): max abs {o.max_abs:.3g} {o.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--venv", type=Path, default=DEFAULT_VENV, help="the flwr venv (default %(default)s)"
    )
    ap.add_argument("--setup", action="store_true", help="create the venv / install flwr first")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ap.add_argument("--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    if args.setup:
        setup_venv(args.venv)
    if not venv_ready(args.venv):
        print(f"no flwr venv at {args.venv}: run with --setup", file=sys.stderr)
        return 2
    report = run(args.venv, args.seed)
    if args.verbose:
        for o in report.outcomes:
            mark = "ok  " if o.ok else "FAIL"
            print(f"{mark} {o.case.id:16} {o.case.about:36} {o.max_abs:9.3g} {o.detail}")
    print(table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
