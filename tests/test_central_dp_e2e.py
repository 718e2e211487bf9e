"""Central DP with secure aggregation, end to end: real processes on 127.0.0.1.

Two participants, two secure rounds of DP-FedAvg with distributed noise: each participant
clips its update to clip_norm and adds its share of the noise before masking; the
coordinator assigns every one weight 1, decodes the noisy sum and accounts the round. The
participants are started with the session's spec (``--spec``), which asks for noisy
reports: the data quality the coordinator scores from their registration differs from the
exact one of their data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fednode import quality
from fednode.data import load_partition
from fednode.participant import _AS_LOADED
from fednode.schema import Schema
from protocol import spec as specmod
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file

pytestmark = pytest.mark.timeout(120)

SIGMA, CLIP = 0.8, 1.0


def test_a_secure_central_dp_session_adds_distributed_noise_and_accounts_it(
    tmp_path: Path,
) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 2)
        spec = spec_file(
            tmp_path,
            "cdp",
            rounds=2,
            participants=ids,
            min_participants=2,
            # the noise of 3 users' DP is large (docs/privacy.md): publish whatever is finite
            aggregation={"secure": True, "max_loss_factor": 0.0},
            privacy={
                "mode": "central_dp",
                "noise_multiplier": SIGMA,
                "clip_norm": CLIP,
                "delta": 1e-5,
                "noisy_reports": True,
                "report_epsilon": 1.0,
            },
        )
        sid = create(c, spec)
        for k in range(2):
            c.start_participant(k, 2, "--spec", str(spec))
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=100)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status

        led = c.coordinator_home.ledger_path
        released = rows(
            led, "SELECT * FROM central_dp_rounds WHERE session_id = ? ORDER BY id", sid
        )
        assert [r["round"] for r in released] == [1, 2]
        m = 2  # the fewest of 2 inputs SecAgg can unmask: both (a secret needs 2 shares)
        acc = RDPAccountant()
        for r in released:
            assert r["secure"] == 1 and r["updates"] == 2 and r["share_count"] == m
            assert r["sample_rate"] == 1.0 and r["selected"] == r["eligible"] == 2
            # n = m shares carry the planned variance σ²C² (n > m: n/m of it, test_central_dp)
            assert r["noise_multiplier"] == pytest.approx(SIGMA)
            assert r["noise_std"] == pytest.approx(SIGMA * CLIP / 2)  # σC on the sum, / n
            acc.step(noise_multiplier=r["noise_multiplier"], sample_rate=r["sample_rate"])
            assert r["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
        events = rows(
            led, "SELECT data FROM events WHERE session_id = ? AND kind = ?", sid, "central_dp"
        )
        assert [json.loads(e["data"])["epsilon"] for e in events] == [
            r["epsilon"] for r in released
        ]
        aggs = [
            json.loads(e["data"])
            for e in rows(
                led, "SELECT data FROM events WHERE session_id = ? AND kind = ?", sid, "aggregation"
            )
        ]
        assert all(set(a["assigned"].values()) == {1} for a in aggs)  # uniform weights
        assert all(a["max_update_norm"] == CLIP for a in aggs)
        # the quality framework counts a round as private when its aggregate was noisy
        compliance = rows(
            led,
            "SELECT privacy_compliance FROM session_quality_metrics WHERE session_id = ? "
            "ORDER BY id",
            sid,
        )
        assert compliance and compliance[-1]["privacy_compliance"] == 100.0

        for home in c.participant_homes:
            inputs = [
                json.loads(r["data"])
                for r in rows(
                    home.ledger_path,
                    "SELECT data FROM events WHERE session_id = ? AND kind = 'secagg_input'",
                    sid,
                )
            ]
            assert len(inputs) == 2
            for x in inputs:
                share = x["central_dp"]
                assert share["share_count"] == m and share["clip_norm"] == CLIP
                assert share["std"] == pytest.approx(SIGMA * CLIP / math.sqrt(m))
                assert x["max_update_norm"] == CLIP

        # noisy reports: the coordinator scored the participants' data from noisy reports
        schema = Schema.from_spec(specmod.load(spec))
        scored = {
            r["peer_id"]: r["data_quality"]
            for r in rows(
                led,
                "SELECT peer_id, data_quality FROM participant_quality_metrics WHERE "
                "data_quality IS NOT NULL",
            )
        }
        assert set(ids) <= set(scored)
        differ = 0
        for k, peer in enumerate(ids):
            data = load_partition(f"digits:{k}/2", **_AS_LOADED, schema=schema)
            exact = quality.data_quality_score(quality.data_report(data.x, data.y))
            differ += scored[peer] != pytest.approx(exact, abs=1e-9)
        assert differ >= 1  # both exact by chance: below 1e-10 at ε = 1
    finally:
        c.procs.stop_all()
