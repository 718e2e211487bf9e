"""The coordinator ledger's write cost per round, next to raw SQLite inserts.

The quality ledger (issue 5) adds several writes per participant per round; this measures
whether that bookkeeping is negligible next to a round's training. One round writes what a
coordinator writes, each call its own transaction as in the coordinator:

    start_round + N record_update + complete_round + N record_participant_quality
    + N record_network + record_session_quality + sync_alerts (a few conditions, some raised
    and resolved each round) + 3 append_event

on a real file in a temporary directory, WAL and synchronous=NORMAL (the ledger's pragmas).
Reported: rounds/s, ms per round (mean, median, p95) and rows inserted per second (rows
counted from the tables before and after, so alert events and model rows are included).

The reference is stdlib sqlite3 writing the same number of rows per round, of similar width
(20 mixed columns), into a WAL file with the same pragmas: ``executemany`` in ONE transaction
per round (the floor for these rows), and one transaction per call, as many commits per round
as the ledger makes (what the commits alone cost).

    .venv/bin/python benchmarks/ledger.py [--rounds 200] [--participants 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fednode.ledger import Ledger

SID = "bench-session"
REF_COLUMNS = 20


def _pq_metrics(i: int, r: int) -> dict[str, Any]:
    """Every participant quality column filled, as the coordinator would after a round."""
    return {
        "training_time_ms": 1500.0 + i,
        "tasks_selected": r,
        "tasks_completed": r,
        "tasks_failed": 0,
        "model_quality": 95.0,
        "data_quality": 98.0,
        "uptime": 99.0,
        "heartbeat_consistency": 97.0,
        "latency_ms": 12.0 + i,
        "bandwidth_mbps": 80.0,
        "disconnects": 0,
        "cpu_efficiency": 70.0,
        "memory_efficiency": 65.0,
        "security_violations": 0,
        "task_completion_rate": 100.0,
        "error_rate": 0.0,
        "connection_stability": 100.0,
        "performance_score": 96.0,
        "reliability_score": 98.0,
        "network_score": 85.0,
        "resource_score": 67.5,
        "overall_score": 89.0,
        "trend": "stable",
    }


def _sq_metrics(r: int) -> dict[str, Any]:
    return {
        "convergence_rate": r,
        "convergence_score": 90.0,
        "model_stability": 88.0,
        "accuracy_improvement": 70.0,
        "participant_retention": 100.0,
        "data_integrity": 100.0,
        "network_efficiency": 50.0,
        "privacy_compliance": 100.0,
        "security_score": 100.0,
        "participant_quality": 89.0,
        "convergence": 82.7,
        "health_score": 86.0,
    }


def _conditions(peers: list[str], r: int) -> list[dict[str, Any]]:
    """One alert that persists, one that flips every round, one every third round."""
    conds = [
        {
            "alert_type": "uptime",
            "severity": "critical",
            "entity_id": peers[0],
            "message": f"uptime {80.0 + r % 5:.1f} % is under 90 % (critical)",
            "value": 80.0 + r % 5,
            "threshold": 90.0,
            "session_id": SID,
        }
    ]
    if r % 2 == 0 and len(peers) > 1:
        conds.append(
            {
                "alert_type": "latency",
                "severity": "medium",
                "entity_id": peers[1],
                "message": "latency 900 ms is over 500 ms (medium)",
                "value": 900.0,
                "threshold": 500.0,
                "session_id": SID,
            }
        )
    if r % 3 == 0:
        conds.append(
            {
                "alert_type": "anomaly",
                "severity": "medium",
                "entity_id": SID,
                "message": "20 % of the last round's updates were anomalous (over 10 %)",
                "value": 20.0,
                "threshold": 10.0,
                "session_id": SID,
            }
        )
    return conds


def _total_rows(led: Ledger) -> int:
    return sum(led.db[t].count for t in led.db.table_names() if t != "sqlite_sequence")


def _one_round(led: Ledger, peers: list[str], r: int, t: float) -> int:
    """Write one round; returns the number of ledger calls (= transactions) it made."""
    led.start_round(SID, r, selected=peers, model_cid_in=f"cid{r - 1}", started_at=t)
    for i, p in enumerate(peers):
        led.record_update(
            SID,
            r,
            participant=p,
            samples=600,
            loss=0.3 + i / 1000,
            bytes=420_000,
            duration_s=1.2,
            arrival_s=1.5,
            update_cid=f"bafy-{p}-{r}",
            received_at=t + 1.5,
        )
    led.complete_round(
        SID,
        r,
        ended_at=t + 2.0,
        model_cid=f"cid{r}",
        accuracy=0.9,
        loss=0.3,
        size=420_000,
        participants=len(peers),
        bytes_up=420_000 * len(peers),
        bytes_down=420_000 * len(peers),
    )
    for i, p in enumerate(peers):
        led.record_participant_quality(p, SID, t + 2.0, _pq_metrics(i, r))
    for p in peers:
        led.record_network(p, SID, t + 2.0, "down", bytes=420_000, transfer_s=0.05)
    led.record_session_quality(SID, r, t + 2.0, _sq_metrics(r))
    led.sync_alerts([*peers, SID], _conditions(peers, r), now=t + 2.0)
    for kind in ("round_started", "round_completed", "model_published"):
        led.append_event(kind, session_id=SID, data={"round": r, "model_cid": f"cid{r}"}, ts=t)
    return 3 * len(peers) + 7


def bench_ledger(rounds: int, participants: int, directory: Path) -> dict[str, Any]:
    peers = [f"12D3KooWbenchpeer{i:04d}" for i in range(participants)]
    with Ledger(directory / "ledger.db") as led:
        led.create_session(
            SID,
            name="bench",
            spec={"rounds": rounds},
            strategy="fedavg",
            secure_aggregation=False,
            rounds=rounds,
            created_at=0.0,
        )
        for p in peers:
            led.upsert_participant(p, address="127.0.0.1:9000", online=True)
        led.record_model(
            SID, 0, cid="cid0", parent_cid=None, accuracy=0.1, loss=2.3, size=1, created_at=0.0
        )
        journal = led.db.execute("PRAGMA journal_mode").fetchone()[0]
        rows_before = _total_rows(led)
        times: list[float] = []
        calls = 0
        start = time.perf_counter()
        for r in range(1, rounds + 1):
            t0 = time.perf_counter()
            calls += _one_round(led, peers, r, float(r) * 10)
            times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        rows = _total_rows(led) - rows_before
        ok, _ = led.verify_chain()
    return {
        "journal_mode": journal,
        "rounds": rounds,
        "participants": participants,
        "seconds": elapsed,
        "rounds_per_s": rounds / elapsed,
        "ms_per_round_mean": 1000 * elapsed / rounds,
        "ms_per_round_median": 1000 * statistics.median(times),
        "ms_per_round_p95": 1000 * sorted(times)[min(len(times) - 1, int(0.95 * len(times)))],
        "rows_inserted": rows,
        "rows_per_round": rows / rounds,
        "transactions_per_round": calls / rounds,
        "rows_per_s": rows / elapsed,
        "chain_ok": ok,
    }


def _raw_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    cols = ", ".join(f"c{i} {('REAL', 'INTEGER', 'TEXT')[i % 3]}" for i in range(REF_COLUMNS - 1))
    conn.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, {cols})")
    return conn


def _ref_row(k: int) -> tuple[Any, ...]:
    return tuple(
        (float(k) + i, k + i, f"12D3KooWbenchpeer{k % 100:04d}")[i % 3]
        for i in range(REF_COLUMNS - 1)
    )


def bench_raw(rounds: int, rows_per_round: int, commits_per_round: int, directory: Path) -> dict:
    """Stdlib sqlite3: the same rows per round, batched, and spread over as many commits."""
    marks = ", ".join("?" * (REF_COLUMNS - 1))
    names = ", ".join(f"c{i}" for i in range(REF_COLUMNS - 1))
    sql = f"INSERT INTO t ({names}) VALUES ({marks})"
    batch = [_ref_row(k) for k in range(rows_per_round)]
    out: dict[str, Any] = {"rows_per_round": rows_per_round, "columns": REF_COLUMNS}

    conn = _raw_db(directory / "raw_batched.db")
    start = time.perf_counter()
    for _ in range(rounds):
        conn.execute("BEGIN")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    out["batched_rows_per_s"] = rounds * rows_per_round / elapsed
    out["batched_ms_per_round"] = 1000 * elapsed / rounds

    # The same rows spread over the ledger's number of transactions per round.
    per_commit = [batch[i::commits_per_round] for i in range(commits_per_round)]
    conn = _raw_db(directory / "raw_commits.db")
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in per_commit:
            conn.execute("BEGIN")
            conn.executemany(sql, chunk)
            conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    out["commits_per_round"] = commits_per_round
    out["per_call_rows_per_s"] = rounds * rows_per_round / elapsed
    out["per_call_ms_per_round"] = 1000 * elapsed / rounds
    return out


def print_result(res: dict[str, Any]) -> None:
    led, raw = res["ledger"], res["reference"]
    print(
        f"\n== ledger write cost: N={led['participants']} participants, {led['rounds']} rounds "
        f"(file in {res['tmpdir_parent']}, journal_mode={led['journal_mode']}, "
        "synchronous=NORMAL)"
    )
    print(
        f"  ledger (fednode.Ledger, {led['transactions_per_round']:.0f} calls = transactions "
        f"per round, {led['rows_per_round']:.1f} rows inserted per round):"
    )
    print(
        f"    {led['rounds_per_s']:.1f} rounds/s, {led['ms_per_round_mean']:.2f} ms/round "
        f"(median {led['ms_per_round_median']:.2f}, p95 {led['ms_per_round_p95']:.2f}), "
        f"{led['rows_per_s']:.0f} rows/s; hash chain ok: {led['chain_ok']}"
    )
    print(
        f"  reference: raw sqlite3 executemany, {raw['rows_per_round']} rows x "
        f"{raw['columns']} columns, ONE transaction per round (WAL):"
    )
    print(
        f"    {raw['batched_rows_per_s']:.0f} rows/s ({raw['batched_ms_per_round']:.3f} ms/round)"
        f"; ledger = {raw['batched_rows_per_s'] / led['rows_per_s']:.1f}x slower"
    )
    print(
        f"  reference: raw sqlite3, the same rows over {raw['commits_per_round']} transactions "
        "per round (the ledger's commit count):"
    )
    print(
        f"    {raw['per_call_rows_per_s']:.0f} rows/s ({raw['per_call_ms_per_round']:.3f} "
        f"ms/round); ledger = {raw['per_call_rows_per_s'] / led['rows_per_s']:.1f}x slower"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="rounds to write (default 200)")
    ap.add_argument("--participants", type=int, default=10, help="N per round (default 10)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    if args.rounds < 1 or args.participants < 2:
        ap.error("--rounds must be >= 1 and --participants >= 2")
    with tempfile.TemporaryDirectory(prefix="fednode-ledger-bench-") as tmp:
        directory = Path(tmp)
        led = bench_ledger(args.rounds, args.participants, directory)
        raw = bench_raw(
            args.rounds,
            round(led["rows_per_round"]),
            round(led["transactions_per_round"]),
            directory,
        )
    res = {
        "ledger": led,
        "reference": raw,
        "tmpdir_parent": tempfile.gettempdir(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
    }
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_result(res)


if __name__ == "__main__":
    main()
