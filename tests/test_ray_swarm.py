"""`fednode swarm --ray`'s parts that need no Ray: how N identities are cut into one group
per actor, how many actors and CPUs each, and the options refused before Ray starts (the
end-to-end run with a local Ray instance is tests/test_ray_swarm_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fednode.swarm import cpus_per_actor, default_actors, split_groups
from protocol.errors import UsageError
from protocol.identity import Identity


def test_fifty_in_two_groups() -> None:
    assert split_groups(50, 2) == [range(0, 25), range(25, 50)]
    assert split_groups(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert split_groups(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]


@given(st.integers(1, 10_000), st.data())
def test_every_identity_is_in_exactly_one_group_of_near_equal_size(
    n: int, data: st.DataObject
) -> None:
    actors = data.draw(st.integers(1, min(n, 512)))
    groups = split_groups(n, actors)
    assert len(groups) == actors
    assert [k for g in groups for k in g] == list(range(n))  # all, once, in order
    sizes = {len(g) for g in groups}
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("actors", [0, -1, 51])
def test_a_group_count_out_of_range_is_refused_naming_the_option(actors: int) -> None:
    with pytest.raises(UsageError, match=f"--actors {actors}: use 1 to 50"):
        split_groups(50, actors)


def test_one_actor_per_cpu_at_most_one_per_participant() -> None:
    assert default_actors(2.0, 50) == 2
    assert default_actors(64.0, 10) == 10
    assert default_actors(0.5, 10) == 1  # a cluster with less than a CPU still gets one


def test_actors_ask_for_a_share_of_the_cpus_so_that_all_fit() -> None:
    assert cpus_per_actor(2.0, 2) == 1.0
    assert cpus_per_actor(2.0, 8) == 0.25
    assert cpus_per_actor(2.0, 3) * 3 <= 2.0
    assert cpus_per_actor(1.0, 100_000) == 0.0001  # Ray's smallest share


def _swarm(
    tmp_path: Path, *extra: str, block_ray: bool = False
) -> subprocess.CompletedProcess[str]:
    coordinator = Identity.generate().peer_id
    # sys.modules["ray"] = None makes `import ray` fail, as on a machine without the extra.
    prelude = "import sys; sys.modules['ray'] = None; " if block_ray else ""
    code = prelude + "from fednode.cli import main; main()"
    args = ["swarm", "--participants", "4", "--coordinator", "ws://127.0.0.1:9"]
    args += ["--coordinator-id", coordinator, "--data-dir", str(tmp_path / "s"), *extra]
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_actors_without_ray_is_refused(tmp_path: Path) -> None:
    res = _swarm(tmp_path, "--actors", "2")
    assert res.returncode == 2, res.stderr
    assert "--actors 2: only with --ray" in res.stderr


def test_more_actors_than_participants_is_refused_before_ray_starts(tmp_path: Path) -> None:
    res = _swarm(tmp_path, "--ray", "local", "--actors", "5", block_ray=True)
    assert res.returncode == 2, res.stderr
    assert "--actors 5: use 1 to 4" in res.stderr


def test_without_the_extra_ray_is_refused_naming_the_install(tmp_path: Path) -> None:
    res = _swarm(tmp_path, "--ray", "local", block_ray=True)
    assert res.returncode == 2, res.stderr
    assert "ray is not installed" in res.stderr and "fednode[ray]" in res.stderr
    assert not (tmp_path / "s" / "virtual-0").exists()  # nothing made
