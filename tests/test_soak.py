"""The soak: 100 virtual participants, 200 rounds, a tenth of them killed and restarted.

One coordinator process and 10 `fednode swarm` processes of 10 identities each (100 peer IDs,
each swarm in its own data dir). A session of 200 logreg rounds on the digits needs 85
updates a round, so it goes on while one swarm (10 %) is down. A seeded schedule (the seed
is printed) kills a random swarm with SIGKILL at a random round, starts it again on the same
data dir (the same identities) a few rounds later, waits until each of its identities has
contributed again, and does it again some 15 to 25 rounds on, until 40 rounds before the end.

It checks that every round 1..200 has exactly one row in the coordinator's ledger, completed
at its first attempt; that every accepted update belongs to a round that selected its
sender, once per sender and round; that the killed identities came back and contributed; and
that the coordinator's RSS and open file descriptors, sampled every 10 rounds, stay flat.

Waiting is on the coordinator's ledger (rounds completed) and its `participants.list`,
polled every POLL_S; the run stops itself past WALL_BUDGET_S.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from fedctl.client import AdminClient, Target
from fednode.home import NodeHome
from tests.conftest import Cluster, start_cluster
from tests.test_quality_e2e import create, spec_file

WALL_BUDGET_S = 600.0  # the run fails past this (measured: see docs/scale.md, "Soak")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(WALL_BUDGET_S) + 180)]

SWARMS = 10
PER_SWARM = 10
ROUNDS = 200
MIN_PARTICIPANTS = 85  # 100 less one swarm, with room for a straggler
# A killed participant's connection closes at once (the coordinator drops it from the round);
# the timeout only bounds a round whose peer hangs without closing.
ROUND_TIMEOUT_S = 30.0
SAMPLE_EVERY = 10  # rounds between samples of the coordinator's RSS and open files
WARM_UP = 20  # rounds before the RSS baseline (first allocations, caches, the ledger's pages)
LAST_KILL = ROUNDS - 40  # no kill after this round: its swarm must have time to come back
POLL_S = 0.25
# The coordinator may grow by this much over the run: RSS by 20 % of its baseline or
# 50 MiB, whichever is more; open files (all swarms connected) by a few.
RSS_GROWTH = 0.20
RSS_SLACK = 50 * 2**20
FD_SLACK = 4


@dataclasses.dataclass
class Sample:
    round: int
    t: float
    rss: int
    fds: int
    online: int


@dataclasses.dataclass
class Kill:
    swarm: int
    killed_at: int  # rounds completed when it was killed
    restarted_at: int  # rounds completed when it was started again
    down_s: float  # from the kill to its ready line
    back_s: float  # from its ready line to all of its identities online
    contributed_in: int  # the first round after the restart that each of them contributed to
    acked: int  # uptime alerts on its identities acknowledged to readmit them


@dataclasses.dataclass
class Soak:
    """The run's view of the coordinator: rounds completed from its ledger, who is online
    from its admin API, and its process' RSS and open files every SAMPLE_EVERY rounds."""

    c: Cluster
    sid: str
    client: AdminClient
    ledger: sqlite3.Connection
    coordinator: psutil.Process
    deadline: float
    samples: list[Sample] = dataclasses.field(default_factory=list)
    rounds_done: int = 0
    status: str = "created"
    acked: int = 0  # uptime alerts acknowledged (readmit)

    async def poll(self) -> None:
        self.status, self.rounds_done = self.ledger.execute(
            "SELECT status, rounds_completed FROM sessions WHERE session_id = ?", (self.sid,)
        ).fetchone()
        assert self.status in ("created", "running", "completed"), self.status
        if time.monotonic() > self.deadline:
            raise AssertionError(
                f"past the wall budget of {WALL_BUDGET_S:.0f} s at round {self.rounds_done}"
            )
        if self.rounds_done >= len(self.samples) * SAMPLE_EVERY:
            await self.sample()

    async def sample(self) -> None:
        online = len(await self.online())
        mem = self.coordinator.memory_info()
        s = Sample(self.rounds_done, time.monotonic(), mem.rss, self.coordinator.num_fds(), online)
        self.samples.append(s)

    async def online(self) -> set[str]:
        got = await self.client.call("participants.list", online=True)
        return {p["peer_id"] for p in got["participants"]}

    async def readmit(self, peers: set[str]) -> int:
        """Acknowledge the open critical alerts on ``peers``, as their operator would: a
        restart soon after the first connection leaves uptime under 90 % of the time since
        (fednode.quality.UPTIME_MIN), and the alert keeps the peer out of selection until
        uptime recovers (ten times the time it was down) or it is acknowledged."""
        got = await self.client.call("alerts.list", status="open", severity=["critical"])
        mine = [a for a in got["alerts"] if a["entity_id"] in peers]
        assert {a["alert_type"] for a in mine} <= {"uptime"}, mine
        for a in mine:
            await self.client.call("alerts.ack", alert_id=a["id"])
        return len(mine)

    async def until(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll until ``check`` holds; fail if the session ends (or fails) first."""
        while True:
            await self.poll()
            if await check():
                return
            assert self.status != "completed", f"the session ended before {what}"
            await asyncio.sleep(POLL_S)

    async def until_round(self, n: int) -> None:
        async def done() -> bool:
            return self.rounds_done >= n

        await self.until(f"round {n}", done)

    def contributed_since(self, peers: set[str], after: int) -> int | None:
        """The round by which every one of ``peers`` had an accepted update in a round after
        ``after``; None while one has not."""
        first = self.ledger.execute(
            "SELECT participant, MIN(round) FROM client_updates WHERE session_id = ? "
            "AND status = 'accepted' AND round > ? GROUP BY participant",
            (self.sid, after),
        ).fetchall()
        rounds = {p: r for p, r in first if p in peers}
        return max(rounds.values()) if len(rounds) == len(peers) else None


def swarm_ids(root: Path) -> list[list[str]]:
    """The peer IDs each swarm will have (its keys made now, reused by `fednode swarm`), so
    that the session can list them before the swarms start."""
    return [
        [NodeHome(root / f"swarm-{s}" / f"virtual-{k}").init()[0].peer_id for k in range(PER_SWARM)]
        for s in range(SWARMS)
    ]


def start_swarm(c: Cluster, root: Path, s: int, name: str) -> None:
    # 6 handshakes in flight per swarm: 10 swarms stay under the coordinator's --max-pending
    ready = c.procs.start_swarm(
        root / f"swarm-{s}", c.ready, PER_SWARM, "--workers", "1", "--max-dialing", "6", name=name
    )
    assert ready["event"] == "started" and len(ready["peer_ids"]) == PER_SWARM, ready


async def drive(soak: Soak, root: Path, ids: list[set[str]], rng: random.Random) -> list[Kill]:
    """Kill a swarm at a random round, start it again 2 to 4 rounds later, wait until its
    identities contribute again; repeat 15 to 25 rounds on while the session leaves room."""
    c, kills, starts = soak.c, [], Counter[int]()
    at = rng.randint(12, 20)
    while at <= LAST_KILL:
        await soak.until_round(at)
        s = rng.randrange(SWARMS)
        name = f"swarm-{s}" if starts[s] == 0 else f"swarm-{s}-{starts[s]}"
        killed_at, t_kill = soak.rounds_done, time.monotonic()
        c.procs.kill(name)
        c.procs.procs[name].wait(timeout=30)

        async def gone(s: int = s) -> bool:
            return not (await soak.online()) & ids[s]

        await soak.until(f"swarm {s} offline", gone)
        await soak.until_round(killed_at + rng.randint(2, 4))
        starts[s] += 1
        await asyncio.to_thread(start_swarm, c, root, s, f"swarm-{s}-{starts[s]}")
        restarted_at, t_ready = soak.rounds_done, time.monotonic()

        async def back(s: int = s) -> bool:
            return ids[s] <= await soak.online()

        await soak.until(f"swarm {s} online again", back)
        t_back = time.monotonic()

        async def contributed(s: int = s, after: int = restarted_at) -> bool:
            soak.acked += await soak.readmit(ids[s])
            return soak.contributed_since(ids[s], after) is not None

        acked = soak.acked
        await soak.until(f"swarm {s} contributing again", contributed)
        got = soak.contributed_since(ids[s], restarted_at)
        assert got is not None
        kills.append(
            Kill(
                s, killed_at, restarted_at, t_ready - t_kill, t_back - t_ready, got,
                soak.acked - acked,
            )
        )  # fmt: skip
        print(f"kill {len(kills)}: {kills[-1]}", flush=True)
        at = max(soak.rounds_done + 1, killed_at + rng.randint(15, 25))

    while soak.status != "completed":  # the last samples, until the session ends
        await asyncio.sleep(POLL_S)
        await soak.poll()
    return kills


def rows(db: sqlite3.Connection, sql: str, *args: object) -> list[sqlite3.Row]:
    db.row_factory = sqlite3.Row
    try:
        return list(db.execute(sql, args))
    finally:
        db.row_factory = None


def test_soak_100_virtual_participants_200_rounds_with_kills(tmp_path: Path) -> None:
    seed = random.randrange(10**6)
    print(f"soak seed {seed}")
    rng = random.Random(seed)
    root = tmp_path / "swarms"
    ids = swarm_ids(root)
    c = start_cluster(tmp_path / "fed", 0)
    try:
        spec = spec_file(
            tmp_path,
            "soak",
            rounds=ROUNDS,
            participants=[p for group in ids for p in group],
            min_participants=MIN_PARTICIPANTS,
            model={"kind": "logreg"},
            training={"local_epochs": 1, "batch_size": 16},
            round_timeout_s=ROUND_TIMEOUT_S,
            # Outlier detection stays on (it leaves some updates out of some aggregates: each
            # shard digits:K/10 is held by ten identities, one in each swarm), but quarantine
            # is off: it would take identities out of play for a reason other than the kills.
            robustness={"quarantine_after": 0},
        )
        sid = create(c, spec)
        t0 = time.monotonic()
        for s in range(SWARMS):
            start_swarm(c, root, s, f"swarm-{s}")
        ledger = sqlite3.connect(f"file:{c.coordinator_home.ledger_path}?mode=ro", uri=True)
        kills, soak = asyncio.run(
            run(c, sid, root, ledger, [set(g) for g in ids], rng, t0 + WALL_BUDGET_S)
        )
        wall = time.monotonic() - t0
        check_ledger(ledger, sid, ids, kills)
        report(soak, kills, wall)
        check_flat(soak.samples)
        ledger.close()
    finally:
        c.procs.stop_all()


async def run(
    c: Cluster,
    sid: str,
    root: Path,
    ledger: sqlite3.Connection,
    ids: list[set[str]],
    rng: random.Random,
    deadline: float,
) -> tuple[list[Kill], Soak]:
    pid = c.procs.procs["coordinator"].pid
    async with AdminClient(Target(c.url, c.peer_id, c.operator_key)) as client:
        soak = Soak(c, sid, client, ledger, psutil.Process(pid), deadline)
        everyone = set().union(*ids)

        async def all_online() -> bool:
            return everyone <= await soak.online()

        await soak.until("all 100 online", all_online)
        soak.samples.clear()  # round 0's sample: every swarm connected
        assert (await client.call("session.start", session_id=sid))["status"] == "running"
        return await drive(soak, root, ids, rng), soak


def check_ledger(
    ledger: sqlite3.Connection, sid: str, ids: list[list[str]], kills: list[Kill]
) -> None:
    everyone = {p for g in ids for p in g}
    ((status, done),) = ledger.execute(
        "SELECT status, rounds_completed FROM sessions WHERE session_id = ?", (sid,)
    )
    assert (status, done) == ("completed", ROUNDS)

    # Every round once, completed at its first attempt; none failed, aborted or rejected.
    table = rows(ledger, "SELECT * FROM training_rounds WHERE session_id = ? ORDER BY round", sid)
    assert [r["round"] for r in table] == list(range(1, ROUNDS + 1))
    assert Counter(r["status"] for r in table) == {"completed": ROUNDS}
    assert {r["attempts"] for r in table} == {1}
    failed = rows(
        ledger, "SELECT data FROM events WHERE session_id = ? AND kind = 'round_failed'", sid
    )
    assert failed == [], [json.loads(f["data"]) for f in failed]

    # Every accepted update: in a round that selected its sender, once per sender and round;
    # each round aggregated at least min_participants of them.
    selected = {r["round"]: set(json.loads(r["selected"])) for r in table}
    updates = rows(
        ledger,
        "SELECT round, participant, status FROM client_updates WHERE session_id = ?",
        sid,
    )
    accepted = [(u["round"], u["participant"]) for u in updates if u["status"] == "accepted"]
    assert len(accepted) == len(set(accepted)), "an update accepted twice"
    assert all(p in selected.get(r, set()) for r, p in accepted)
    per_round = Counter(r for r, _ in accepted)
    judged = rows(
        ledger, "SELECT data FROM events WHERE session_id = ? AND kind = 'robustness'", sid
    )
    left_out = {(d := json.loads(j["data"]))["round"]: len(d["excluded"]) for j in judged}
    for r in table:
        n = r["round"]
        assert per_round[n] >= MIN_PARTICIPANTS, dict(r)
        assert r["participants"] + left_out.get(n, 0) == per_round[n], (dict(r), left_out.get(n))
    assert {p for _, p in accepted} == everyone

    # The kills: each swarm killed mid-session came back and contributed after its restart.
    for k in kills:
        after = {p for r, p in accepted if r > k.restarted_at}
        assert set(ids[k.swarm]) <= after, k
        # rounds that started after the kill and ended before the restart: none of its updates
        down = {p for r, p in accepted if k.killed_at + 1 < r <= k.restarted_at}
        assert not down & set(ids[k.swarm]), k


def report(soak: Soak, kills: list[Kill], wall: float) -> None:
    """The figures docs/scale.md quotes (run with -s to see them)."""
    first, last = soak.samples[0], soak.samples[-1]
    rate = (last.round - first.round) / ((last.t - first.t) / 60)
    print(f"soak: {ROUNDS} rounds in {wall:.0f} s from the first swarm's start; {rate:.1f}/min")
    print("round  rss_MiB  fds  online")
    for s in soak.samples:
        print(f"{s.round:5d}  {s.rss / 2**20:7.1f}  {s.fds:3d}  {s.online:6d}")
    for k in kills:
        print(f"killed swarm {k.swarm}: {dataclasses.asdict(k)}")
    assert len(kills) >= 4, kills  # the schedule left room for at least this many


def check_flat(samples: list[Sample]) -> None:
    warm = [s for s in samples if s.round >= WARM_UP]
    assert len(warm) >= (ROUNDS - WARM_UP) // SAMPLE_EVERY, samples
    base = warm[0].rss
    bound = base + max(RSS_GROWTH * base, RSS_SLACK)
    assert max(s.rss for s in warm) <= bound, [(s.round, s.rss) for s in warm]
    full = [s.fds for s in samples if s.online == SWARMS * PER_SWARM]
    assert len(full) >= len(samples) // 2, samples
    assert max(full) - min(full) <= FD_SLACK, [(s.round, s.fds, s.online) for s in samples]
