"""Wire costs: handshakes per second, envelope sign+verify throughput.

Each figure is printed next to its reference, measured here in the same process:
- handshakes/s (pure protocol, and over real loopback websockets) against the raw
  Ed25519 rate: one handshake costs each side one sign and one verify;
- envelope seal + open (sign and verify, SHA-256 of the payload) for a 1 KiB payload (a
  plain CBOR frame) and a 4 MiB one (a bulk frame: signed CBOR header, then the raw bytes),
  against raw Ed25519 sign+verify of 64 bytes and against hashlib's SHA-256 over the same
  bytes twice (what a 4 MiB envelope cannot beat: it hashes the payload once to sign and
  once to verify). The issue's goal for the bulk frame: at least 0.8x that SHA-256 figure.

    .venv/bin/python benchmarks/wire.py [--seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from websockets.asyncio.server import serve

from fednode.transport import accept, dial, ws_options
from protocol import messages
from protocol.envelope import BULK_MAGIC, BULK_MIN_BYTES, open_frame, seal
from protocol.handshake import ClientHandshake, ServerHandshake
from protocol.identity import Identity, verify


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n / elapsed


def bench(seconds: float) -> dict[str, float]:
    a, b = Identity.generate(), Identity.generate()
    msg64 = os.urandom(64)
    sig = a.sign(msg64)
    out: dict[str, float] = {
        "ed25519_sign_per_s": rate(lambda: a.sign(msg64), seconds),
        "ed25519_verify_per_s": rate(lambda: verify(a.public_key, sig, msg64), seconds),
    }
    out["ed25519_sign_verify_per_s"] = 1 / (
        1 / out["ed25519_sign_per_s"] + 1 / out["ed25519_verify_per_s"]
    )

    def handshake() -> None:
        c, s = ClientHandshake(a, b.peer_id), ServerHandshake(b)
        s.on_auth(c.on_challenge(s.on_hello(c.hello())))

    out["handshakes_per_s_protocol"] = rate(handshake, seconds)
    # A handshake is 2 signs + 2 verifies in total (one of each per side).
    out["handshake_ideal_per_s"] = out["ed25519_sign_verify_per_s"] / 2
    out["handshakes_per_s_loopback"] = asyncio.run(loopback_handshakes(a, b, seconds))

    channel = os.urandom(32)
    for label, size in (("1kib", 1024), ("4mib", 4 * 1024 * 1024)):
        payload = {"cid": "x", "data": os.urandom(size)}
        frame = seal(a, channel=channel, type="block", seq=1, payload=payload, ts=time.time())
        assert frame.startswith(BULK_MAGIC) == (size >= BULK_MIN_BYTES)  # the layout measured

        def seal_open(payload: dict = payload, frame: bytes = frame) -> None:
            seal(a, channel=channel, type="block", seq=1, payload=payload, ts=1.0)
            open_frame(
                frame, channel=channel, sender_peer_id=a.peer_id, sender_public_key=a.public_key
            )

        per_s = rate(seal_open, seconds)
        out[f"envelope_{label}_per_s"] = per_s
        out[f"envelope_{label}_mb_per_s"] = per_s * size / 1e6
        blob = payload["data"]
        sha = rate(lambda blob=blob: hashlib.sha256(blob).digest(), seconds)
        # sealing and opening each hash the payload once
        out[f"sha256_twice_{label}_mb_per_s"] = sha * size / 2 / 1e6
        out[f"envelope_{label}_vs_sha256_twice"] = (
            out[f"envelope_{label}_mb_per_s"] / out[f"sha256_twice_{label}_mb_per_s"]
        )
    return out


async def loopback_handshakes(client: Identity, server: Identity, seconds: float) -> float:
    async def handler(ws) -> None:
        conn = await accept(ws, server)
        await conn.send(
            messages.Welcome(
                peer_id=server.peer_id, role="participant", heartbeat_s=5.0, version="bench"
            )
        )
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, **ws_options()) as srv:
        port = srv.sockets[0].getsockname()[1]
        url = f"ws://127.0.0.1:{port}"
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            conn = await dial(url, client, server.peer_id)
            await conn.close()
            n += 1
        return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per figure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = bench(args.seconds)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"raw Ed25519 (cryptography): sign {r['ed25519_sign_per_s']:,.0f}/s, verify "
        f"{r['ed25519_verify_per_s']:,.0f}/s, sign+verify {r['ed25519_sign_verify_per_s']:,.0f}/s"
    )
    print(
        f"handshakes, protocol only : {r['handshakes_per_s_protocol']:,.0f}/s "
        f"(reference: 2 signs + 2 verifies = {r['handshake_ideal_per_s']:,.0f}/s)"
    )
    print(
        f"handshakes, loopback ws   : {r['handshakes_per_s_loopback']:,.0f}/s "
        "(TCP + websocket upgrade + handshake + welcome, one at a time)"
    )
    for label in ("1kib", "4mib"):
        print(
            f"envelope {label} seal+open : {r[f'envelope_{label}_per_s']:,.1f}/s = "
            f"{r[f'envelope_{label}_mb_per_s']:,.1f} MB/s (reference: sign+verify "
            f"{r['ed25519_sign_verify_per_s']:,.0f}/s; SHA-256 twice "
            f"{r[f'sha256_twice_{label}_mb_per_s']:,.0f} MB/s, ratio "
            f"{r[f'envelope_{label}_vs_sha256_twice']:.2f})"
        )


if __name__ == "__main__":
    main()
