"""TLS certificates bound to a node identity, the way libp2p's TLS handshake binds them.

libp2p/specs ``tls/tls.md``: a node does not sign its TLS certificate with its Ed25519 host
key. It makes a fresh certificate key (here ECDSA P-256, as rust-libp2p does), self-signs the
certificate with it, and adds one extension, OID ``1.3.6.1.4.1.53594.1.1``, whose value is::

    SignedKey ::= SEQUENCE {
      publicKey OCTET STRING,  -- libp2p protobuf PublicKey: 08 01 12 20 || 32-byte Ed25519 key
      signature OCTET STRING   -- host key's Ed25519 signature over
    }                          --   "libp2p-tls-handshake:" || DER SubjectPublicKeyInfo of the cert

(The spec's ASN.1 block says BIT STRING, but go-libp2p, rust-libp2p and js-libp2p all encode
OCTET STRINGs, and that is what interoperates; we write and accept OCTET STRING only.)

TLS 1.3 proves the server holds the certificate's private key; the extension proves the host
key vouched for that certificate key; the peer ID is derived from the host key. So a client
that knows the peer ID it wants needs no certificate authority: ``peer_id_from_certificate``
checks the certificate and returns the peer ID it proves, and the caller compares.

Choices:

- The extension is marked **critical** (rust-libp2p does; the spec says it MAY be). A generic
  X.509 verifier that does not know it must then refuse the certificate instead of treating it
  as an ordinary self-signed one, so the binding is never silently ignored. We accept the
  extension critical or not, and refuse any *other* critical extension we do not understand,
  as the spec requires.
- Validity: ``notBefore`` is back-dated by one hour so a peer whose clock runs behind still
  accepts a fresh certificate; ``notAfter`` is ``days`` (365) later. The key is ephemeral and a
  node makes a new certificate each time it starts, so a long lifetime buys nothing.
- SignedKey is tiny and fixed (a SEQUENCE of two OCTET STRINGs), so it is encoded and parsed by
  the minimal, strict DER code below rather than cryptography's ``hazmat.asn1`` module, which
  only exists in recent releases (pyproject allows cryptography >= 43). The same reader pulls the
  exact SubjectPublicKeyInfo bytes out of the signed TBSCertificate, so the host signature is
  checked over the bytes the certificate really carries, not over a re-encoding of the key.

Pure: bytes in, bytes out, no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from protocol.errors import HandshakeError
from protocol.identity import Identity, peer_id_from_public_key

LIBP2P_EXTENSION_OID = "1.3.6.1.4.1.53594.1.1"
SIGNING_PREFIX = b"libp2p-tls-handshake:"
NOT_BEFORE_SKEW = timedelta(hours=1)
SUBJECT_CN = "fednode"

_OID = x509.ObjectIdentifier(LIBP2P_EXTENSION_OID)
_ED25519_PUB_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])  # protobuf PublicKey{Type=Ed25519, Data:32}
_KEY_TYPE_NAMES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_EC_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)  # >= 256 bits: no MD5, no SHA-1
# What cryptography raises on malformed or unusual certificates; anything else is a bug.
_PARSE_ERRORS = (
    ValueError,
    TypeError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    x509.InvalidVersion,
)

# TLSIdentityError.reason values: stable, for logs and tests.
MALFORMED_CERTIFICATE = "malformed_certificate"
UNSUPPORTED_KEY = "unsupported_key"
NOT_YET_VALID = "not_yet_valid"
EXPIRED = "expired"
BAD_SELF_SIGNATURE = "bad_self_signature"
UNKNOWN_CRITICAL_EXTENSION = "unknown_critical_extension"
NO_EXTENSION = "no_extension"
MALFORMED_EXTENSION = "malformed_extension"
BAD_SIGNATURE = "bad_signature"
NOT_TLS = "not_tls"


class TLSIdentityError(HandshakeError):
    """A peer's TLS certificate does not prove a libp2p identity (see ``reason``)."""

    code = "TLS_IDENTITY"
    hint = (
        "the node at this address did not present a certificate bound to a fednode identity; "
        "check the address, and that it runs with --tls"
    )

    def __init__(self, message: str, *, reason: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason


# --- minimal DER -----------------------------------------------------------------------------
# Only what SignedKey and the TBSCertificate walk need: single-byte tags, definite lengths in
# minimal form (strict DER), at most 4 length bytes. Anything else is malformed.


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the element at ``pos``; ValueError if malformed."""
    if pos + 2 > len(data):
        raise ValueError("truncated element")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not used here")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ValueError("indefinite or oversized length")
        if pos + count > len(data):
            raise ValueError("truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("length not in minimal DER form")
        pos += count
    if pos + length > len(data):
        raise ValueError("element runs past the end of its container")
    return tag, pos, pos + length


def encode_signed_key(public_key: bytes, signature: bytes) -> bytes:
    """DER of ``SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }``."""
    return _der_tlv(0x30, _der_tlv(0x04, public_key) + _der_tlv(0x04, signature))


def decode_signed_key(der: bytes) -> tuple[bytes, bytes]:
    """(publicKey, signature) of a SignedKey; ValueError unless it is exactly that, in DER."""
    tag, start, end = _read_tlv(der, 0)
    if tag != 0x30 or end != len(der):
        raise ValueError("not a single DER SEQUENCE")
    fields = []
    pos = start
    while pos < end:
        tag, vstart, vend = _read_tlv(der, pos)
        if tag != 0x04:
            raise ValueError(f"field {len(fields) + 1} is not an OCTET STRING (tag {tag:#04x})")
        fields.append(der[vstart:vend])
        pos = vend
    if len(fields) != 2:
        raise ValueError(f"SignedKey has 2 fields, found {len(fields)}")
    return fields[0], fields[1]


def _spki_bytes(tbs: bytes) -> bytes:
    """The exact SubjectPublicKeyInfo TLV inside a TBSCertificate (RFC 5280, 4.1)."""
    tag, pos, end = _read_tlv(tbs, 0)
    if tag != 0x30:
        raise ValueError("TBSCertificate is not a SEQUENCE")
    tag, _, vend = _read_tlv(tbs, pos)
    if tag == 0xA0:  # [0] EXPLICIT version
        pos = vend
    # serialNumber, signature, issuer, validity, subject, then subjectPublicKeyInfo
    for _ in range(5):
        _, _, pos = _read_tlv(tbs, pos)
    tag, _, vend = _read_tlv(tbs, pos)
    if tag != 0x30 or vend > end:
        raise ValueError("SubjectPublicKeyInfo is not a SEQUENCE")
    return tbs[pos:vend]


# --- making ----------------------------------------------------------------------------------


def make_certificate(
    identity: Identity, *, now: datetime | None = None, days: int = 365
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): a fresh P-256 key, self-signed, bound to ``identity``."""
    if days < 1:
        raise ValueError(f"a certificate must be valid for at least one day, got {days}")
    now = _utc(now)
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_key = encode_signed_key(
        _ED25519_PUB_PREFIX + identity.public_key, identity.sign(SIGNING_PREFIX + spki)
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBJECT_CN)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.UnrecognizedExtension(_OID, signed_key), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- checking --------------------------------------------------------------------------------


def peer_id_from_certificate(cert_der: bytes, *, now: datetime | None = None) -> str:
    """The peer ID a DER certificate proves; TLSIdentityError if it proves none.

    Checks, in order: it parses; its key is ECDSA (P-256/384/521, SHA-2 >= 256) or Ed25519;
    it is valid at ``now``; it is correctly self-signed; it has no critical extension we do not
    understand; it carries exactly one well-formed libp2p extension with an Ed25519 host key
    whose signature covers this certificate's SubjectPublicKeyInfo. The caller compares the
    result with the peer ID it meant to reach.
    """
    now = _utc(now)
    if not isinstance(cert_der, bytes | bytearray | memoryview):
        raise TLSIdentityError("certificate must be bytes", reason=MALFORMED_CERTIFICATE)
    cert_der = bytes(cert_der)
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        cert_key = cert.public_key()
        hash_alg = cert.signature_hash_algorithm
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
        spki = _spki_bytes(cert.tbs_certificate_bytes)
    except _PARSE_ERRORS as exc:
        raise TLSIdentityError(
            f"peer certificate is not a well-formed X.509 certificate: {exc}",
            reason=MALFORMED_CERTIFICATE,
        ) from None

    if isinstance(cert_key, ec.EllipticCurvePublicKey):
        if not isinstance(cert_key.curve, _EC_CURVES):
            raise TLSIdentityError(
                f"certificate key on curve {cert_key.curve.name} is not supported",
                reason=UNSUPPORTED_KEY,
            )
        if not isinstance(hash_alg, _EC_HASHES):
            name = hash_alg.name if hash_alg is not None else "none"
            raise TLSIdentityError(
                f"certificate signed with hash {name}; SHA-256 or stronger is required",
                reason=UNSUPPORTED_KEY,
            )
    elif not isinstance(cert_key, Ed25519PublicKey):
        raise TLSIdentityError(
            f"certificate key type {type(cert_key).__name__} is not supported "
            "(ECDSA P-256/384/521 or Ed25519)",
            reason=UNSUPPORTED_KEY,
        )

    if now < not_before:
        raise TLSIdentityError(
            f"peer certificate is not valid before {not_before.isoformat()} "
            f"(now {now.isoformat()})",
            reason=NOT_YET_VALID,
            hint="check the clocks of both machines (NTP)",
        )
    if now > not_after:
        raise TLSIdentityError(
            f"peer certificate expired at {not_after.isoformat()} (now {now.isoformat()})",
            reason=EXPIRED,
            hint="check the clocks of both machines (NTP); restarting the node renews it",
        )

    try:
        cert.verify_directly_issued_by(cert)
    except (*_PARSE_ERRORS, InvalidSignature) as exc:
        raise TLSIdentityError(
            f"peer certificate is not correctly self-signed: {exc or 'signature does not verify'}",
            reason=BAD_SELF_SIGNATURE,
        ) from None

    signed_key_der = _libp2p_extension(cert)
    try:
        host_key_pb, signature = decode_signed_key(signed_key_der)
    except ValueError as exc:
        raise TLSIdentityError(
            f"libp2p extension is not a DER SignedKey: {exc}", reason=MALFORMED_EXTENSION
        ) from None
    host_key = _ed25519_from_protobuf(host_key_pb)
    try:
        Ed25519PublicKey.from_public_bytes(host_key).verify(signature, SIGNING_PREFIX + spki)
    except (InvalidSignature, ValueError):
        raise TLSIdentityError(
            "the host key's signature in the libp2p extension does not cover this "
            "certificate's key",
            reason=BAD_SIGNATURE,
        ) from None
    return peer_id_from_public_key(host_key)


def _libp2p_extension(cert: x509.Certificate) -> bytes:
    try:
        extensions = list(cert.extensions)
    except _PARSE_ERRORS as exc:
        raise TLSIdentityError(
            f"peer certificate has malformed extensions: {exc}", reason=MALFORMED_CERTIFICATE
        ) from None
    found: bytes | None = None
    for ext in extensions:
        if ext.oid == _OID:
            value = ext.value
            if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover
                raise TLSIdentityError("unexpected libp2p extension", reason=MALFORMED_EXTENSION)
            found = value.value
        elif ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            raise TLSIdentityError(
                "peer certificate has a critical extension we do not understand "
                f"({ext.oid.dotted_string})",
                reason=UNKNOWN_CRITICAL_EXTENSION,
            )
    if found is None:
        raise TLSIdentityError(
            f"peer certificate has no libp2p public key extension ({LIBP2P_EXTENSION_OID}): "
            "it is not bound to any node identity",
            reason=NO_EXTENSION,
        )
    return found


def _ed25519_from_protobuf(blob: bytes) -> bytes:
    if len(blob) >= 2 and blob[0] == 0x08 and blob[1] in _KEY_TYPE_NAMES and blob[1] != 1:
        raise TLSIdentityError(
            f"host key type {_KEY_TYPE_NAMES[blob[1]]} is not supported; fednode identities "
            "are Ed25519",
            reason=UNSUPPORTED_KEY,
        )
    if len(blob) != 36 or blob[:4] != _ED25519_PUB_PREFIX:
        raise TLSIdentityError(
            "libp2p extension's public key is not a protobuf Ed25519 key",
            reason=MALFORMED_EXTENSION,
        )
    return blob[4:]


def _utc(now: datetime | None) -> datetime:
    """Aware UTC time; a naive ``now`` is taken to be UTC already."""
    if now is None:
        return datetime.now(UTC)
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
