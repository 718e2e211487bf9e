"""The virtual participants of a `fednode swarm` process (fednode.swarm): built from the
swarm's configuration, run in one event loop, stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any

from fednode.data import DatasetRef
from fednode.participant import Limits, Participant
from fednode.swarm import CountedSlots, SwarmConfig, raise_fd_limit, virtual_homes
from protocol.errors import FednodeError, SpecError

log = logging.getLogger("fednode.swarm")


class VirtualParticipant(Participant):
    """A participant of a swarm: itself in all but one respect, that the swarm may have
    been started for one partition of the digits (``--partition``), and a session that cuts
    the data otherwise is declined rather than trained on an unexpected cut."""

    partition: str = ""

    def _local_data(self, s: dict[str, Any]) -> Any:
        got = s["data"]["partition"]
        if self.partition and got != self.partition:
            raise SpecError(
                f"the session's data.partition is {got!r}; this swarm was started with "
                f"--partition {self.partition}",
                hint=f'set data.partition = "{self.partition}" in the spec, or restart the '
                "swarm without --partition (the session's partition then decides)",
            )
        return super()._local_data(s)


@dataclasses.dataclass
class Swarm:
    """The virtual participants of one process, built and ready to run."""

    config: SwarmConfig
    nodes: list[VirtualParticipant]
    trainings: CountedSlots
    dialing: CountedSlots
    exits: contextlib.ExitStack

    @property
    def peer_ids(self) -> list[str]:
        return [node.identity.peer_id for node in self.nodes]

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        """Run every participant until ``stop``; one that ends on an error (an invite used
        up, the coordinator's key not the one named) is logged and the others go on. If all
        of them end that way before ``stop``, the first error is raised."""
        runs = [asyncio.create_task(node.run(stop)) for node in self.nodes]
        try:
            results = await asyncio.gather(*runs, return_exceptions=True)
        finally:
            for run in runs:
                run.cancel()
        failed = [(node, r) for node, r in zip(self.nodes, results, strict=True) if r is not None]
        for node, err in failed:
            log.error("virtual participant %s ended: %s", node.identity.peer_id, err)
        if failed and len(failed) == len(self.nodes) and not stop.is_set():
            err = failed[0][1]
            raise err if isinstance(err, BaseException) else FednodeError(str(err))
        return {
            "event": "stopped",
            "participants": len(self.nodes),
            "failed": len(failed),
            "peak_trainings": self.trainings.peak,
            "peak_dialing": self.dialing.peak,
        }

    def close(self) -> None:
        self.exits.close()


def build(config: SwarmConfig, limits: Limits | None = None) -> Swarm:
    """Identities, ledgers, store and Participants of the swarm (``config.ks()`` of it)."""
    from fednode.ledger import Ledger
    from fednode.store import open_store

    config.check()
    raise_fd_limit(len(config.ks()))
    homes = virtual_homes(config.root, config.ks())
    limits = limits or Limits.for_machine()  # psutil once, not once per participant
    trainings, dialing = CountedSlots(config.workers), CountedSlots(config.dial_slots)
    shared = open_store(config.root / "store") if config.store == "shared" else None
    exits = contextlib.ExitStack()
    nodes: list[VirtualParticipant] = []
    try:
        for k, home in zip(config.ks(), homes, strict=True):
            ledger = exits.enter_context(Ledger(home.ledger_path))
            node = VirtualParticipant(
                home.identity(),
                ledger,
                shared or open_store(home.store_root),
                url=config.url,
                coordinator_id=config.coordinator_id,
                dataset=DatasetRef("digits", shard=k, num_shards=config.participants),
                join_token=config.join_token,
                chain=home.chain(),
                limits=limits,
            )
            node.partition = config.partition
            node.train_slots, node.dial_slots = trainings, dialing
            nodes.append(node)
    except BaseException:
        exits.close()
        raise
    return Swarm(config, nodes, trainings, dialing, exits)
