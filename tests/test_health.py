"""fednode.health's probe server on a real socket, with a real ledger: what it answers in
each state, and its bounds (methods, paths, sizes, slow and too many clients). The probes
of running nodes are in tests/test_health_e2e.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fednode import health as health_mod
from fednode.health import Health
from fednode.ledger import Ledger

pytestmark = pytest.mark.timeout(30)


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], Any]:
    """A real HTTP client, in a thread: the server answers from this test's event loop."""
    status, headers, body = await asyncio.to_thread(_get, url, method)
    return status, headers, json.loads(body) if body else None


async def raw(url: str, request: bytes) -> bytes:
    """Send ``request`` as it is; everything the server sends back before it closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:  # closed with our request unread: nothing was answered
        return b""
    finally:
        writer.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Health, dict[str, bool]]]:
    """A probe server over a real ledger; the role's checks are a dict the test changes."""
    Ledger(tmp_path / "ledger.db").close()
    checks = {"accepting": False}
    h = Health(tmp_path / "ledger.db", lambda: dict(checks))
    h.ledger.every_s = 0.0  # probe the ledger on every request: the test changes it
    await h.start("127.0.0.1", 0)
    try:
        yield h, checks
    finally:
        await h.close()


async def test_readiness_follows_the_checks_and_stopping(node: tuple[Health, dict]) -> None:
    h, checks = node
    assert (await get(h.url + "/livez"))[::2] == (200, {"live": True})
    status, headers, body = await get(h.url + "/readyz")
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert body == {
        "ready": False,
        "stopping": False,
        "checks": {"accepting": False, "ledger_writable": True},
    }
    checks["accepting"] = True
    status, _, body = await get(h.url + "/readyz?verbose=1")  # a query string is ignored
    assert (status, body["ready"]) == (200, True), body
    h.stopping = True  # SIGTERM: every check passes, and still not ready
    status, _, body = await get(h.url + "/readyz")
    assert status == 503 and body["stopping"] is True and all(body["checks"].values()), body
    assert (await get(h.url + "/livez"))[0] == 200  # alive until it has stopped


async def test_a_locked_ledger_is_not_ready(node: tuple[Health, dict], tmp_path: Path) -> None:
    h, checks = node
    checks["accepting"] = True
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process's write lock, as in a backup
        status, _, body = await get(h.url + "/readyz")
        assert status == 503 and body["checks"]["ledger_writable"] is False, body
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    status, _, body = await get(h.url + "/readyz")
    assert status == 200 and body["checks"]["ledger_writable"] is True, body


async def test_the_ledger_is_probed_at_most_once_a_second(tmp_path: Path) -> None:
    Ledger(tmp_path / "ledger.db").close()
    h = Health(tmp_path / "ledger.db", dict)
    await h.start("127.0.0.1", 0)
    holder = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    try:
        assert (await get(h.url + "/readyz"))[0] == 200
        holder.execute("BEGIN EXCLUSIVE")
        # within PROBE_EVERY_S the last probe stands: no worker thread per request
        assert (await get(h.url + "/readyz"))[0] == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await h.close()


async def test_a_missing_ledger_is_not_created_by_the_probe(tmp_path: Path) -> None:
    h = Health(tmp_path / "ledger.db", dict)
    await h.start("127.0.0.1", 0)
    try:
        status, _, body = await get(h.url + "/readyz")
        assert status == 503 and body["checks"] == {"ledger_writable": False}
        assert not (tmp_path / "ledger.db").exists()
    finally:
        await h.close()


async def test_only_get_and_head_on_the_two_paths(node: tuple[Health, dict]) -> None:
    h, _ = node
    status, headers, body = await get(h.url + "/readyz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD" and "error" in body
    assert (await get(h.url + "/metrics"))[0] == 404
    assert (await get(h.url + "/livez/../readyz"))[0] == 404
    status, headers, body = await get(h.url + "/livez", method="HEAD")
    assert status == 200 and body is None and int(headers["Content-Length"]) > 0
    answer = await raw(h.url, b"NOT HTTP\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer


async def test_a_large_request_head_is_refused(node: tuple[Health, dict]) -> None:
    h, _ = node
    big = b"GET /livez HTTP/1.1\r\nX-Pad: " + b"a" * (2 * health_mod.MAX_HEAD) + b"\r\n\r\n"
    answer = await raw(h.url, big)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:60]


async def test_slow_and_surplus_clients_are_cut_off(
    node: tuple[Health, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = node
    monkeypatch.setattr(health_mod, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(health_mod, "MAX_CONNECTIONS", 2)
    host, port = h.url.removeprefix("http://").split(":")
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
    # both slots are held by clients that send nothing: the next is closed unanswered
    assert await raw(h.url, b"GET /livez HTTP/1.1\r\n\r\n") == b""
    for reader, writer in silent:  # a client that never finishes its request is dropped
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert (await get(h.url + "/livez"))[0] == 200  # and the slots are free again
