"""How many updates may be on their way to the coordinator at once (backpressure).

A participant whose update is ready says so (``upload_ready``, with its size) and sends it
only once granted (``upload_grant``). The coordinator grants while fewer than ``max_count``
uploads and fewer than ``max_bytes`` announced bytes are in flight (one is always allowed, so
an update larger than the byte budget still goes, alone), first come first served. A grant
is released when the update arrives (accepted or refused), when its peer leaves, and when it
is not used within ``grant_ttl_s``, so a peer that asks and never sends holds a slot for a
bounded time. Each peer holds at most one grant or place in the queue.

Pure: no asyncio, no clock; the caller passes ``now`` and sends the grants returned.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

MAX_UPLOADS = 64  # updates in flight at once (``fednode run --max-uploads``)
MAX_UPLOAD_MIB = 256  # their announced bytes (``fednode run --max-upload-mib``)
GRANT_TTL_S = 60.0  # a grant not used within this is taken back
# Once arrived, a plain round's updates are held in memory up to this many MiB, the rest on
# disk (``fednode run --round-ram-mib``; fednode.round_updates)
ROUND_RAM_MIB = 256


@dataclass(frozen=True, slots=True)
class Ask:
    """One peer's announced upload: which session and round, how many bytes."""

    session: str
    round: int
    size: int


@dataclass
class UploadSlots:
    max_count: int = MAX_UPLOADS
    max_bytes: int = MAX_UPLOAD_MIB * 1024 * 1024
    grant_ttl_s: float = GRANT_TTL_S
    granted: dict[str, tuple[Ask, float]] = field(default_factory=dict)  # peer -> (ask, until)
    waiting: OrderedDict[str, Ask] = field(default_factory=OrderedDict)  # oldest first

    def __post_init__(self) -> None:
        if self.max_count < 1 or self.max_bytes < 1:
            raise ValueError("upload slots need max_count >= 1 and max_bytes >= 1")

    @property
    def bytes_in_flight(self) -> int:
        return sum(ask.size for ask, _ in self.granted.values())

    def ask(self, peer: str, ask: Ask, now: float) -> list[tuple[str, Ask]]:
        """``peer`` has ``ask`` ready: the grants to send now (this peer's, if it fits).
        A peer asking again replaces its earlier ask (it has one update in hand at a time)."""
        self.granted.pop(peer, None)
        self.waiting.pop(peer, None)
        self.waiting[peer] = ask
        return self._grant(now)

    def holds(self, peer: str, session: str, round_: int) -> bool:
        got = self.granted.get(peer)
        return got is not None and (got[0].session, got[0].round) == (session, round_)

    def release(self, peer: str, now: float) -> list[tuple[str, Ask]]:
        """The peer's update arrived, or the peer left: its slot or place is free."""
        self.granted.pop(peer, None)
        self.waiting.pop(peer, None)
        return self._grant(now)

    def drop_session(
        self, session: str, now: float
    ) -> tuple[list[tuple[str, Ask]], list[tuple[str, Ask]]]:
        """A session's round ended: its grants and asks lapse (a late update is stale).
        Returns (the grants this frees, the dropped asks: their peers are to be told)."""
        dropped = [(p, a) for p, (a, _) in self.granted.items() if a.session == session]
        dropped += [(p, a) for p, a in self.waiting.items() if a.session == session]
        for peer, _ in dropped:
            self.granted.pop(peer, None)
            self.waiting.pop(peer, None)
        return self._grant(now), dropped

    def expire(self, now: float) -> list[tuple[str, Ask]]:
        """Take back grants not used in time; the grants this frees."""
        for peer in [p for p, (_, until) in self.granted.items() if until <= now]:
            del self.granted[peer]
        return self._grant(now)

    def _grant(self, now: float) -> list[tuple[str, Ask]]:
        out: list[tuple[str, Ask]] = []
        in_flight = self.bytes_in_flight
        while self.waiting and len(self.granted) < self.max_count:
            peer, ask = next(iter(self.waiting.items()))
            if self.granted and in_flight + ask.size > self.max_bytes:
                break  # first come first served: a large ask is not overtaken
            del self.waiting[peer]
            self.granted[peer] = (ask, now + self.grant_ttl_s)
            in_flight += ask.size
            out.append((peer, ask))
        return out
