"""The IPFS daemon backend: models kept in the user's own IPFS node, checked by us.

Why it is shaped like this: an operator who runs an IPFS node (kubo, or anything that
serves the same RPC API) can let fednode keep models there, so that they are pinned,
shared and inspected with the usual ``ipfs`` tools. But the daemon is a separate program
we do not control, so it is never trusted:

* the DAG is built here (``protocol.cid.build_dag``), so the CIDs are ours and identical
  to what ``ipfs add --cid-version=1`` (or v0) computes; the daemon only stores blocks;
* every block read back is re-hashed against its CID before its bytes are used, and a
  block the daemon stores under another CID than ours is refused;
* only a loopback API is accepted: the RPC API has no authentication and gives full
  control of the node, so it must never be reached across a network.

It speaks the RPC API (``POST /api/v0/...``) with ``urllib`` and no client library:
``ipfshttpclient`` (the usual Python client, unmaintained) refuses current daemons with
its version check: its last release, 0.7.0, raises VersionMismatch for any daemon >= 0.8.0
(py-ipfs-http-client issues #282, #296, #313). Endpoints used, with the parameters both kubo and
js-ipfs accept: ``version``, ``block/put`` (kubo: ``cid-codec``, ``mhtype``; js-ipfs, which
predates ``cid-codec``: ``format``, ``mhtype``, ``version``), ``block/get``, ``block/stat``,
``dag/import`` (a CAR v1 from ``protocol.car``: one request per file), ``pin/add``,
``pin/rm``, ``pin/ls``.

:class:`IpfsStore` has the interface of ``fednode.store.BlockStore`` (``has``, ``put_block``,
``get_block``, ``put``, ``get``, ``size``, ``pin``, ``unpin``, ``pins``, ``gc``), so the
coordinator and the participant use either without knowing which.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.client import HTTPException
from typing import Any

from protocol.car import encode_car, walk_dag
from protocol.cid import (
    build_dag,
    links,
    normalize_cid,
    parse_cid,
    read_file,
    unixfs_file_size,
    verify_block,
)
from protocol.errors import CIDError, FednodeError, NotFound

DEFAULT_TIMEOUT_S = 30.0
HAS_TIMEOUT_S = 1.0  # block/stat of an absent block: kubo answers at once offline, js-ipfs waits
MAX_BLOCK_BYTES = 2 * 1024 * 1024  # bitswap's limit; our blocks are <= 256 KiB + a few bytes
MAX_REPLY_BYTES = 64 * 1024 * 1024

_API_HINT = (
    "start the daemon (`ipfs daemon`) and give its API address, e.g. --ipfs-api "
    "/ip4/127.0.0.1/tcp/5001 (it is in $IPFS_PATH/api); the gateway port (8080) is not the API"
)
_LOOPBACK_HINT = (
    "the IPFS RPC API has no authentication and controls the whole node: keep it on "
    "127.0.0.1 and, for a daemon on another machine, tunnel it (ssh -L 5001:127.0.0.1:5001)"
)


class IpfsUnavailable(FednodeError):
    """The IPFS daemon does not answer, or answers what is not its RPC API."""

    code = "IPFS_UNAVAILABLE"
    hint = _API_HINT


def parse_api(api: str) -> str:
    """The base URL of an RPC API given as a multiaddr or an http:// URL; loopback only.

    ``/ip4/127.0.0.1/tcp/5001``, ``/ip6/::1/tcp/5001``, ``/dns/localhost/tcp/5001`` (with an
    optional trailing ``/http``) and ``http://127.0.0.1:5001`` are accepted.
    """
    text = api.strip()
    if text.startswith("/"):
        parts = text.strip("/").split("/")
        if parts[-1] == "http":
            parts = parts[:-1]
        if len(parts) != 4 or parts[2] != "tcp" or parts[0] not in ("ip4", "ip6", "dns", "dns4"):
            raise FednodeError(
                f"--ipfs-api {api!r} is not a multiaddr like /ip4/127.0.0.1/tcp/5001",
                code="USAGE",
                hint=_API_HINT,
            )
        host, port_text = parts[1], parts[3]
    else:
        url = urllib.parse.urlsplit(text)
        if url.scheme != "http" or not url.hostname or url.path not in ("", "/"):
            raise FednodeError(
                f"--ipfs-api {api!r} is not http://HOST:PORT or a multiaddr",
                code="USAGE",
                hint=_API_HINT,
            )
        host = url.hostname
        try:
            port_text = str(url.port or 80)
        except ValueError:
            port_text = ""
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise FednodeError(f"--ipfs-api {api!r}: bad TCP port", code="USAGE", hint=_API_HINT)
    if not _is_loopback(host):
        raise FednodeError(
            f"--ipfs-api {api!r} is not a loopback address; fednode talks only to a local daemon",
            code="USAGE",
            hint=_LOOPBACK_HINT,
        )
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{int(port_text)}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_block(a: str, b: str) -> bool:
    """Whether two CIDs name the same block: same codec and digest (v0 and v1 alike)."""
    pa, pb = parse_cid(a), parse_cid(b)
    return pa.codec.name == pb.codec.name and bytes(pa.raw_digest) == bytes(pb.raw_digest)


class IpfsStore:
    """Blocks and pins kept in an IPFS daemon through its RPC API; every read verified."""

    kind = "ipfs"

    def __init__(self, api: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.api = api
        self.url = parse_api(api)
        self.timeout_s = timeout_s
        # Environment proxies must not see (or redirect) requests to a loopback daemon.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"IpfsStore({self.url})"

    # --- the RPC call -------------------------------------------------------------------

    def _call(
        self,
        endpoint: str,
        params: dict[str, str] | None = None,
        *,
        body: bytes | None = None,
        limit: int = MAX_REPLY_BYTES,
        timeout_s: float | None = None,
    ) -> bytes:
        """POST /api/v0/<endpoint>; the reply's body, or a typed error.

        A daemon-side failure (HTTP 500 with the API's ``{"Message": ...}``) raises
        ``_DaemonRefused`` for the caller to turn into the right error for the operation.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        query = dict(params or {})
        # The daemon's own deadline, a little shorter than ours, so it answers "timed out".
        query.setdefault("timeout", f"{max(0.1, timeout * 0.9):.1f}s")
        url = f"{self.url}/api/v0/{endpoint}?{urllib.parse.urlencode(query)}"
        headers = {}
        data = b""
        if body is not None:
            boundary = uuid.uuid4().hex
            data = (
                (
                    f"--{boundary}\r\n"
                    'Content-Disposition: form-data; name="file"; filename="file"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
                + body
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(request, timeout=timeout) as reply:
                out = reply.read(limit + 1)
        except urllib.error.HTTPError as err:
            text = err.read(64 * 1024)
            message = _error_message(text)
            if message is None or err.code == 404:  # no such endpoint: not (this) RPC API
                raise IpfsUnavailable(
                    f"{self.url} answered HTTP {err.code} to {endpoint} without an IPFS error: "
                    "it is not an IPFS RPC API",
                ) from None
            raise _DaemonRefused(endpoint, message) from None
        except (urllib.error.URLError, OSError, HTTPException) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, socket.timeout | TimeoutError):
                raise IpfsUnavailable(
                    f"the IPFS daemon at {self.url} did not answer {endpoint} "
                    f"within {timeout:.0f} s",
                ) from None
            raise IpfsUnavailable(
                f"the IPFS daemon at {self.url} cannot be reached ({endpoint}): {reason}",
            ) from None
        if len(out) > limit:
            raise IpfsUnavailable(
                f"the IPFS daemon at {self.url} answered {endpoint} with more than {limit:,} bytes",
            )
        return out

    def _json(self, endpoint: str, params: dict[str, str] | None = None, **kw: Any) -> Any:
        raw = self._call(endpoint, params, **kw)
        try:
            return json.loads(raw)
        except ValueError:
            raise IpfsUnavailable(
                f"the IPFS daemon at {self.url} answered {endpoint} with something not JSON: "
                f"{raw[:80]!r}",
            ) from None

    # --- the daemon ---------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        """The daemon's /api/v0/version; IPFS_UNAVAILABLE if it is down or not an IPFS API."""
        try:
            info = self._json("version")
        except _DaemonRefused as err:
            raise IpfsUnavailable(f"the IPFS daemon at {self.url} refused version: {err}") from None
        if not isinstance(info, dict) or not isinstance(info.get("Version"), str):
            raise IpfsUnavailable(
                f"{self.url} answered /api/v0/version without a Version: not an IPFS RPC API",
            )
        self._info = info
        return info

    def _legacy_put(self) -> bool:
        """js-ipfs names the codec of block/put ``format`` (kubo: ``cid-codec``)."""
        info = self._info if self._info is not None else self.version()
        return "ipfs-core" in info

    # --- blocks -------------------------------------------------------------------------

    def has(self, cid: str) -> bool:
        """Whether the daemon holds the block locally (asked offline, with a short deadline)."""
        key = normalize_cid(cid)
        try:
            self._call(
                "block/stat",
                {"arg": key, "offline": "true", "timeout": f"{HAS_TIMEOUT_S:g}s"},
                timeout_s=HAS_TIMEOUT_S + 2,
            )
        except _DaemonRefused:
            return False
        except IpfsUnavailable as err:
            if "did not answer" in err.message:
                return False
            raise
        return True

    def put_block(self, cid: str, data: bytes, *, durable: bool = True) -> None:
        """Store one block after checking it here; refuse a daemon that files it elsewhere."""
        verify_block(cid, data)
        key = normalize_cid(cid)
        codec = parse_cid(key).codec.name
        if self._legacy_put():
            version = str(parse_cid(key).version)
            params = {"format": codec, "mhtype": "sha2-256", "version": version}
        else:
            params = {"cid-codec": codec, "mhtype": "sha2-256"}
        try:
            reply = self._json("block/put", params, body=data)
        except _DaemonRefused as err:
            raise IpfsUnavailable(f"the IPFS daemon refused block {key}: {err}") from None
        stored = reply.get("Key") if isinstance(reply, dict) else None
        try:
            same = isinstance(stored, str) and _same_block(stored, key)
        except CIDError:
            same = False
        if not same:
            raise CIDError(
                f"the IPFS daemon at {self.url} stored block {key} as {stored!r}",
                hint="the daemon hashes blocks differently or is broken; do not use it",
            )

    def get_block(self, cid: str) -> bytes:
        """The bytes of one block, re-hashed here: CIDError if the daemon altered them."""
        key = normalize_cid(cid)
        try:
            data = self._call("block/get", {"arg": key}, limit=MAX_BLOCK_BYTES)
        except _DaemonRefused as err:
            raise NotFound(
                f"the IPFS daemon at {self.url} has no block {key}: {err}",
                hint="the daemon could not find it (locally or from its peers) in time; "
                "publish the model again or fetch it from the coordinator",
            ) from None
        try:
            verify_block(key, data)
        except CIDError:
            raise CIDError(
                f"the IPFS daemon at {self.url} returned block {key} altered "
                f"({len(data)} bytes that do not hash to its CID)",
                hint="the daemon's repo is damaged or the daemon is not trustworthy; "
                "`ipfs repo verify` checks its repo",
            ) from None
        return data

    # --- files --------------------------------------------------------------------------

    def put(
        self, data: bytes, *, pin: bool = True, cid_version: int = 1, durable: bool = True
    ) -> str:
        """Import ``data`` as a UnixFS file (our DAG, our CID) in one ``dag/import``.
        ``durable`` is the daemon's business (its datastore syncs as it is configured)."""
        root, blocks = build_dag(data, cid_version)
        by_cid = {block.cid: block.data for block in blocks}
        car = encode_car(root, walk_dag(root, by_cid.__getitem__))
        try:
            raw = self._call("dag/import", {"pin-roots": "true" if pin else "false"}, body=car)
        except _DaemonRefused as err:
            raise IpfsUnavailable(f"the IPFS daemon refused to import {root}: {err}") from None
        if pin:
            roots = []
            for line in raw.splitlines():
                try:
                    item = json.loads(line)
                    roots.append((item["Root"]["Cid"]["/"], item["Root"].get("PinErrorMsg", "")))
                except (ValueError, KeyError, TypeError):
                    continue
            match = [err for got, err in roots if _safe_same(got, root)]
            if not match:
                raise IpfsUnavailable(
                    f"the IPFS daemon imported {root} but did not report pinning it: {raw[:200]!r}"
                )
            if match[0]:
                raise IpfsUnavailable(f"the IPFS daemon could not pin {root}: {match[0]}")
        elif not self.has(root):
            raise IpfsUnavailable(f"the IPFS daemon accepted {root} but does not have it")
        return root

    def get(self, cid: str) -> bytes:
        """Reassemble a file, every block fetched from the daemon and re-hashed here."""
        leaves: dict[str, bytes] = {}  # a file of repeated chunks asks for each chunk once

        def block(child: str) -> bytes:
            key = normalize_cid(child)
            if key not in leaves:
                data = self.get_block(key)
                if links(key, data):
                    return data  # internal nodes are few; only leaves repeat
                leaves[key] = data
            return leaves[key]

        return read_file(cid, block)

    def size(self, cid: str) -> int:
        return unixfs_file_size(cid, self.get_block(cid))

    # --- pins ---------------------------------------------------------------------------

    def pin(self, cid: str) -> None:
        """Pin ``cid`` recursively in the daemon (which fetches what it lacks)."""
        key = normalize_cid(cid)
        try:
            self._json("pin/add", {"arg": key, "recursive": "true"})
        except _DaemonRefused as err:
            raise NotFound(f"the IPFS daemon cannot pin {key}: {err}") from None

    def unpin(self, cid: str) -> None:
        key = normalize_cid(cid)
        try:
            self._json("pin/rm", {"arg": key, "recursive": "true"})
        except _DaemonRefused as err:
            raise NotFound(f"{key} is not pinned in the IPFS daemon: {err}") from None

    def pins(self) -> list[str]:
        """The daemon's recursive pins (all of them, not only fednode's), canonical CIDs."""
        try:
            reply = self._json("pin/ls", {"type": "recursive"})
        except _DaemonRefused as err:
            raise IpfsUnavailable(f"the IPFS daemon refused pin/ls: {err}") from None
        keys = reply.get("Keys") if isinstance(reply, dict) else None
        if not isinstance(keys, dict):
            raise IpfsUnavailable(f"the IPFS daemon answered pin/ls without Keys: {reply!r:.200}")
        out = []
        for key in keys:
            try:
                out.append(normalize_cid(key))
            except CIDError:
                continue  # the user's other pins may use codecs fednode does not handle
        return sorted(out)

    def gc(self) -> int:
        """Nothing: the daemon's repo is its user's, and so is running ``ipfs repo gc``."""
        return 0


def _safe_same(a: Any, b: str) -> bool:
    try:
        return isinstance(a, str) and _same_block(a, b)
    except CIDError:
        return False


class _DaemonRefused(Exception):
    """The daemon answered the call with an RPC error (its own message inside)."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


def _error_message(text: bytes) -> str | None:
    """The ``Message`` of an RPC error body (kubo and js-ipfs alike), or None."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("Message"), str):
        return body["Message"]
    # kubo answers some bad requests with plain text and HTTP 400
    plain = text.decode("utf-8", "replace").strip()
    return plain[:300] if plain and not plain.startswith("<") and len(plain) < 300 else None
