"""Per-round wall time and bytes of a real federation on this machine (the benchmark task).

For each (N participants, H hidden width) this writes a session spec for the project's fixed
benchmark task (docs/benchmarks.md, "Round time of a real federation"), runs
`fedctl demo --spec ... --json` as a subprocess (a coordinator and N participants as
separate processes on 127.0.0.1 talking over real websockets, with signatures, CIDs and
the ledger), then reads the coordinator's ledger for per-round figures. As a reference it
times the same rounds in one process with no network (benchmarks/inprocess_fedavg.py, one
torch thread like the nodes), and prints the raw float32 size of the model weights as the
reference for bytes per round.

    .venv/bin/python benchmarks/round_time.py                      # N in {3, 10}, H in {128, 1024}
    .venv/bin/python benchmarks/round_time.py --rounds 3 --participants 3 --hidden 128 --json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1800.0


def spec_toml(participants: int, hidden: int, rounds: int) -> str:
    """The benchmark task exactly as docs/benchmarks.md fixes it."""
    return f"""\
name = "bench-n{participants}-h{hidden}"
rounds = {rounds}
min_participants = {participants}
participants = []

[data]
dataset = "digits"
partition = "iid"
seed = 0
features = "scale16"

[model]
kind = "mlp"
hidden = [{hidden}, {hidden}]
inputs = 64
classes = 10
seed = 0

[training]
local_epochs = 1
batch_size = 32
lr = 0.05
optimizer = "sgd"
momentum = 0.0

[aggregation]
strategy = "fedavg"
"""


def raw_model_bytes(hidden: int, inputs: int = 64, classes: int = 10) -> int:
    """float32 bytes of the weights and biases of the MLP inputs→H→H→classes."""
    dims = [inputs, hidden, hidden, classes]
    params = sum(i * o + o for i, o in itertools.pairwise(dims))
    return 4 * params


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _log_tails(workdir: Path, chars: int = 2000) -> dict[str, str]:
    out = {}
    for log in sorted((workdir / "logs").glob("*.log")) if (workdir / "logs").exists() else []:
        out[log.name] = log.read_text(errors="replace")[-chars:]
    return out


def read_ledger(path: str, session_id: str) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rounds = [
            {
                "round": r[0],
                "status": r[1],
                "duration_s": r[2],
                "participants": r[3],
                "bytes_up": r[4],
                "bytes_down": r[5],
                "accuracy": r[6],
            }
            for r in db.execute(
                "SELECT round, status, duration_s, participants, bytes_up, bytes_down, accuracy "
                "FROM training_rounds WHERE session_id = ? ORDER BY round",
                (session_id,),
            )
        ]
        updates = [
            # arrival_s in the ledger is the time from the round's start to the update's arrival
            {"round": r[0], "train_s": r[1], "arrival_s": r[2], "bytes": r[3], "status": r[4]}
            for r in db.execute(
                "SELECT round, duration_s, arrival_s, bytes, status FROM client_updates "
                "WHERE session_id = ? ORDER BY id",
                (session_id,),
            )
        ]
        sizes = [
            r[0]
            for r in db.execute(
                "SELECT size FROM model_versions WHERE session_id = ? ORDER BY round",
                (session_id,),
            )
        ]
    finally:
        db.close()
    return {"rounds": rounds, "updates": updates, "model_sizes": sizes}


def summarise_rounds(durations: list[float]) -> dict[str, Any]:
    """Round 1 on its own (it may carry warm-up), the median of rounds 2..R, min/max of all."""
    later = durations[1:]
    return {
        "round1_s": durations[0] if durations else None,
        "median_s": _median(later) if later else _median(durations),
        "median_over": "rounds 2..R" if later else "round 1",
        "min_s": min(durations) if durations else None,
        "max_s": max(durations) if durations else None,
    }


def run_federation(
    participants: int, hidden: int, rounds: int, keep: bool, log=sys.stderr
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"fednode-bench-n{participants}-h{hidden}-"))
    spec_path = workdir / "spec.toml"
    spec_path.write_text(spec_toml(participants, hidden, rounds))
    demo_dir = workdir / "demo"
    cmd = [
        sys.executable,
        "-m",
        "fedctl",
        "--key",
        str(workdir / "op.key"),
        "demo",
        "--spec",
        str(spec_path),
        "--participants",
        str(participants),
        "--workdir",
        str(demo_dir),
        "--json",
    ]
    result: dict[str, Any] = {
        "participants": participants,
        "hidden": hidden,
        "rounds": rounds,
        "processes": participants + 1,
        "workdir": str(workdir) if keep else None,
    }
    env = dict(os.environ)
    env.setdefault("FEDNODE_HOME", str(workdir / "home"))
    t0 = time.perf_counter()
    try:
        with open(workdir / "demo.stderr", "wb") as err:
            proc = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env=env,
                timeout=DEMO_TIMEOUT_S,
            )
        result["demo_wall_s"] = time.perf_counter() - t0
        stdout = proc.stdout.decode(errors="replace").strip()
        try:
            summary = json.loads(stdout)
        except json.JSONDecodeError:
            summary = {"ok": False, "error": {"code": "BAD_OUTPUT", "message": stdout[-2000:]}}
        if proc.returncode != 0 or not summary.get("ok"):
            result["ok"] = False
            result["error"] = summary.get("error", {"message": f"exit code {proc.returncode}"})
            result["demo_stderr_tail"] = (workdir / "demo.stderr").read_text(errors="replace")[
                -2000:
            ]
            result["log_tails"] = _log_tails(demo_dir)
            return result
        led = read_ledger(summary["ledger"], summary["session_id"])
        rnds = [r for r in led["rounds"] if r["status"] == "completed"]
        durs = [r["duration_s"] for r in rnds]
        accepted = [u for u in led["updates"] if u["status"] == "accepted"]
        train = [u["train_s"] for u in accepted if u["train_s"] is not None]
        train_later = [u["train_s"] for u in accepted if u["round"] > 1 and u["train_s"]]
        # The round split in two: until the last update arrived (dispatch, training, upload),
        # then the coordinator's own tail (aggregation, evaluation, ledger, next model's CID).
        last_arrival = {}
        for u in accepted:
            if u["arrival_s"] is not None:
                last_arrival[u["round"]] = max(last_arrival.get(u["round"], 0.0), u["arrival_s"])
        later = [r for r in rnds if r["round"] > 1 and r["round"] in last_arrival] or [
            r for r in rnds if r["round"] in last_arrival
        ]
        arrival = [last_arrival[r["round"]] for r in later]
        tail = [r["duration_s"] - last_arrival[r["round"]] for r in later]
        raw = raw_model_bytes(hidden)
        result.update(
            {
                "ok": True,
                "status": summary.get("status"),
                "rounds_completed": summary.get("rounds_completed"),
                "session_duration_s": summary.get("duration_s"),
                "final_accuracy": summary.get("final_accuracy"),
                "round_time": summarise_rounds(durs),
                "round_durations_s": durs,
                "round_participants": [r["participants"] for r in rnds],
                "train_per_update": {
                    "round1_median_s": _median([u["train_s"] for u in accepted if u["round"] == 1]),
                    "median_s": _median(train_later) if train_later else _median(train),
                },
                "last_update_arrival_median_s": _median(arrival),
                "coordinator_tail_median_s": _median(tail),
                "bytes_up_per_round": _median([float(r["bytes_up"]) for r in rnds]),
                "bytes_down_per_round": _median([float(r["bytes_down"]) for r in rnds]),
                "update_bytes_median": _median([float(u["bytes"]) for u in accepted]),
                "model_size": led["model_sizes"][-1] if led["model_sizes"] else None,
                "raw_model_bytes": raw,
                "ideal_bytes_per_round": participants * raw,
            }
        )
        return result
    except subprocess.TimeoutExpired:
        result["ok"] = False
        result["demo_wall_s"] = time.perf_counter() - t0
        result["error"] = {"code": "TIMEOUT", "message": f"demo ran over {DEMO_TIMEOUT_S:.0f} s"}
        result["log_tails"] = _log_tails(demo_dir)
        return result
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}", file=log)


def _inprocess_module():
    spec = importlib.util.spec_from_file_location(
        "inprocess_fedavg", Path(__file__).with_name("inprocess_fedavg.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_inprocess(participants: int, hidden: int, rounds: int) -> dict[str, Any]:
    """The same rounds in one process, no network; one torch thread, as each node uses."""
    import torch

    from fednode import training

    torch.set_num_threads(1)
    training.warm_up()
    mod = _inprocess_module()
    t0 = time.perf_counter()
    out = mod.run(
        "bench", participants=participants, rounds=rounds, hidden=hidden, seed=0, log=None
    )
    wall = time.perf_counter() - t0
    durs = [h["duration_s"] for h in out["history"]]
    train = [h["train_s"] for h in out["history"]]
    return {
        "threads": out["threads"],
        "final_accuracy": out["final_accuracy"],
        "round_time": summarise_rounds(durs),
        "round_durations_s": durs,
        # train_s: every participant trained one after another, plus the aggregation
        "train_all_median_s": _median(train[1:]) if len(train) > 1 else _median(train),
        "wall_s": wall,
    }


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _fmt_b(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f} MB" if x >= 1e6 else f"{x / 1e3:.1f} kB"


def print_result(res: dict[str, Any]) -> None:
    n, h = res["participants"], res["hidden"]
    print(f"\n== N={n} participants, H={h} ({res['processes']} processes), {res['rounds']} rounds")
    if not res.get("ok"):
        err = res.get("error", {})
        print(f"  FAILED: {err.get('code', '')} {err.get('message', '')}")
        for name, tail in res.get("log_tails", {}).items():
            print(f"  --- {name} (tail)\n{tail}")
        if res.get("demo_stderr_tail"):
            print(f"  --- fedctl stderr (tail)\n{res['demo_stderr_tail']}")
        return
    rt = res["round_time"]
    print(
        f"  federation: round 1 {_fmt_s(rt['round1_s'])} s; median {_fmt_s(rt['median_s'])} s "
        f"({rt['median_over']}); min/max {_fmt_s(rt['min_s'])}/{_fmt_s(rt['max_s'])} s"
    )
    tp = res["train_per_update"]
    print(
        f"  training per update (reported by participant): median {_fmt_s(tp['median_s'])} s "
        f"(round 1: {_fmt_s(tp['round1_median_s'])} s)"
    )
    print(
        f"  round split (medians): last update in {_fmt_s(res['last_update_arrival_median_s'])} s "
        f"after round start; then {_fmt_s(res['coordinator_tail_median_s'])} s on the coordinator "
        f"(aggregate, evaluate, record)"
    )
    print(
        f"  bytes per round: up {_fmt_b(res['bytes_up_per_round'])}, "
        f"down {_fmt_b(res['bytes_down_per_round'])}; ideal N x raw weights = "
        f"{_fmt_b(res['ideal_bytes_per_round'])} each way"
    )
    print(
        f"  model size (ledger) {res['model_size']} B; raw float32 weights "
        f"{res['raw_model_bytes']} B; final accuracy {res['final_accuracy']:.4f}"
    )
    print(
        f"  whole demo: {res['demo_wall_s']:.1f} s wall "
        f"(session {res['session_duration_s']:.1f} s; the rest is starting/stopping processes)"
    )
    ip = res.get("inprocess")
    if ip:
        irt = ip["round_time"]
        print(
            f"  in-process reference ({ip['threads']} thread, no network): round 1 "
            f"{_fmt_s(irt['round1_s'])} s; median {_fmt_s(irt['median_s'])} s "
            f"(all N trainings one after another {_fmt_s(ip['train_all_median_s'])} s); "
            f"final accuracy {ip['final_accuracy']:.4f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--participants", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument(
        "--no-inprocess", action="store_true", help="skip the in-process reference runs"
    )
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")

    import platform

    import torch

    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    results = []
    t_all = time.perf_counter()
    for hidden in args.hidden:
        for n in args.participants:
            print(f"running N={n} H={hidden} R={args.rounds} ...", file=sys.stderr, flush=True)
            res = run_federation(n, hidden, args.rounds, args.keep)
            if not args.no_inprocess:
                res["inprocess"] = run_inprocess(n, hidden, args.rounds)
            results.append(res)
            if not args.json:
                print_result(res)
                sys.stdout.flush()
    total = time.perf_counter() - t_all
    ok = all(r.get("ok") for r in results)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": ok,
                    "machine": machine,
                    "rounds": args.rounds,
                    "total_s": total,
                    "results": results,
                }
            )
        )
    else:
        print(
            f"\n{len(results)} configurations in {total:.0f} s on {machine['cpus']} CPUs "
            f"(python {machine['python']}, torch {machine['torch']})"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
