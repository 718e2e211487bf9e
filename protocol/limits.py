"""Limits on what one peer may ask of a node: sizes per message type and a rate.

Pure: the caller passes the clock. Sizes are of the whole signed frame. The websocket layer
caps any frame at fednode.transport.MAX_FRAME_BYTES and handshake frames far lower; these
per-type caps stop a peer from sending, say, a 60 MB heartbeat that the cap would allow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.errors import FednodeError, ValidationError

KIB = 1024
MIB = 1024 * KIB
HANDSHAKE_MAX_BYTES = 16 * KIB  # ~200 bytes, plus up to 32 key-rotation statements
DEFAULT_MAX_BYTES = 64 * KIB
# Types that carry models or specs; everything else is small control traffic.
MAX_BYTES: dict[str, int] = {
    "update": 64 * MIB,
    "block": 64 * MIB,
    "model_delta": 64 * MIB,
    "admin_reply": 64 * MIB,  # model.get returns a model
    "admin": 1 * MIB,
    "round_start": 1 * MIB,
    "event": 1 * MIB,
    "secagg_masked": 64 * MIB,
    "secagg_roster": 1 * MIB,
    "secagg_shares": 1 * MIB,
    "secagg_relay": 1 * MIB,
    "secagg_unmask": 1 * MIB,
    "secagg_unmask_request": 1 * MIB,
}


def check_size(type_: str, size: int) -> None:
    cap = MAX_BYTES.get(type_, DEFAULT_MAX_BYTES)
    if size > cap:
        raise ValidationError(
            f"a {type_!r} frame of {size:,} bytes is over its limit of {cap:,}",
            code="TOO_LARGE",
            hint="this message type is never that large from a well-behaved peer",
        )


class RateLimited(FednodeError):
    code = "RATE_LIMITED"
    hint = "the peer sent messages faster than this node accepts; it was disconnected"


@dataclass
class TokenBucket:
    """``rate`` messages per second on average, bursts up to ``burst``."""

    rate: float = 200.0
    burst: float = 400.0
    tokens: float = field(default=-1.0)
    last: float = 0.0

    def take(self, now: float) -> None:
        if self.tokens < 0:  # first use: start full
            self.tokens, self.last = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            raise RateLimited(
                f"more than {self.rate:.0f} messages/s (burst {self.burst:.0f}) on one connection"
            )
        self.tokens -= 1
