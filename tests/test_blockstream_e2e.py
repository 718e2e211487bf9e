"""A model of several blocks streamed from a real coordinator to a real participant.

Every other end-to-end test uses a model under one chunk (256 KiB), which is a single raw
block: a stream of one. Here hidden = [1024] makes a 300 KB model, a dag-pb root over two
raw leaves, so the participant checks three blocks in the walk's order before it trains;
the bytes it reports are the blocks', a little more than the file's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.cid import CHUNK_SIZE
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, rows, spec_file

# tests/test_compression_e2e.py streams the same multi-block model in its fast run
pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_a_model_of_several_blocks_is_streamed_and_trained_on(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0)
    try:
        ids = future_ids(c, 1)
        spec = spec_file(
            tmp_path,
            "stream",
            rounds=1,
            participants=ids,
            min_participants=1,
            model={"hidden": [1024]},
        )
        sid = create(c, spec)
        c.start_participant(0, 1)
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=90)
        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == 1, status

        led = c.coordinator_home.ledger_path
        (rnd,) = rows(
            led,
            "SELECT model_cid_in, bytes_down FROM training_rounds WHERE session_id = ?",
            sid,
        )
        (version,) = rows(led, "SELECT size FROM model_versions WHERE cid = ?", rnd[0])
        size = version["size"]
        assert 2 * CHUNK_SIZE > size > CHUNK_SIZE  # a root and two leaves
        (task,) = rows(c.participant_homes[0].ledger_path, "SELECT * FROM participant_tasks")
        assert task["status"] == "done" and task["model_cid"] == rnd[0]
        # the two leaves hold the file; the root adds its links (about 100 bytes)
        assert size < task["bytes_down"] < size + 500, (size, task["bytes_down"])
        # the coordinator counts whole frames: three blocks' headers on top
        assert rnd[1] >= task["bytes_down"]
    finally:
        c.procs.stop_all()
