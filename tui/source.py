"""Where the dashboard's data comes from: a connection that answers calls and pushes events.

The app never dials anything itself; it is given a ``Source`` and asks it for a ``Link``
each time it (re)connects. The real source wraps fedctl's AdminClient (the same
authenticated admin channel as every fedctl command); tests pass a scripted fake
(tui/fake.py) with the same two methods, so every screen is exercised without sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from fedctl.client import AdminClient, ClientEvent, Target


class Link(Protocol):
    """One live connection to a coordinator."""

    role: str  # "operator" or "viewer"

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Raises protocol.errors.FednodeError (code DISCONNECTED once it is gone)."""
        ...

    def stream(self) -> AsyncIterator[ClientEvent]:
        """Pushed events after ``subscribe``; ends when the coordinator goes away."""
        ...

    async def close(self) -> None: ...


class Source(Protocol):
    label: str  # what the status bar calls the coordinator

    async def connect(self) -> Link:
        """Dial and authenticate; raises (FednodeError or OSError) when it cannot."""
        ...


class AdminLink:
    def __init__(self, client: AdminClient):
        self.client = client
        self.role = client.role

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        return await self.client.call(op, **args)

    def stream(self) -> AsyncIterator[ClientEvent]:
        return self.client.stream()

    async def close(self) -> None:
        await self.client.__aexit__(None, None, None)


class AdminSource:
    """The coordinator's admin channel, with the operator key of fedctl's global options."""

    def __init__(self, target: Target):
        target.check()
        self.target = target
        self.label = target.url

    async def connect(self) -> Link:
        client = AdminClient(self.target)
        await client.__aenter__()
        return AdminLink(client)
