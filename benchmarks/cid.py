"""CID throughput against SHA-256, and the embedded store's put/get throughput.

A CID of a file is SHA-256 of every 256 KiB chunk plus that of the few dag-pb nodes above
them, so hashlib's SHA-256 over the same bytes, in one call, is the physical limit: a CID
can only approach it. Printed next to it:

- ``file_cid(data, 1)`` (CIDv1, raw leaves) and ``file_cid(data, 0)`` (CIDv0, dag-pb leaves,
  which copies every chunk into a protobuf wrapper before hashing it);
- ``BlockStore.put`` (build the DAG, verify, write each block atomically, fsync by default
  as a node does) and ``BlockStore.get`` (read, re-hash every block, reassemble), in a
  temporary directory, with and without fsync.

The input is generated in memory: ``numpy.random.default_rng(0).bytes(size)``. Each figure
is the best of ``--repeat`` runs.

    .venv/bin/python benchmarks/cid.py [--mb 100] [--repeat 3] [--dir /tmp] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from fednode.store import BlockStore
from protocol.cid import file_cid


def best(fn: Callable[[], object], repeat: int) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn``."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def store_figures(data: bytes, fsync: bool, repeat: int, where: str | None) -> tuple[float, float]:
    """(put, get) seconds, best of ``repeat``; every put goes into a fresh, empty store."""
    root = Path(tempfile.mkdtemp(prefix="fednode-cid-bench-", dir=where))
    try:
        puts, gets = [], []
        for i in range(repeat):
            store = BlockStore(root / str(i), fsync=fsync)
            start = time.perf_counter()
            cid = store.put(data)
            puts.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = store.get(cid)
            gets.append(time.perf_counter() - start)
            assert got == data
            shutil.rmtree(root / str(i))
        return min(puts), min(gets)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench(size: int, repeat: int, where: str | None) -> dict[str, float]:
    data = np.random.default_rng(0).bytes(size)
    mb = size / 1e6
    out = {"size_bytes": float(size)}
    out["sha256_mb_s"] = mb / best(lambda: hashlib.sha256(data).digest(), repeat)
    out["cidv1_mb_s"] = mb / best(lambda: file_cid(data, 1), repeat)
    out["cidv0_mb_s"] = mb / best(lambda: file_cid(data, 0), repeat)
    for fsync, tag in ((True, "fsync"), (False, "nofsync")):
        put_s, get_s = store_figures(data, fsync, repeat, where)
        out[f"store_put_{tag}_mb_s"] = mb / put_s
        out[f"store_get_{tag}_mb_s"] = mb / get_s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="file size in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the store's temporary dir goes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = bench(int(args.mb * 1e6), args.repeat, args.dir)
    if args.json:
        print(json.dumps(r))
        return
    sha = r["sha256_mb_s"]
    print(f"{r['size_bytes'] / 1e6:.0f} MB, best of {args.repeat}")
    print(f"{'hashlib.sha256 (the limit)':<34} {sha:8.0f} MB/s")
    for key, label in (
        ("cidv1_mb_s", "file_cid v1 (raw leaves)"),
        ("cidv0_mb_s", "file_cid v0 (dag-pb leaves)"),
        ("store_put_fsync_mb_s", "BlockStore.put, fsync"),
        ("store_get_fsync_mb_s", "BlockStore.get (after fsync put)"),
        ("store_put_nofsync_mb_s", "BlockStore.put, no fsync"),
        ("store_get_nofsync_mb_s", "BlockStore.get"),
    ):
        print(f"{label:<34} {r[key]:8.0f} MB/s  ({r[key] / sha:.0%} of SHA-256)")


if __name__ == "__main__":
    main()
