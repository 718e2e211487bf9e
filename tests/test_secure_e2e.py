"""Secure aggregation with real processes: dropouts at two stages, exact FedAvg, no leaks."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fedctl.client import AdminClient, Target
from fednode.home import NodeHome
from fednode.store import BlockStore
from fednode.training import expected_shapes
from fednode.weights import from_bytes
from protocol import spec as spec_mod
from protocol.secagg import params_from_spec
from tests.conftest import Cluster, start_cluster

pytestmark = pytest.mark.timeout(240)
MODEL = {"kind": "mlp", "inputs": 64, "hidden": [128, 128], "classes": 10}


def _contribution(home: NodeHome, session_id: str) -> tuple[dict, int, str, dict]:
    """What a participant put into the sum: its own record, written before it sent."""
    db = sqlite3.connect(home.ledger_path)
    rows = db.execute(
        "SELECT data FROM events WHERE kind = 'secagg_input' AND session_id = ?", (session_id,)
    ).fetchall()
    assert len(rows) == 1, rows
    data = json.loads(rows[0][0])
    blob = BlockStore(home.store_root).get(data["update_cid"])
    w = from_bytes(blob, expect=expected_shapes(MODEL))
    return w, data["samples"], data["update_cid"], data


async def _run_with_kills(c: Cluster, spec: dict, kill_at: dict[str, tuple[str, str]]) -> str:
    """Create and start the session; kill a process when its named stage message arrives."""
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        sid = (await client.call("session.create", spec=spec))["session_id"]
        snap = (await client.call("subscribe", session_id=sid))["snapshot"]
        online = {p["peer_id"] for p in snap["participants"] if p["online"]}
        while len(online & set(spec["participants"])) < len(spec["participants"]):
            ev = await asyncio.wait_for(client.events.get(), 120)  # wait for all to join
            assert ev is not None
            if ev.kind == "participant" and ev.data["online"]:
                online.add(ev.data["peer_id"])
        await client.call("session.start", session_id=sid)
        async for ev in client.stream():
            if ev.kind == "secagg":
                for name, (peer, stage) in list(kill_at.items()):
                    if ev.data["participant"] == peer and ev.data["stage"] == stage:
                        c.procs.kill(name)
                        del kill_at[name]
            if ev.kind == "session" and ev.data["status"] in ("completed", "failed", "stopped"):
                assert ev.data["status"] == "completed", ev.data
                break
        assert not kill_at, f"stages never reached: {kill_at}"
        return sid


def test_secure_session_with_two_dropouts(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        homes = [c.start_participant(k, 5) for k in range(4)]
        # the fifth trains slowly, so it is surely killed before its masked input
        homes.append(c.start_participant(4, 5, "--train-delay", "20"))
        ids = [h.identity().peer_id for h in homes]
        spec = {
            "rounds": 1,
            "min_participants": 3,
            "participants": ids,
            "round_timeout_s": 120,
            "aggregation": {"secure": True, "threshold": 0.6},
        }
        kill_at = {"participant-3": (ids[3], "masked"), "participant-4": (ids[4], "shares")}
        sid = asyncio.run(_run_with_kills(c, spec, kill_at))

        coord = c.coordinator_home
        db = sqlite3.connect(coord.ledger_path)
        status, participants, dropped = db.execute(
            "SELECT status, participants, dropped FROM training_rounds WHERE session_id = ?",
            (sid,),
        ).fetchone()
        assert (status, participants, dropped) == ("completed", 4, 1)
        (cid,) = db.execute(
            "SELECT cid FROM model_versions WHERE session_id = ? AND round = 1", (sid,)
        ).fetchone()
        model = from_bytes(BlockStore(coord.store_root).get(cid), expect=expected_shapes(MODEL))

        # the round's fixed point, as each participant recorded it (its own ledger only): the
        # coordinator chose it for the 5 selected from the spec's bits, clip and max_weight
        contributions = [_contribution(h, sid) for h in homes[:4]]
        agg = spec_mod.validate(spec)["aggregation"]
        p = params_from_spec(agg, 5, b"", b"")
        for _, n, _, rec in contributions:
            assert (rec["bits"], rec["clip"], rec["frac_bits"]) == (p.bits, p.clip, p.frac_bits)
            assert rec["clipped"] == 0  # no coordinate of w - g reached clip
            assert rec["weight"] == min(n, p.max_weight)

        # the plain FedAvg of the four whose masked inputs arrived, within the fixed-point
        # bound: each participant's rounding of w - g is <= 2**-(frac_bits+1), so is their
        # weighted mean; then the float32 rounding of the model (one ulp of its value)
        total = sum(n for _, n, _, _ in contributions)
        for name in model:
            plain = sum(w[name].astype(np.float64) * n for w, n, _, _ in contributions) / total
            tol = 2.0 ** -(p.frac_bits + 1) + np.spacing(np.abs(plain).astype(np.float32))
            err = np.abs(model[name].astype(np.float64) - plain)
            assert np.all(err <= tol), f"{name}: off FedAvg by {err.max():.3g} > bound"

        # nothing the coordinator persisted holds an individual update: no CID, no bytes
        needles = []
        for w, _, update_cid, _ in contributions:
            needles.append(update_cid.encode())
            raw = np.concatenate([v.ravel() for v in w.values()]).astype("<f4").tobytes()
            needles.append(raw[len(raw) // 2 : len(raw) // 2 + 48])
        haystack = [p for p in coord.root.rglob("*") if p.is_file()]
        haystack.append(c.root / "logs" / "coordinator.log")
        for path in haystack:
            blob = path.read_bytes()
            for needle in needles:
                assert needle not in blob, f"an individual update leaked into {path}"
    finally:
        c.procs.stop_all()
