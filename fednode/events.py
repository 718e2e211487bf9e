"""The coordinator's live event stream, pushed to subscribed operators and dashboards.

Subscribers get a bounded queue each: a slow dashboard must never slow a round down, so
when its queue is full the oldest events are dropped and it is told it lagged (it can ask
for a fresh snapshot).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUEUE_SIZE = 1000


@dataclass(eq=False)  # identity, not value: subscriptions live in a set
class Subscription:
    session_id: str  # "" = every session
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    lagged: int = 0

    def wants(self, session_id: str | None) -> bool:
        return not self.session_id or not session_id or session_id == self.session_id


Tap = Callable[[str, dict[str, Any], str | None], None]  # (kind, data, session_id)


class EventBus:
    def __init__(self) -> None:
        self._subs: set[Subscription] = set()
        self._taps: list[Tap] = []

    def tap(self, fn: Tap) -> None:
        """Call ``fn`` with every event as it is published, in the publisher's thread,
        before any subscriber's queue. For figures that must not miss an event (the
        Prometheus exporter, fednode.metrics), which a bounded queue may drop; ``fn`` must
        be quick and must not raise."""
        self._taps.append(fn)

    def subscribe(self, session_id: str = "") -> Subscription:
        sub = Subscription(session_id)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, kind: str, data: dict[str, Any], session_id: str | None = None) -> None:
        for fn in self._taps:
            fn(kind, data, session_id)
        event = {"kind": kind, "session_id": session_id or "", "ts": time.time(), "data": data}
        for sub in list(self._subs):
            if not sub.wants(session_id):
                continue
            if sub.queue.full():
                sub.queue.get_nowait()
                sub.lagged += 1
            sub.queue.put_nowait(event)
