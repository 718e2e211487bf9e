"""TLS bound to node identities: certificates (libp2p TLS style) and wss:// on loopback."""

from __future__ import annotations

import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from fednode.tls import (
    KEY_FILE,
    check_peer,
    client_context,
    server_context,
    ssl_object_of,
    verified_peer_id,
)
from protocol import tlscert
from protocol.errors import HandshakeError, PeerMismatch
from protocol.identity import Identity
from protocol.tlscert import (
    LIBP2P_EXTENSION_OID,
    SIGNING_PREFIX,
    TLSIdentityError,
    decode_signed_key,
    encode_signed_key,
    make_certificate,
    peer_id_from_certificate,
)

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
OID = x509.ObjectIdentifier(LIBP2P_EXTENSION_OID)
IDENT_A = Identity.from_seed(bytes(range(32)))
IDENT_B = Identity.from_seed(bytes(range(1, 33)))


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


CERT_A = der_of(make_certificate(IDENT_A, now=NOW)[0])


def build(
    *,
    key=None,
    signer=None,
    ext_value: bytes | None = None,
    critical: bool = True,
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
    issuer: str = "fednode",
    hash_alg: hashes.HashAlgorithm | str | None = "sha256",
    identity: Identity = IDENT_A,
    spki_for_sig=None,
) -> bytes:
    """A certificate like make_certificate's, with one thing changed."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    spki = (spki_for_sig or key.public_key()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ext_value is None:
        ext_value = encode_signed_key(
            b"\x08\x01\x12\x20" + identity.public_key, identity.sign(SIGNING_PREFIX + spki)
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fednode")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(hours=1))
        .not_valid_after(NOW + timedelta(days=30))
    )
    if ext_value != b"":
        builder = builder.add_extension(x509.UnrecognizedExtension(OID, ext_value), critical)
    for ext, crit in extra:
        builder = builder.add_extension(ext, crit)
    cert = builder.sign(signer or key, hashes.SHA256() if hash_alg == "sha256" else hash_alg)
    return cert.public_bytes(serialization.Encoding.DER)


def reason_of(der: bytes, now: datetime = NOW) -> str:
    with pytest.raises(TLSIdentityError) as info:
        peer_id_from_certificate(der, now=now)
    assert info.value.code == "TLS_IDENTITY"
    assert isinstance(info.value, HandshakeError)
    return info.value.reason


# libp2p/specs tls/tls.md, "Test vectors" (made by other libp2p implementations; valid from
# 1975 to 4096): 1. a valid certificate for an Ed25519 peer; 2./3. valid ones for ECDSA and
# secp256k1 peers, host key types fednode does not use; 4. a host signature over another key.
SPEC_ED25519 = bytes.fromhex(
    "308201773082011ea003020102020900f5bd0debaa597f52300a06082a8648ce3d04030230003020170d3735"
    "303130313030303030305a180f34303936303130313030303030305a30003059301306072a8648ce3d020106"
    "082a8648ce3d030107034200046bf9871220d71dcb3483ecdfcbfcc7c103f8509d0974b3c18ab1f1be1302d6"
    "43103a08f7a7722c1b247ba3876fe2c59e26526f479d7718a85202ddbe47562358a37f307d307b060a2b0601"
    "040183a25a01010101ff046a30680424080112207fda21856709c5ae12fd6e8450623f15f11955d384212b89"
    "f56e7e136d2e17280440aaa6bffabe91b6f30c35e3aa4f94b1188fed96b0ffdd393f4c58c1c047854120e674"
    "ce64c788406d1c2c4b116581fd7411b309881c3c7f20b46e54c7e6fe7f0f300a06082a8648ce3d0403020347"
    "00304402207d1a1dbd2bda235ff2ec87daf006f9b04ba076a5a5530180cd9c2e8f6399e09d0220458527178c"
    "7e77024601dbb1b256593e9b96d961b96349d1f560114f61a87595"
)
SPEC_ED25519_PEER_ID = "12D3KooWJRSrypvnpHgc6ZAgyCni4KcSmbV7uGRaMw5LgMKT18fq"
SPEC_ECDSA = bytes.fromhex(
    "308201c030820166a003020102020900eaf419a6e3edb4a6300a06082a8648ce3d04030230003020170d3735"
    "303130313030303030305a180f34303936303130313030303030305a30003059301306072a8648ce3d020106"
    "082a8648ce3d030107034200048dbf1116c7c608d6d5292bd826c3feb53483a89fce434bf64538a359c8e075"
    "38ff71f6766239be6a146dcc1a5f3bb934bcd4ae2ae1d4da28ac68b4a20593f06ba381c63081c33081c0060a"
    "2b0601040183a25a01010101ff0481ae3081ab045f0803125b3059301306072a8648ce3d020106082a8648ce"
    "3d0301070342000484b93fa456a74bd0153919f036db7bc63c802f055bc7023395d0203de718ee0fc7b570b7"
    "67cdd858aca6c7c4113ff002e78bd2138ac1a3b26dde3519e06979ad04483046022100bc84014cea5a41feab"
    "df4c161096564b9ccf4b62fbef4fe1cd382c84e11101780221009204f086a84cb8ed8a9ddd7868dc90c792ee"
    "434adf62c66f99a08a5eba11615b300a06082a8648ce3d0403020348003045022054b437be9a2edf591312d6"
    "8ff24bf91367ad4143f76cf80b5658f232ade820da022100e23b48de9df9c25d4c83ddddf75d2676f0b9318e"
    "e2a6c88a736d85eab94a912f"
)
SPEC_SECP256K1 = bytes.fromhex(
    "3082018230820128a003020102020900f3b305f55622cfdf300a06082a8648ce3d04030230003020170d3735"
    "303130313030303030305a180f34303936303130313030303030305a30003059301306072a8648ce3d020106"
    "082a8648ce3d0301070342000458f7e9581748ff9bdd933b655cc0e5552a1248f840658cc221dec2186b5a2f"
    "e4641b86ab7590a3422cdbb1000cf97662f27e5910d7569f22feed8829c8b52e0fa38188308185308182060a"
    "2b0601040183a25a01010101ff0471306f042508021221026b053094d1112bce799dc8026040ae6d4eb57415"
    "7929f1598172061f753d9b1b04463044022040712707e97794c478d93989aaa28ae1f71c03af524a8a4bd2d9"
    "8424948a782302207b61b7f074b696a25fb9e0059141a811cccc4cc28042d9301b9b2a4015e87470300a0608"
    "2a8648ce3d04030203480030450220143ae4d86fdc8675d2480bb6912eca5e39165df7f572d836aa2f2d6acf"
    "ab13f8022100831d1979a98f0c4a6fb5069ca374de92f1a1205c962a6d90ad3d7554cb7d9df4"
)
SPEC_INVALID = bytes.fromhex(
    "308201773082011da003020102020830a73c5d896a1109300a06082a8648ce3d04030230003020170d373530"
    "3130313030303030305a180f34303936303130313030303030305a30003059301306072a8648ce3d02010608"
    "2a8648ce3d03010703420004bbe62df9a7c1c46b7f1f21d556deec5382a36df146fb29c7f1240e60d7d53285"
    "70e3b71d99602b77a65c9b3655f62837f8d66b59f1763b8c9beba3be07778043a37f307d307b060a2b060104"
    "0183a25a01010101ff046a3068042408011220ec8094573afb9728088860864f7bcea2d4fd412fef09a8e2d2"
    "4d482377c20db60440ecabae8354afa2f0af4b8d2ad871e865cb5a7c0c8d3dbdbf42de577f92461a0ebb0a28"
    "703e33581af7d2a4f2270fc37aec6261fcc95f8af08f3f4806581c730a300a06082a8648ce3d040302034800"
    "304502202dfb17a6fa0f94ee0e2e6a3b9fb6e986f311dee27392058016464bd130930a61022100ba4b937a11"
    "c8d3172b81e7cd04aedb79b978c4379c2b5b24d565dd5d67d3cb3c"
)


# --- certificates ------------------------------------------------------------------------


def test_spec_vectors() -> None:
    assert peer_id_from_certificate(SPEC_ED25519, now=NOW) == SPEC_ED25519_PEER_ID
    assert reason_of(SPEC_ECDSA) == "unsupported_key"
    assert reason_of(SPEC_SECP256K1) == "unsupported_key"
    assert reason_of(SPEC_INVALID) == "bad_signature"
    # the other implementations mark the extension critical too
    ext = x509.load_der_x509_certificate(SPEC_ED25519).extensions.get_extension_for_oid(OID)
    assert ext.critical


def test_roundtrip_and_shape() -> None:
    assert peer_id_from_certificate(CERT_A, now=NOW) == IDENT_A.peer_id
    cert = x509.load_der_x509_certificate(CERT_A)
    ext = cert.extensions.get_extension_for_oid(OID)
    assert ext.critical
    pub, sig = decode_signed_key(ext.value.value)
    assert pub == bytes.fromhex("08011220") + IDENT_A.public_key
    assert len(sig) == 64
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_before_utc == NOW - timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    assert cert.issuer == cert.subject


def test_key_pem_and_fresh_keys() -> None:
    cert_pem, key_pem = make_certificate(IDENT_A, now=NOW)
    key = serialization.load_pem_private_key(key_pem, None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert key.public_key() == cert.public_key()
    other = x509.load_pem_x509_certificate(make_certificate(IDENT_A, now=NOW)[0])
    assert other.public_key() != cert.public_key()  # ephemeral: a new key every time
    assert other.serial_number != cert.serial_number


def test_signed_key_der() -> None:
    assert encode_signed_key(b"ab", b"c") == bytes.fromhex("300704026162040163")
    long = encode_signed_key(b"x" * 200, b"y" * 64)
    assert long[:7] == bytes.fromhex("3082010d0481c8")  # long-form lengths
    assert decode_signed_key(long) == (b"x" * 200, b"y" * 64)
    for bad in (
        "",
        "3007040261620401",  # truncated
        "300704026162030163",  # second field a BIT STRING
        "300404026162",  # one field
        "30090402616204016304 00",  # three fields
        "30070402616204016300",  # a trailing byte
        "30810704026162040163",  # non-minimal length
        "3080040261620401630000",  # indefinite length
    ):
        with pytest.raises(ValueError):
            decode_signed_key(bytes.fromhex(bad))


def test_certificate_for_a_is_not_b() -> None:
    assert peer_id_from_certificate(CERT_A, now=NOW) != IDENT_B.peer_id
    # B's key and signature pasted into a certificate made for A's signature: refused
    cert_b = der_of(make_certificate(IDENT_B, now=NOW)[0])
    ext_b = x509.load_der_x509_certificate(cert_b).extensions.get_extension_for_oid(OID)
    assert reason_of(build(ext_value=ext_b.value.value)) == "bad_signature"


def test_validity() -> None:
    assert peer_id_from_certificate(CERT_A, now=NOW + timedelta(days=364)) == IDENT_A.peer_id
    assert reason_of(CERT_A, NOW + timedelta(days=366)) == "expired"
    assert reason_of(CERT_A, NOW - timedelta(hours=2)) == "not_yet_valid"
    naive = (NOW + timedelta(days=1)).replace(tzinfo=None)  # naive means UTC
    assert peer_id_from_certificate(CERT_A, now=naive) == IDENT_A.peer_id


def test_refusals() -> None:
    assert reason_of(build(ext_value=b"")) == "no_extension"
    assert reason_of(build(ext_value=b"\x30\x00")) == "malformed_extension"
    assert reason_of(build(ext_value=b"junk")) == "malformed_extension"
    good = build()
    assert peer_id_from_certificate(good, now=NOW) == IDENT_A.peer_id
    # not critical is allowed by the spec
    assert peer_id_from_certificate(build(critical=False), now=NOW) == IDENT_A.peer_id
    # host signature over another key
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert reason_of(build(spki_for_sig=other)) == "bad_signature"
    # signature bytes altered
    pub, sig = decode_signed_key(
        x509.load_der_x509_certificate(good).extensions.get_extension_for_oid(OID).value.value
    )
    flipped = encode_signed_key(pub, bytes([sig[0] ^ 1]) + sig[1:])
    assert reason_of(build(ext_value=flipped)) == "bad_signature"
    # unsupported host key types: RSA (0), Secp256k1 (2), ECDSA (3)
    for t in (0, 2, 3):
        ext = encode_signed_key(bytes([0x08, t, 0x12, 0x02, 1, 2]), sig)
        assert reason_of(build(ext_value=ext)) == "unsupported_key"
    assert reason_of(
        build(ext_value=encode_signed_key(b"\x08\x01\x12\x20" + b"\x01" * 31, sig))
    ) == ("malformed_extension")
    # signed by a key other than its own, or naming another issuer
    assert reason_of(build(signer=ec.generate_private_key(ec.SECP256R1()))) == "bad_self_signature"
    assert reason_of(build(issuer="someone else")) == "bad_self_signature"
    # weak hash, unsupported certificate key types
    assert reason_of(build(hash_alg=hashes.SHA224())) == "unsupported_key"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert reason_of(build(key=rsa_key)) == "unsupported_key"
    assert reason_of(build(key=ec.generate_private_key(ec.SECP256K1()))) == "unsupported_key"
    # an Ed25519 certificate key is fine
    ed = ed25519.Ed25519PrivateKey.generate()
    assert peer_id_from_certificate(build(key=ed, hash_alg=None), now=NOW) == IDENT_A.peer_id
    # an unknown critical extension is refused, an unknown non-critical one ignored
    unknown = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    assert reason_of(build(extra=((unknown, True),))) == "unknown_critical_extension"
    assert peer_id_from_certificate(build(extra=((unknown, False),)), now=NOW) == IDENT_A.peer_id
    # garbage
    assert reason_of(b"") == "malformed_certificate"
    assert reason_of(b"\x30\x03\x02\x01\x01") == "malformed_certificate"


def test_hand_written_spki_matches_cryptography() -> None:
    cert = x509.load_der_x509_certificate(CERT_A)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert tlscert._spki_bytes(cert.tbs_certificate_bytes) == spki


def _check(der: bytes) -> None:
    try:
        peer = peer_id_from_certificate(der, now=NOW)
    except TLSIdentityError as err:
        assert err.reason and err.message
    else:
        assert peer == IDENT_A.peer_id


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_tls_identity_error(data: bytes) -> None:
    _check(data)
    _check(CERT_A[:40] + data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(CERT_A) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    st.integers(0, len(CERT_A)),
)
def test_mutated_certificates_only_raise_tls_identity_error(
    edits: list[tuple[int, int]], cut: int
) -> None:
    der = bytearray(CERT_A)
    for pos, byte in edits:
        der[pos] = byte
    _check(bytes(der))
    _check(bytes(der[:cut]))


# --- wss:// on loopback --------------------------------------------------------------------


async def _echo(ws: ServerConnection) -> None:
    async for msg in ws:
        await ws.send(msg)


def _plain_context(workdir: Path) -> ssl.SSLContext:
    """A server with an ordinary self-signed certificate: no libp2p extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (workdir / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(workdir / "c.pem", workdir / "k.pem")
    return ctx


async def _dial(ctx: ssl.SSLContext, client_ctx: ssl.SSLContext | None = None):
    server = await serve(_echo, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    return server, connect(
        f"wss://127.0.0.1:{port}", ssl=client_ctx or client_context(), proxy=None
    )


async def test_wss_peer_id_is_verified(tmp_path: Path) -> None:
    ident = Identity.generate()
    ctx = server_context(ident, tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    server, connecting = await _dial(ctx)
    async with server, connecting as ws:
        obj = ws.transport.get_extra_info("ssl_object")
        assert obj is ssl_object_of(ws)
        assert obj.version() == "TLSv1.3"
        assert verified_peer_id(obj) == ident.peer_id
        assert check_peer(obj, ident.peer_id) == ident.peer_id
        await ws.send(b"hello")  # the fednode handshake would go here, inside TLS
        assert await ws.recv() == b"hello"


async def test_wss_other_identity_is_a_mismatch(tmp_path: Path) -> None:
    expected, impostor = Identity.generate(), Identity.generate()
    server, connecting = await _dial(server_context(impostor, tmp_path))
    async with server, connecting as ws:
        with pytest.raises(PeerMismatch):
            check_peer(ssl_object_of(ws), expected.peer_id)


async def test_wss_plain_certificate_is_refused(tmp_path: Path) -> None:
    server, connecting = await _dial(_plain_context(tmp_path))
    async with server, connecting as ws:
        with pytest.raises(TLSIdentityError) as info:
            verified_peer_id(ssl_object_of(ws))
        assert info.value.reason == "no_extension"


async def test_tls12_client_is_refused(tmp_path: Path) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    server, connecting = await _dial(server_context(Identity.generate(), tmp_path), old)
    async with server:
        with pytest.raises(OSError):  # ssl.SSLError or ConnectionResetError, by timing
            async with connecting:
                pass


def test_server_context_rewrites_key_0600(tmp_path: Path) -> None:
    server_context(IDENT_A, tmp_path)
    first = (tmp_path / KEY_FILE).read_bytes()
    server_context(IDENT_A, tmp_path)
    assert (tmp_path / KEY_FILE).read_bytes() != first
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls-cert.pem", "tls-key.pem"]
