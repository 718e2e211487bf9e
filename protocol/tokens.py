"""Join tokens: a coordinator's signed invitation to one session.

A token is ``fnjt1.<body>.<signature>`` (base64url, no padding). The body is canonical CBOR
of {v, id, c (coordinator peer ID), s (session), exp (unix seconds), uses}; the signature is
the coordinator's Ed25519 signature over a domain tag and the body. Anyone can read a token,
nobody but the coordinator can make one, and the coordinator checks it with its own key: no
shared secret to leak. Expiry and the signature are checked here; the use count needs state
(which peers already used it), which the coordinator keeps in its ledger.

A token admits a peer, not a key holder in general: the first ``uses`` distinct peer IDs that
present it become members of the session; the same peer may reconnect with it.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

from protocol.envelope import decode, encode
from protocol.errors import FednodeError, SignatureError
from protocol.identity import Identity, verify

PREFIX = "fnjt1"
_DOMAIN = b"fednode/join-token/v1\x00"
MAX_TOKEN_CHARS = 1024


class TokenError(FednodeError):
    code = "TOKEN_INVALID"
    hint = "ask the operator for a new invite (`fedctl invite --session ID`)"


@dataclass(frozen=True)
class JoinToken:
    token_id: str
    coordinator: str
    session_id: str
    expires_at: float
    uses: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue(
    identity: Identity,
    session_id: str,
    *,
    expires_at: float,
    uses: int,
    token_id: str | None = None,
) -> tuple[str, JoinToken]:
    tok = JoinToken(
        token_id or os.urandom(12).hex(), identity.peer_id, session_id, float(expires_at), uses
    )
    body = encode(
        {
            "v": 1,
            "id": tok.token_id,
            "c": tok.coordinator,
            "s": session_id,
            "exp": tok.expires_at,
            "uses": uses,
        }
    )
    return f"{PREFIX}.{_b64(body)}.{_b64(identity.sign(_DOMAIN + body))}", tok


def check(token: str, *, coordinator: Identity, now: float) -> JoinToken:
    """Parse and verify a token this coordinator issued; TokenError says why not."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
        raise TokenError("the join token is not a fednode token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError(f"the join token does not start with {PREFIX}. and have 3 parts")
    try:
        body, sig = _unb64(parts[1]), _unb64(parts[2])
    except ValueError:
        raise TokenError("the join token is not valid base64url") from None
    try:
        verify(coordinator.public_key, sig, _DOMAIN + body)
    except SignatureError:
        raise TokenError(
            "the join token was not signed by this coordinator", code="TOKEN_FORGED"
        ) from None
    fields = decode(body, what="join token")
    if not isinstance(fields, dict) or fields.get("v") != 1:
        raise TokenError("the join token's body has an unknown format")
    try:
        tok = JoinToken(
            str(fields["id"]),
            str(fields["c"]),
            str(fields["s"]),
            float(fields["exp"]),
            int(fields["uses"]),
        )
    except (KeyError, TypeError, ValueError):
        raise TokenError("the join token's body is missing fields") from None
    if tok.coordinator != coordinator.peer_id:  # signed by us, so cannot differ; belt and braces
        raise TokenError("the join token names another coordinator", code="TOKEN_FORGED")
    if now >= tok.expires_at:
        raise TokenError(
            f"the join token expired {now - tok.expires_at:.0f} s ago", code="TOKEN_EXPIRED"
        )
    return tok


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d' or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        value = -1
    if not 0 < value <= 366 * 86400:
        raise FednodeError(
            f"duration {text!r} is not accepted",
            code="USAGE",
            hint="use e.g. 90s, 15m, 24h or 7d (at most a year)",
        )
    return value
