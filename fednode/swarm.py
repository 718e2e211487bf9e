"""`fednode swarm`: many participant identities in one process.

Each virtual participant is a whole ``fednode.participant.Participant``: its own Ed25519 key
(``DATA_DIR/virtual-K/identity.key``, 0600, made on the first run and reused after), its own
websocket connection and handshake, its own signed envelopes, its own shard ``digits:K/N``
and its own ledger (``DATA_DIR/virtual-K/ledger.db``). The coordinator cannot tell them from
separate machines. What they share is what is safe to share in one process: torch (one
intra-op thread), the digits data as loaded and cut (fednode.data caches it per cut, read
only), the content store (content-addressed, written by atomic renames; ``--store own`` gives
each its own), and two bounds: at most ``workers`` trainings at once and at most
``dial_slots`` handshakes in flight (below the coordinator's default --max-pending, so a
swarm starting or re-dialling after a coordinator restart is not refused for crowding).

This module holds the swarm's configuration, identities and bounds (no torch: the CLI checks
its options before importing it); fednode.virtual builds and runs the participants.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import resource
from pathlib import Path

from fednode.data import PARTITIONS
from fednode.files import private_dir
from fednode.home import NodeHome
from protocol.errors import UsageError

MAX_PARTICIPANTS = 10_000
# Open files each virtual participant holds for as long as it runs: its ledger (the database,
# its -wal and -shm files: measured 3 per fednode.ledger.Ledger) and its connection.
FDS_PER_PARTICIPANT = 4
# Files of the process itself: the interpreter, torch's libraries, logs, a store block being
# written by each worker thread.
FD_HEADROOM = 256
DEFAULT_DIAL_SLOTS = 32  # half of the coordinator's default --max-pending (64)
PEERS_FILE = "peers.txt"
STORES = ("shared", "own")


class CountedSlots(asyncio.Semaphore):
    """A semaphore that remembers the most holders it ever had at once (``peak``), so a
    swarm can show that its bound held."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.held = 0
        self.peak = 0

    async def acquire(self) -> bool:
        await super().acquire()
        self.held += 1
        self.peak = max(self.peak, self.held)
        return True

    def release(self) -> None:
        self.held -= 1
        super().release()


def fds_needed(participants: int) -> int:
    return participants * FDS_PER_PARTICIPANT + FD_HEADROOM


def raise_fd_limit(participants: int) -> int:
    """Make room for ``participants`` in RLIMIT_NOFILE: the soft limit goes up to the hard
    limit when it is too low (the default soft limit, 1024, holds about 190). Returns the
    soft limit now in force; a UsageError when even the hard limit is too low."""
    need = fds_needed(participants)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            most = max(0, (hard - FD_HEADROOM) // FDS_PER_PARTICIPANT)
            raise UsageError(
                f"--participants {participants} needs about {need} open files "
                f"({FDS_PER_PARTICIPANT} per participant: its ledger and connection), above "
                f"this process' hard limit of {hard} (RLIMIT_NOFILE)",
                hint=f"run at most {most} per swarm process (several swarms may join one "
                "coordinator), or raise the hard limit: `ulimit -Hn` as root, LimitNOFILE= "
                "in a systemd unit, or nofile in /etc/security/limits.conf",
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def virtual_homes(root: Path, ks: range) -> list[NodeHome]:
    """``root/virtual-K`` for each K of ``ks``: folders 0700, each with its key (0600),
    made if missing and reused if present, so a restarted swarm keeps its identities."""
    private_dir(root)
    homes = [NodeHome(root / f"virtual-{k}") for k in ks]
    for home in homes:
        home.init()
    return homes


@dataclasses.dataclass
class SwarmConfig:
    root: Path
    participants: int
    url: str
    coordinator_id: str
    dataset: str = "digits"
    partition: str = ""  # "": the session's data.partition decides
    workers: int = 1
    join_token: str = ""
    store: str = "shared"
    dial_slots: int = DEFAULT_DIAL_SLOTS
    first: int = 0  # the first K of this process (a Ray actor hosts a slice of the swarm)
    count: int | None = None  # how many from ``first`` (None: to the end)

    def check(self) -> None:
        """Every option against its range, before anything is made on disk."""
        if not 1 <= self.participants <= MAX_PARTICIPANTS:
            raise UsageError(
                f"--participants {self.participants}: use 1 to {MAX_PARTICIPANTS:,}",
                hint="start several swarms against one coordinator for more",
            )
        if self.dataset != "digits":
            raise UsageError(
                f"--dataset {self.dataset!r}: a swarm shards the digits only",
                hint="use --dataset digits (virtual participant K gets digits:K/N); run "
                "`fednode run --role participant` for your own data",
            )
        if self.partition and self.partition not in PARTITIONS:
            raise UsageError(
                f"--partition {self.partition!r} is not a partition",
                hint=f"use one of {', '.join(PARTITIONS)}",
            )
        if self.workers < 1:
            raise UsageError(f"--workers {self.workers}: use 1 or more")
        if self.store not in STORES:
            raise UsageError(f"--store {self.store!r}: use shared or own")
        if self.dial_slots < 1:
            raise UsageError(f"--max-dialing {self.dial_slots}: use 1 or more")

    def ks(self) -> range:
        end = self.participants if self.count is None else self.first + self.count
        return range(self.first, min(end, self.participants))


def split_groups(participants: int, actors: int) -> list[range]:
    """The Ks of each of ``actors`` groups (`fednode swarm --ray`, one group per Ray actor):
    contiguous, in order, sizes differing by at most one (the first ``participants % actors``
    groups hold one more), so every K is in exactly one group."""
    if not 1 <= actors <= participants:
        raise UsageError(
            f"--actors {actors}: use 1 to {participants} (one group of virtual participants "
            "per actor, at least one participant each)",
            hint="leave --actors out for one actor per CPU of the Ray cluster",
        )
    size, extra = divmod(participants, actors)
    starts = [i * size + min(i, extra) for i in range(actors + 1)]
    return [range(a, b) for a, b in itertools.pairwise(starts)]


def default_actors(cpus: float, participants: int) -> int:
    """One actor per CPU of the Ray cluster, at most one per participant."""
    return max(1, min(int(cpus), participants))


def cpus_per_actor(cpus: float, actors: int) -> float:
    """The CPUs each actor asks Ray for, so that all ``actors`` fit the cluster at once: one
    each while there are enough, else an equal share (Ray takes fractions of at most 1 to
    four decimals)."""
    if actors <= cpus:
        return 1.0
    return max(0.0001, int(cpus / actors * 10_000) / 10_000)


def write_peers(root: Path, peer_ids: list[str]) -> Path:
    """The swarm's peer IDs, one a line (0600 by the node's umask), for a spec's
    ``participants`` list."""
    path = root / PEERS_FILE
    path.write_text("".join(f"{p}\n" for p in peer_ids))
    return path
