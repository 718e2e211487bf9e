"""`fednode swarm --ray`: a swarm's virtual participants spread over Ray actors.

The swarm's N identities are cut into groups (fednode.swarm.split_groups); each group runs
in one Ray actor, a worker process of its own, with the same code as a one-process swarm
(fednode.virtual: its Participants built from their identity folders, run in the actor's
event loop until told to stop). The driver (the `fednode swarm` process) only places the
actors, prints the ready line with every peer ID, and stops them on SIGINT/SIGTERM; an actor
that dies is logged and counted, and the others go on.

Keys never pass through Ray: each actor reads (or, the first time, makes) its identities'
keys in ``DATA_DIR/virtual-K`` on its own node's disk, and only peer IDs, which are public,
come back. With ``--ray local`` that is the driver's data dir, whose folders the driver
makes first, as `fednode swarm` does; on a cluster DATA_DIR is a node-local path on every
node (each ledger is SQLite in WAL mode, which a network file system does not support).
What does pass through Ray's control plane is the configuration, join token included.

This module imports ray; fednode imports it only when ``--ray`` is given (the ``ray``
extra: ``pip install 'fednode[ray]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import ray

from fednode.swarm import (
    SwarmConfig,
    cpus_per_actor,
    default_actors,
    split_groups,
    virtual_homes,
)
from protocol.errors import FednodeError, UsageError

log = logging.getLogger("fednode.swarm")

LOCAL = "local"
AUTO = "auto"
# The driver's wait for the actors to stop their participants (close connections and
# ledgers) once told to; after it, the ones still running are killed.
STOP_GRACE_S = 30.0
# Ray's shared-memory object store: nothing large goes through it (the actors' results are
# peer IDs and counters), so a local instance reserves the least Ray accepts, not 30 % of RAM.
LOCAL_OBJECT_STORE_BYTES = 80 * 2**20


@dataclasses.dataclass(frozen=True)
class Group:
    """One actor's slice of the swarm."""

    actor: int
    ks: range

    def name(self) -> str:
        return f"actor {self.actor} (virtual-{self.ks.start}..virtual-{self.ks.stop - 1})"


def connect(address: str) -> dict[str, Any]:
    """Start a local Ray instance (``local``), join the running cluster (``auto``) or the
    one at ``address``; returns Ray's view of the cluster's resources."""
    if address == LOCAL:
        # A local instance is this swarm's own: it reports no usage statistics.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            log_to_driver=True,  # the actors' logs (stderr) end up in the driver's stderr
        )
    else:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UsageError(
                f"--ray {address}: could not join a Ray cluster there: {err}",
                hint="use `auto` on a node of a running cluster (`ray start --head`), the "
                "head's address (HOST:6379 or ray://HOST:10001), or `local` for one on this "
                "machine",
            ) from err
    return dict(ray.cluster_resources())


class SwarmGroup:
    """A Ray actor's part of the swarm (``config.ks()``): the one-process swarm's code, run
    in this actor's event loop. Every method is async, so Ray runs them all in that loop:
    the ledgers' SQLite connections are made and used in one thread."""

    def __init__(self, config: SwarmConfig, log_level: str) -> None:
        from fednode.files import PRIVATE_UMASK

        # A worker process of Ray's, not `fednode`'s main: take the node's conventions.
        os.umask(PRIVATE_UMASK)
        sys.stdout = sys.stderr  # the driver's stdout carries JSON lines only
        logging.basicConfig(
            level=log_level.upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        import torch

        torch.set_num_threads(1)  # --workers trainings share the cores, one thread each
        self.config = config
        self.stopping = asyncio.Event()
        self.swarm: Any = None

    async def build(self) -> dict[str, Any]:
        import psutil

        from fednode import virtual

        t0 = time.perf_counter()
        self.swarm = virtual.build(self.config)
        return {
            "peer_ids": self.swarm.peer_ids,
            "node": socket.gethostname(),
            "pid": os.getpid(),
            "build_s": round(time.perf_counter() - t0, 3),
            "rss_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
        }

    async def run(self) -> dict[str, Any]:
        try:
            return await self.swarm.run(self.stopping)
        finally:
            self.swarm.close()

    async def stop(self) -> None:
        self.stopping.set()


async def _ended(group: Group, ref: Any) -> dict[str, Any]:
    """What one actor's run came to: its participants' stopped line, or how it failed (its
    process died, or its run raised) as logged."""
    try:
        return {"actor": group.actor, "ok": True, **(await ref)}
    except (ray.exceptions.RayError, FednodeError) as err:
        log.error("ray: %s ended: %s", group.name(), str(err).splitlines()[0] if str(err) else err)
        return {"actor": group.actor, "ok": False, "error": type(err).__name__}


async def run(
    config: SwarmConfig,
    address: str,
    actors: int,
    log_level: str,
    stop: asyncio.Event,
    ready: Any,
) -> dict[str, Any]:
    """Place the swarm on Ray, call ``ready`` with the started line once every actor has
    built its participants, run until ``stop``; returns the stopped line."""
    t0 = time.perf_counter()
    local_ids: list[str] | None = None
    if address == LOCAL:  # one disk: the driver makes the identities, as `fednode swarm` does
        local_ids = [home.identity().peer_id for home in virtual_homes(config.root, config.ks())]
    t_init = time.perf_counter()
    resources = connect(address)
    ray_init_s = time.perf_counter() - t_init
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # ray.init put its own handlers in place
        loop.add_signal_handler(sig, stop.set)
    try:
        cpus = float(resources.get("CPU", 1))
        count = actors or default_actors(cpus, config.participants)
        groups = [Group(i, ks) for i, ks in enumerate(split_groups(config.participants, count))]
        cls = ray.remote(SwarmGroup).options(num_cpus=cpus_per_actor(cpus, count), max_restarts=0)
        handles = [
            cls.remote(dataclasses.replace(config, first=g.ks.start, count=len(g.ks)), log_level)
            for g in groups
        ]
        built = await _build_all(groups, handles)
        peer_ids = [p for b in built for p in b["peer_ids"]]
        if local_ids is not None and peer_ids != local_ids:
            raise FednodeError(
                f"the actors read other identities than {config.root}'s",
                code="USAGE",
                hint="with --ray local the actors must see the driver's --data-dir",
            )
        ready(
            peer_ids,
            {
                "address": address,
                "actors": count,
                "cpus": cpus,
                "ray_init_s": round(ray_init_s, 3),
                "startup_s": round(time.perf_counter() - t0, 3),
                "groups": [
                    {"actor": g.actor, "first": g.ks.start, "count": len(g.ks)}
                    | {k: b[k] for k in ("node", "pid", "build_s", "rss_mib")}
                    for g, b in zip(groups, built, strict=True)
                ],
            },
        )
        ends = asyncio.ensure_future(
            asyncio.gather(
                *(_ended(g, h.run.remote()) for g, h in zip(groups, handles, strict=True))
            )
        )
        told = asyncio.ensure_future(stop.wait())
        await asyncio.wait({ends, told}, return_when=asyncio.FIRST_COMPLETED)
        for handle in handles:  # one that died is not waited for: its call fails at once
            handle.stop.remote()
        done, _ = await asyncio.wait({ends}, timeout=STOP_GRACE_S)
        told.cancel()
        if not done:
            log.error("ray: actors still running %.0f s after stop; killing them", STOP_GRACE_S)
            for handle in handles:
                ray.kill(handle)
        results: list[dict[str, Any]] = await ends
        failed = [r for r in results if not r["ok"]]
        if len(failed) == len(results) and not stop.is_set():
            raise FednodeError(
                f"all {len(results)} ray actors ended before the swarm was stopped",
                code="SWARM_FAILED",
                hint="see the actors' log lines above (stderr)",
            )
        return {
            "event": "stopped",
            "participants": config.participants,
            "failed": sum(r.get("failed", 0) for r in results if r["ok"])
            + sum(len(groups[r["actor"]].ks) for r in failed),
            "peak_trainings": max((r.get("peak_trainings", 0) for r in results), default=0),
            "peak_dialing": max((r.get("peak_dialing", 0) for r in results), default=0),
            "actors": count,
            "actors_failed": len(failed),
            "groups": results,
        }
    finally:
        ray.shutdown()


async def _build_all(groups: list[Group], handles: list[Any]) -> list[dict[str, Any]]:
    """Every actor's participants built; one that fails stops the start (nothing is online
    yet, and a partial swarm would not match the peer IDs asked for)."""
    refs = [handle.build.remote() for handle in handles]  # all at once: they build in parallel
    out = []
    for group, ref in zip(groups, refs, strict=True):
        try:
            out.append(await ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(err.cause, FednodeError) else None
            if cause is not None:
                raise cause from None
            raise FednodeError(
                f"ray: {group.name()} could not build its participants: {err}",
                code="SWARM_FAILED",
            ) from err
        except ray.exceptions.RayError as err:
            raise FednodeError(
                f"ray: {group.name()} did not start: {err}",
                code="SWARM_FAILED",
                hint="every node needs fednode installed (with the same version as here)",
            ) from err
    return out
