"""Backpressure: how many updates may be on their way to the coordinator at once.

The pure part (``fednode.uploads.UploadSlots``): a count and a byte budget, first come first
served, one always allowed, grants taken back after their time to live, released when a peer
leaves, and a session's asks dropped (and returned, so their peers are told) when its round
ends. End to end (real processes on 127.0.0.1; slow here, and in the fast suite through
conftest's ``cluster3``, whose coordinator runs with ``--max-uploads 1``): three
participants still complete every round, never more than one upload in flight, and the
round_completed events say how many waited.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fednode.uploads import Ask, UploadSlots
from tests.conftest import start_cluster
from tests.test_fedbuff_e2e import completed_events, run_session
from tests.test_quality_e2e import future_ids, spec_file

MIB = 1024 * 1024


def granted(out: list[tuple[str, Ask]]) -> list[str]:
    return [peer for peer, _ in out]


def test_no_more_than_max_count_in_flight_and_the_rest_wait_in_order() -> None:
    slots = UploadSlots(max_count=2)
    assert granted(slots.ask("a", Ask("s", 1, 10), 0.0)) == ["a"]
    assert granted(slots.ask("b", Ask("s", 1, 10), 0.0)) == ["b"]
    assert slots.ask("c", Ask("s", 1, 10), 0.0) == []
    assert slots.ask("d", Ask("s", 1, 10), 0.0) == []
    assert set(slots.granted) == {"a", "b"}
    assert granted(slots.release("b", 1.0)) == ["c"]  # the oldest waiting goes first
    assert granted(slots.release("a", 1.0)) == ["d"]
    assert set(slots.granted) == {"c", "d"} and not slots.waiting


def test_the_byte_budget_holds_back_a_large_update_but_never_blocks_one_alone() -> None:
    slots = UploadSlots(max_count=10, max_bytes=10 * MIB)
    assert granted(slots.ask("a", Ask("s", 1, 6 * MIB), 0.0)) == ["a"]
    assert slots.ask("b", Ask("s", 1, 6 * MIB), 0.0) == []  # 12 MiB would pass the budget
    assert slots.ask("c", Ask("s", 1, 1), 0.0) == []  # first come first served: not overtaken
    assert slots.bytes_in_flight == 6 * MIB
    assert granted(slots.release("a", 1.0)) == ["b", "c"]
    slots = UploadSlots(max_count=10, max_bytes=10 * MIB)
    assert granted(slots.ask("big", Ask("s", 1, 50 * MIB), 0.0)) == ["big"]  # alone: allowed


def test_a_grant_not_used_in_time_is_taken_back_and_passed_on() -> None:
    slots = UploadSlots(max_count=1, grant_ttl_s=60.0)
    slots.ask("silent", Ask("s", 1, 10), 0.0)
    slots.ask("b", Ask("s", 1, 10), 0.0)
    assert slots.expire(59.9) == []  # not yet
    assert granted(slots.expire(60.0)) == ["b"]
    assert not slots.holds("silent", "s", 1) and slots.holds("b", "s", 1)


def test_a_peer_that_leaves_frees_its_slot_and_its_place() -> None:
    slots = UploadSlots(max_count=1)
    slots.ask("a", Ask("s", 1, 10), 0.0)
    slots.ask("b", Ask("s", 1, 10), 0.0)
    slots.ask("c", Ask("s", 1, 10), 0.0)
    assert slots.release("b", 1.0) == []  # b left while waiting: a still holds the slot
    assert granted(slots.release("a", 1.0)) == ["c"]


def test_a_grant_is_for_its_session_and_round_only() -> None:
    slots = UploadSlots()
    slots.ask("a", Ask("s", 2, 10), 0.0)
    assert slots.holds("a", "s", 2)
    assert not slots.holds("a", "s", 1) and not slots.holds("a", "t", 2)
    assert not slots.holds("b", "s", 2)


def test_a_peer_holds_one_ask_at_a_time() -> None:
    slots = UploadSlots(max_count=1)
    slots.ask("a", Ask("s", 1, 10), 0.0)
    assert slots.ask("b", Ask("s", 1, 10), 0.0) == []
    assert slots.ask("b", Ask("s", 1, 10), 0.0) == []  # asking again does not queue it twice
    assert len(slots.waiting) == 1
    assert granted(slots.ask("a", Ask("s", 2, 10), 0.0)) == ["b"]  # a's new ask goes behind b
    assert list(slots.waiting) == ["a"]


def test_when_a_round_ends_its_asks_lapse_and_are_returned_to_be_told() -> None:
    slots = UploadSlots(max_count=1)
    slots.ask("a", Ask("s", 1, 10), 0.0)
    slots.ask("b", Ask("s", 1, 10), 0.0)
    slots.ask("c", Ask("t", 4, 10), 0.0)
    grants, dropped = slots.drop_session("s", 1.0)
    assert sorted(granted(dropped)) == ["a", "b"]
    assert granted(grants) == ["c"]  # the other session's ask gets the freed slot
    assert not slots.waiting and set(slots.granted) == {"c"}


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="max_count"):
        UploadSlots(max_count=0)
    with pytest.raises(ValueError, match="max_bytes"):
        UploadSlots(max_bytes=0)


@pytest.mark.slow  # 14 s; fast: every test on conftest's cluster3 (--max-uploads 1)
def test_one_upload_at_a_time_still_completes_every_round(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0, "--max-uploads", "1")
    try:
        ids = future_ids(c, 3)
        spec = spec_file(
            tmp_path,
            "one-at-a-time",
            rounds=2,
            participants=ids,
            min_participants=3,
            training={"local_epochs": 1},
        )
        for k in range(3):
            c.start_participant(k, 3)
        sid, _wall, status = run_session(c, spec)
        assert status["status"] == "completed" and status["rounds_completed"] == 2, status
        events = completed_events(c, sid)
        assert len(events) == 2
        for ev in events:
            assert ev["uploads_peak"] == 1, ev  # never two updates in flight at once
            assert 0 <= ev["uploads_waited"] <= 2, ev
    finally:
        c.procs.stop_all()
