"""TLS for `fednode run --tls`: contexts and the peer-ID check, around protocol.tlscert.

TLS here adds confidentiality; it does not replace the fednode handshake. The server presents
a self-signed certificate bound to its Ed25519 identity (libp2p TLS style, see
protocol/tlscert.py); the client trusts no CA and instead checks that the certificate proves
the peer ID it meant to reach. The fednode handshake and the signed envelopes then run inside
TLS unchanged, so authenticity comes from both. Clients present no certificate: the server
learns who they are from the fednode handshake, as without TLS.

Wiring it into the transport (websockets >= 13 asyncio API)::

    # server (fednode run --tls): the cert/key files go to the node's data directory
    from websockets.asyncio.server import serve
    server = await serve(handler, host, port, ssl=server_context(identity, data_dir), ...)

    # client (fednode/transport.dial): the URL is wss://HOST:PORT
    from websockets.asyncio.client import connect
    ws = await connect(url, ssl=client_context(), **ws_options())
    try:
        # ws.transport.get_extra_info("ssl_object") is the ssl.SSLObject of the connection;
        # ssl_object_of(ws) returns it, or raises TLSIdentityError on a plain ws:// link.
        check_peer(ssl_object_of(ws), expected_peer_id)  # TLSIdentityError / PeerMismatch
    except HandshakeError as err:
        await ws.close(1008, err.code)
        raise
    # ... only now send the fednode hello, exactly as today

``connect`` returns after the TLS handshake and the HTTP upgrade, so the only bytes sent to an
unchecked server are the upgrade request (path, Host, a random Sec-WebSocket-Key): nothing
secret, and no fednode frame. Check before the hello, never after.

Deliberate differences from libp2p's TLS: the server does not request a client certificate
(client authentication stays in the fednode handshake), and SNI is whatever websockets sends
for the URL (none for an IP address); neither weakens the peer-ID check.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

from protocol.errors import PeerMismatch
from protocol.identity import Identity
from protocol.tlscert import (
    MALFORMED_CERTIFICATE,
    NOT_TLS,
    TLSIdentityError,
    make_certificate,
    peer_id_from_certificate,
)

CERT_FILE = "tls-cert.pem"
KEY_FILE = "tls-key.pem"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (mkstemp creates files 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_certificate(identity: Identity, workdir: Path) -> tuple[Path, Path]:
    """A fresh certificate and key for ``identity`` in ``workdir``: (cert path, key path)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = make_certificate(identity)
    cert_path, key_path = workdir / CERT_FILE, workdir / KEY_FILE
    _write_private(key_path, key_pem)
    _write_private(cert_path, cert_pem)
    return cert_path, key_path


def server_context(identity: Identity, workdir: Path) -> ssl.SSLContext:
    """TLS 1.3 server context presenting a new certificate bound to ``identity``.

    The certificate and its ephemeral key are written to ``workdir`` (the key 0600) because
    ``load_cert_chain`` reads only files; each call makes a new pair and replaces the old.
    """
    cert_path, key_path = write_certificate(identity, workdir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_NONE  # no client certificate: clients prove who they are later
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def client_context() -> ssl.SSLContext:
    """TLS 1.3 client context that does no CA or hostname verification, on purpose.

    A fednode server's certificate is self-signed and names no host: no CA could vouch for it
    and its hostname means nothing. What identifies the server is its peer ID, which the
    certificate's libp2p extension proves. OpenSSL cannot check that, so the context accepts
    any certificate during the handshake and the caller MUST call ``check_peer`` (or
    ``verified_peer_id``) right after the handshake, before sending any fednode frame, and
    close the connection if it fails. Without that call this context authenticates nothing.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # must be switched off before verify_mode can be CERT_NONE
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def ssl_object_of(ws: Any) -> ssl.SSLObject:
    """The SSLObject of a websockets asyncio connection; TLSIdentityError if it has none."""
    transport = getattr(ws, "transport", None)
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if obj is None:
        raise TLSIdentityError(
            "the connection is not TLS", reason=NOT_TLS, hint="dial a wss:// URL with --tls"
        )
    return obj


def verified_peer_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The peer ID proven by the peer's certificate on a finished TLS 1.3 handshake."""
    if ssl_object is None:
        raise TLSIdentityError("the connection is not TLS", reason=NOT_TLS)
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise TLSIdentityError(
            f"the connection negotiated {version or 'no TLS version'}; TLS 1.3 is required",
            reason=NOT_TLS,
        )
    # Python >= 3.13 can show the chain: libp2p allows exactly one certificate.
    chain_of = getattr(ssl_object, "get_unverified_chain", None)
    if chain_of is not None:
        chain = chain_of()
        if chain is not None and len(chain) > 1:
            raise TLSIdentityError(
                f"the peer sent {len(chain)} certificates; exactly one is allowed",
                reason=MALFORMED_CERTIFICATE,
            )
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TLSIdentityError("the peer presented no certificate", reason=MALFORMED_CERTIFICATE)
    return peer_id_from_certificate(der)


def check_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected_peer_id: str) -> str:
    """``verified_peer_id``, and PeerMismatch unless it is ``expected_peer_id``."""
    peer_id = verified_peer_id(ssl_object)
    if peer_id != expected_peer_id:
        raise PeerMismatch(
            f"the TLS certificate proves peer {peer_id}, not {expected_peer_id} as expected"
        )
    return peer_id
