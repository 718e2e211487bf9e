"""`fednode swarm`'s parts without a coordinator: identities kept across restarts, the open
file limit, the bounds on trainings at once, the shared digits cut, the partition check."""

from __future__ import annotations

import asyncio
import json
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fednode import data
from fednode.swarm import (
    FD_HEADROOM,
    FDS_PER_PARTICIPANT,
    CountedSlots,
    SwarmConfig,
    fds_needed,
    raise_fd_limit,
    virtual_homes,
)
from protocol.errors import SpecError, UsageError
from protocol.identity import Identity


def test_identities_are_made_once_private_and_reused(tmp_path: Path) -> None:
    root = tmp_path / "swarm"
    first = [h.identity().peer_id for h in virtual_homes(root, range(3))]
    assert len(set(first)) == 3
    again = [h.identity().peer_id for h in virtual_homes(root, range(3))]
    assert again == first  # a restarted swarm keeps its identities
    # a Ray actor's slice sees the same keys as the whole swarm
    assert [h.identity().peer_id for h in virtual_homes(root, range(1, 3))] == first[1:]
    for k in range(3):
        folder = root / f"virtual-{k}"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "identity.key").stat().st_mode) == 0o600
        assert Identity.load(folder / "identity.key").peer_id == first[k]


def test_the_soft_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < fds_needed(100):
        pytest.skip(f"this machine's hard limit ({hard}) is below 100 participants' need")
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_HEADROOM, hard))  # lowering is allowed
    try:
        got = raise_fd_limit(100)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == got
        assert got == hard or (hard == resource.RLIM_INFINITY and got >= fds_needed(100))
        assert raise_fd_limit(1) == got  # enough already: left as it is
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _hard_limit_512() -> None:  # in the child: a hard limit cannot be raised back
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))


def test_too_many_participants_for_the_hard_limit_is_a_usage_error_saying_what_to_do(
    tmp_path: Path,
) -> None:
    ident = Identity.generate()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "fednode", "swarm", "--participants", "500"),
            *("--coordinator", "ws://127.0.0.1:1", "--coordinator-id", ident.peer_id),
            *("--data-dir", str(tmp_path / "swarm")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_hard_limit_512,
    )
    assert proc.returncode == 2, proc.stderr
    err = " ".join(proc.stderr.split())
    most = (512 - FD_HEADROOM) // FDS_PER_PARTICIPANT
    assert "--participants 500" in err and "hard limit of 512" in err, err
    assert f"run at most {most} per swarm process" in err and "ulimit -Hn" in err, err
    assert not (tmp_path / "swarm").exists()  # refused before any key was made


async def test_the_pool_bounds_trainings_at_once() -> None:
    slots = CountedSlots(3)
    done: list[int] = []

    async def train(k: int) -> None:
        async with slots:
            for _ in range(3):  # yield inside the slot, so that the others get their turn
                await asyncio.sleep(0)
            done.append(k)

    await asyncio.gather(*(train(k) for k in range(10)))
    assert sorted(done) == list(range(10))
    assert slots.peak == 3  # all ten would have been inside at once without the bound
    assert slots.held == 0


def test_options_are_checked_with_their_names() -> None:
    base = {"root": Path("/nonexistent"), "url": "ws://h:1", "coordinator_id": "x"}
    for kw, words in [
        ({"participants": 0}, "--participants 0"),
        ({"participants": 10_001}, "--participants 10001"),
        ({"participants": 3, "dataset": "csv:/d.csv"}, "--dataset 'csv:/d.csv'"),
        ({"participants": 3, "partition": "zipf"}, "--partition 'zipf'"),
        ({"participants": 3, "store": "cloud"}, "--store 'cloud'"),
    ]:
        with pytest.raises(UsageError) as info:
            SwarmConfig(**base, **kw).check()  # type: ignore[arg-type]
        assert words in info.value.message
    assert SwarmConfig(**base, participants=5, first=3).ks() == range(3, 5)  # type: ignore[arg-type]


def test_the_digits_cut_is_shared_read_only_and_every_shard_is_its_own() -> None:
    data._digits_cut.cache_clear()
    n = 7
    shards = [
        data.load_partition(
            f"digits:{k}/{n}", features="standardize", partition="dirichlet", seed=3
        )
        for k in range(n)
    ]
    info = data._digits_cut.cache_info()
    assert (info.misses, info.hits) == (1, n - 1)  # cut once for the seven shards
    whole = data._digits_cut(data.Cut("standardize", "dirichlet", 3, hold_out=False), n)
    assert not whole.train.x.flags.writeable
    assert sum(len(s) for s in shards) == len(whole.train)  # disjoint shards, all rows
    assert all(s.x.flags.writeable for s in shards)  # each participant's copy is its own


def test_a_swarm_started_for_a_partition_declines_another(tmp_path: Path) -> None:
    from fednode.ledger import Ledger
    from fednode.store import open_store
    from fednode.virtual import VirtualParticipant
    from protocol import spec

    with Ledger(tmp_path / "l.db") as ledger:
        node = VirtualParticipant(
            Identity.generate(),
            ledger,
            open_store(tmp_path / "store"),
            url="ws://127.0.0.1:1",
            coordinator_id=Identity.generate().peer_id,
            dataset=data.DatasetRef("digits", shard=0, num_shards=2),
        )
        node.partition = "dirichlet"
        s = spec.defaults()
        with pytest.raises(SpecError) as info:
            node._local_data(s)
        assert "data.partition is 'iid'" in info.value.message
        assert "--partition dirichlet" in info.value.message
        s["data"]["partition"] = "dirichlet"
        train, _test = node._local_data(s)
        assert len(train) > 0


def test_the_demo_runs_more_than_32_only_as_a_swarm_and_never_drops_from_one(
    tmp_path: Path,
) -> None:
    from tests.conftest import cli

    for extra, words in [
        (("--participants", "33"), "at most 32 as processes"),
        (("--participants", "5", "--swarm", "--drop", "1"), "--drop and --attackers"),
    ]:
        res = cli(
            *("--key", str(tmp_path / "op.key"), "demo", *extra),
            *("--workdir", str(tmp_path / "d"), "--json"),
        )
        assert res.returncode == 2, res.stderr
        error = json.loads(res.stdout)["error"]
        assert error["code"] == "USAGE" and words in error["message"], error
    assert not (tmp_path / "d").exists()
