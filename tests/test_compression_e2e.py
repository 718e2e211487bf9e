"""Update compression end to end: real processes on 127.0.0.1, the codec chosen by the spec.

One cluster, two sessions in turn: a plain session with topk_quantize (its update frames
must be many times smaller than float32, each participant must keep its error-feedback
residual in its own ledger, and the sizes must reach the coordinator's ledger and `session
status`), then a secure session with randk, the one compressing codec secure aggregation
can sum (its masked frames hold only the round's shared coordinates).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocol.cid import CHUNK_SIZE
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file, start_and_watch

pytestmark = pytest.mark.timeout(180)

# 64·1024 + 1024 + 1024·10 + 10 = 76,810 values: a 307 kB file, which is more than one chunk
# (256 KiB): a dag-pb root over two raw leaves, streamed block by block in round 1
MODEL = {"kind": "mlp", "hidden": [1024]}
VALUES = 64 * 1024 + 1024 + 1024 * 10 + 10


def test_compressed_sessions_complete_plain_and_secure(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 2)
        common = {"participants": ids, "min_participants": 2, "model": MODEL}
        plain = create(
            c,
            spec_file(
                tmp_path,
                "topk",
                rounds=3,
                compression={"codec": "topk+quantize", "fraction": 0.05, "bits": 8},
                **common,
            ),
        )
        for k in range(2):
            c.start_participant(k, 2)
        start_and_watch(c, plain)
        s = cli_json("session", "status", plain, target=c)
        assert s["status"] == "completed" and s["rounds_completed"] == 3, s
        assert s["final_accuracy"] > 0.5, s  # it learned through 5 % of its values a round
        comp = s["compression"]
        assert comp["codec"] == "topk_quantize"
        assert comp["up_raw"] == 6 * 4 * VALUES  # 3 rounds x 2 updates, float32
        # 3,841 values of 76,810: a byte each and about one for its index, plus the frame
        assert comp["up_ratio"] > 10, comp
        assert len(s["traffic"]) == 6 and all(
            t["bytes"] < t["bytes_raw"] / 10 for t in s["traffic"]
        )
        assert all(h["up_ratio"] > 10 for h in s["history"]), s["history"]
        # the model came down whole in round 1, then as a lossless difference from the one
        # each participant held (compression.downlink = "delta", the default), checked there
        # against the round's CID: a topk round changes few weights, so it is much smaller
        down = {(t["round"], t["participant"]): t for t in s["traffic"]}
        for (n, _peer), t in down.items():
            assert 2 * CHUNK_SIZE > t["down_raw"] > max(4 * VALUES, CHUNK_SIZE)
            assert (
                t["down_bytes"] > t["down_raw"] if n == 1 else t["down_bytes"] < t["down_raw"] / 2
            )
        size = down[(1, ids[0])]["down_raw"]
        for home in c.participant_homes:  # round 1: the root and two leaves, each checked
            (task,) = rows(home.ledger_path, "SELECT * FROM participant_tasks WHERE round = 1")
            assert task["status"] == "done" and size < task["bytes_down"] < size + 500
        for home in c.participant_homes:  # what each left unsent, kept in its own ledger
            (res,) = rows(
                home.ledger_path, "SELECT round, codec FROM residuals WHERE session_id = ?", plain
            )
            assert (res["round"], res["codec"]) == (3, "topk_quantize")

        secure = create(
            c,
            spec_file(
                tmp_path,
                "randk",
                rounds=2,
                aggregation={"secure": True},
                compression={"codec": "randk", "fraction": 0.1, "downlink": "delta_fp16"},
                **common,
            ),
        )
        start_and_watch(c, secure)
        s = cli_json("session", "status", secure, target=c)
        assert s["status"] == "completed" and s["rounds_completed"] == 2, s
        # a masked frame holds 7,681 of 76,810 coordinates (plus the weight), a few bytes each
        masked = [t["bytes"] for t in s["traffic"]]
        assert len(masked) == 4 and max(masked) < 4 * VALUES / 3, masked
        # round 2's model came down as its difference in 16 bits: half the model and less
        assert all(t["down_bytes"] < t["down_raw"] * 0.55 for t in s["traffic"] if t["round"] == 2)
        for home in c.participant_homes:
            (res,) = rows(
                home.ledger_path, "SELECT round, codec FROM residuals WHERE session_id = ?", secure
            )
            assert (res["round"], res["codec"]) == (2, "randk")
    finally:
        c.procs.stop_all()


# codec -> the least it must shrink the uplink of the demo's model (the codecs' ratios by
# design, less the frame's fixed bytes)
EVERY_CODEC = {
    "fp16": 1.8,
    "bf16": 1.8,
    "quantize": 3.0,  # 8 bits
    "topk": 10.0,  # fraction 0.01 of the values, a float32 and an index each
    "topk+quantize": 10.0,
    "randk": 10.0,
}


@pytest.mark.slow
@pytest.mark.parametrize("codec", sorted(EVERY_CODEC))
def test_every_codec_completes_a_demo(tmp_path: Path, codec: str) -> None:
    """A federation of real processes completes with each codec (`fedctl demo --codec`),
    learns, and its uplink shrinks by what the codec is for."""
    res = cli(
        "--key", str(tmp_path / "op.key"), "demo", "--participants", "2", "--rounds", "4",
        "--codec", codec, "--workdir", str(tmp_path / "demo"), "--json", timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads(res.stdout)
    assert s["status"] == "completed" and s["rounds_completed"] == 4, s
    acc = [h["accuracy"] for h in s["history"]]
    # randk at its default fraction (0.01) sends 1 % of the coordinates, chosen blindly: 4
    # rounds move the model, not far (benchmarks/compression.py measures it over 20)
    assert acc[-1] > (acc[0] if codec == "randk" else 0.5), acc
    assert s["compression"]["up_ratio"] >= EVERY_CODEC[codec], s["compression"]
