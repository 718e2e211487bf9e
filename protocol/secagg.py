"""Secure aggregation: the coordinator learns the sum of the updates, never one update.

This is the math of Bonawitz et al. (CCS 2017, "SecAgg") and of its sparse-graph variant by
Bell et al. (CCS 2020, "SecAgg+"), without I/O: the node process carries every message in a
signed envelope, so nothing here signs or checks signatures, and the coordinator relays the
encrypted shares it cannot read.

One round, for participant ``u`` (``Client``) and the coordinator (``Server``):

1. ``advertise``: u makes two fresh X25519 pairs, ``c`` (to encrypt shares to its neighbours)
   and ``s`` (to agree pairwise masks). The coordinator collects them: the roster, U1.
2. ``share_keys``: the graph over U1 is fixed by ``Params.neighbours`` and ``graph_seed``
   (complete for SecAgg, a Harary ring over a seeded permutation for SecAgg+). u picks a
   self-mask seed ``b_u`` and Shamir-shares ``b_u`` and ``s_sk_u`` among its *holders*: its
   neighbours and itself (as Bonawitz shares among all of U1 including u). A secret held by
   m holders needs ``shares_needed(m)`` = max(2, ceil(threshold * m)) of them. Each neighbour's
   two shares go to it AES-GCM-encrypted. The senders are U2.
3. ``masked_input``: ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2**bits`` over the neighbours
   v in U2 (+ when u < v, - otherwise), so pairwise masks cancel in the sum. Senders: U3.
4. ``unmask``: each survivor reveals its share of ``b_v`` for the survivors v and its share of
   ``s_sk_v`` for the dropped v (U2 minus U3), never both for one v: with both, the coordinator
   could unmask v's vector alone.
5. ``Server.result``: reconstruct, remove the self masks of U3 and the dangling pairwise masks
   of the dropped, and return ``sum over U3 of x_u mod 2**bits``.

Choices (see also docs/security.md):

- Field: GF(2**521 - 1), a Mersenne prime; secrets are 32 bytes, shares 66 bytes big-endian.
  The x-coordinate of a holder's share is its position in sorted(U1) plus one, so a share is
  tied to the participant who returns it and a bad share can be attributed.
- PRG: AES-256-CTR keystream with a zero nonce (every key is used for one stream only), read as
  little-endian uint64, masked to ``bits``.
- What is masked: the weighted *update*, ``x_u = [n_u, n_u * q(w_u - g)]`` with ``g`` the
  round's global model (``encode_update``), which both sides hold: the participant fetched it
  by CID, the coordinator published it. ``decode_average`` adds ``g`` back to the decoded
  weighted mean, which is FedAvg exactly (sum n w / sum n = g + sum n (w - g) / sum n), and
  ``clip`` bounds a coordinate of the update, which is small, not of the model.
- Wire form of a masked vector (``pack`` / ``unpack``): ceil(bits/8) little-endian bytes per
  value, so ``bits`` sets the upload size (5 bytes at the default 40, 8 at 62; a float32
  model is 4).
- Weight bound: ``Params.max_weight`` (the spec's ``max_weight``) caps the examples one
  participant may claim; ``frac_bits`` is chosen for it, and the participant clamps to the
  value the coordinator sent.
- KDF: HKDF-SHA256, no salt, with canonical-CBOR ``info``:
  ``["fednode/secagg/v1/enc", round_tag, sender, receiver]`` for the share-encryption key
  (one key per direction), ``["fednode/secagg/v1/pair-mask", round_tag, min(u,v), max(u,v)]``
  for the pairwise mask seed, ``["fednode/secagg/v1/self-mask", round_tag, u]`` for the PRG
  key of ``b_u`` and ``["fednode/secagg/v1/graph"]`` for the graph permutation.
  The AES-GCM associated data is CBOR ``["fednode/secagg/v1/share", round_tag, u, v]`` and the
  ciphertext is ``nonce (12 bytes) || AES-GCM output``.
- Consistency: when more shares than needed arrive, every share must lie on one polynomial;
  if not, Berlekamp-Welch decoding finds the polynomial and names the senders whose shares are
  off it (up to (r - t) / 2 of r shares). A reconstructed ``s_sk_v`` must match v's advertised
  key and a ``b_v`` must fit in 32 bytes, which also detects (but cannot attribute) a bad share
  when exactly the threshold arrived.
- Threshold: the coordinator is honest-but-curious here; against a coordinator that lies about
  who dropped, Bonawitz et al. need threshold > 1/2 (the default is 0.6).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.envelope import decode, encode
from protocol.errors import DecodeError, FednodeError, StateError, ValidationError

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_CLIP",
    "DEFAULT_FRAC_BITS",
    "FIELD_PRIME",
    "MAX_WEIGHT",
    "MIN_FRAC_BITS",
    "SHARE_LEN",
    "Client",
    "InconsistentShares",
    "Params",
    "SecAggError",
    "Server",
    "add_mod",
    "decode_average",
    "decode_weighted",
    "encode_update",
    "encode_weighted",
    "frac_bits_for",
    "neighbours",
    "pack",
    "packed_size",
    "prg",
    "shares_needed",
    "sub_mod",
    "unpack",
    "value_bytes",
]

FIELD_PRIME = (1 << 521) - 1
SHARE_LEN = 66  # bytes of one field element, big-endian
SECRET_LEN = 32
KEY_LEN = 32
NONCE_LEN = 12
MAX_ID_LEN = 256
MAX_ROUND_TAG = 256
_LABEL = "fednode/secagg/v1/"
_ZERO_NONCE = bytes(16)
# Fixed point needs a bound on the weight (examples) one participant may claim; a participant
# with more data clamps its weight to it (documented in docs/secure-aggregation.md). The
# spec's [aggregation] max_weight overrides it per session; this is its default.
MAX_WEIGHT = 2**16
MAX_WEIGHT_LIMIT = 2**30
# The spec's defaults (protocol/spec.py reads them from here): 40 bits travel in 5 bytes per
# value, and clip bounds each coordinate of an update (w - g), which the demo's training keeps
# below 0.3 (measured: docs/secure-aggregation.md). With MAX_WEIGHT they leave 13 fraction
# bits (an error of at most 2**-14 per value of the average) for 100 participants, 10 for 1000.
DEFAULT_BITS = 40
DEFAULT_CLIP = 8.0
DEFAULT_FRAC_BITS = 13  # frac_bits_for(DEFAULT_BITS, DEFAULT_CLIP, MAX_WEIGHT, 100); tested
# Fewer fraction bits than this and the average is too coarse to train with: frac_bits_for
# refuses, and spec validation refuses bits / clip / max_weight that would lead there.
MIN_FRAC_BITS = 8


class SecAggError(FednodeError):
    """The round cannot finish securely (too few participants left, a step out of bounds)."""

    code = "SECAGG_ABORT"
    hint = "too many participants dropped; run the round again with more participants"


class InconsistentShares(SecAggError):
    """Shares that do not agree; ``culprits`` names the senders whose shares were off.

    ``suspects`` lists the senders among whom a bad share hides when it cannot be attributed
    (exactly the threshold arrived, or too many were off); ``culprits`` is then empty.
    """

    code = "SECAGG_INCONSISTENT"
    hint = "exclude the named participants and run the round again"

    def __init__(
        self,
        message: str,
        *,
        culprits: Iterable[str] = (),
        suspects: Iterable[str] = (),
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.culprits: list[str] = sorted(set(culprits))
        self.suspects: list[str] = sorted(set(suspects))


# ---------------------------------------------------------------------------------------------
# parameters and fixed point


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Params:
    """Everything both sides must agree on for one round (the coordinator sends it)."""

    bits: int = DEFAULT_BITS
    frac_bits: int = DEFAULT_FRAC_BITS
    clip: float = DEFAULT_CLIP  # bounds each coordinate of the encoded vector (an update)
    threshold: float = 0.6
    neighbours: int = 0
    graph_seed: bytes = b""
    round_tag: bytes = b""
    max_weight: int = MAX_WEIGHT  # the most examples one participant's weight may claim

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    def validate(self) -> None:
        """Refuse values that would silently break the math (overflow, no threshold)."""

        def bad(name: str, why: str) -> ValidationError:
            return ValidationError(f"secagg parameter {name!r} {why}")

        if not _is_int(self.bits) or not 32 <= self.bits <= 64:
            raise bad("bits", f"must be an integer in [32, 64], got {self.bits!r}")
        if not _is_int(self.frac_bits) or not 0 <= self.frac_bits <= self.bits - 2:
            raise bad("frac_bits", f"must be an integer in [0, bits-2], got {self.frac_bits!r}")
        if not _is_real(self.clip) or self.clip <= 0:
            raise bad("clip", f"must be a finite number > 0, got {self.clip!r}")
        if math.ceil(self.clip * 2.0**self.frac_bits) >= 1 << (self.bits - 1):
            raise bad(
                "frac_bits",
                f"is too large: clip * 2**frac_bits overflows {self.bits} bits "
                "(use frac_bits_for to choose it)",
            )
        if not _is_real(self.threshold) or not 0 < self.threshold <= 1:
            raise bad("threshold", f"must be a fraction in (0, 1], got {self.threshold!r}")
        if not _is_int(self.neighbours) or self.neighbours < 0 or self.neighbours % 2:
            raise bad("neighbours", f"must be 0 or an even integer > 0, got {self.neighbours!r}")
        if not isinstance(self.graph_seed, bytes):
            raise bad("graph_seed", "must be bytes")
        if self.neighbours and len(self.graph_seed) != 32:
            raise bad(
                "graph_seed", f"must be 32 bytes when neighbours > 0, got {len(self.graph_seed)}"
            )
        if len(self.graph_seed) not in (0, 32):
            raise bad("graph_seed", f"must be empty or 32 bytes, got {len(self.graph_seed)}")
        if not isinstance(self.round_tag, bytes) or len(self.round_tag) > MAX_ROUND_TAG:
            raise bad("round_tag", f"must be bytes of at most {MAX_ROUND_TAG}")
        if not _is_int(self.max_weight) or not 1 <= self.max_weight <= MAX_WEIGHT_LIMIT:
            raise bad(
                "max_weight",
                f"must be an integer in [1, 2**30], got {self.max_weight!r}",
            )


def shares_needed(holders: int, p: Params) -> int:
    """How many of ``holders`` shares rebuild a secret: ceil(threshold * m), at least 2.

    The small epsilon keeps float noise (0.6 * 5 = 3.0000000000000004) from adding a share.
    """
    if holders <= 1:
        return holders
    return min(holders, max(2, math.ceil(p.threshold * holders - 1e-9)))


def frac_bits_for(bits: int, clip: float, max_weight: int, max_participants: int) -> int:
    """The finest fixed-point precision whose weighted sum cannot overflow ``bits``.

    Every participant contributes at most ``max_weight * ceil(clip * 2**f)`` per value, and the
    sum of ``max_participants`` of them must stay below ``2**(bits-1)`` (two's complement).
    """
    if not _is_int(bits) or not 32 <= bits <= 64:
        raise ValidationError(
            f"secagg parameter 'bits' must be an integer in [32, 64], got {bits!r}"
        )
    if not _is_real(clip) or clip <= 0:
        raise ValidationError(f"secagg parameter 'clip' must be a finite number > 0, got {clip!r}")
    if not _is_int(max_weight) or max_weight < 1:
        raise ValidationError(f"'max_weight' must be an integer >= 1, got {max_weight!r}")
    if not _is_int(max_participants) or max_participants < 1:
        raise ValidationError(
            f"'max_participants' must be an integer >= 1, got {max_participants!r}"
        )
    limit = 1 << (bits - 1)
    for f in range(bits - 2, -1, -1):
        if max_participants * max_weight * math.ceil(clip * 2.0**f) < limit:
            if f < MIN_FRAC_BITS:
                break
            return f
    raise SecAggError(
        f"{bits}-bit arithmetic leaves fewer than {MIN_FRAC_BITS} fraction bits for "
        f"{max_participants} participants of weight up to {max_weight} with clip {clip}",
        hint="raise bits, or lower clip, the maximum weight or the number of participants",
    )


def encode_weighted(x: np.ndarray, weight: int, p: Params) -> np.ndarray:
    """``[weight, weight * round(clip(x) * 2**frac_bits)]`` in two's complement mod 2**bits.

    The weight rides along unscaled so that the coordinator learns only the sum of weights and
    the weighted sum, and divides; rounding happens before the integer multiply, so the error
    is at most 2**-(frac_bits+1) per value and per participant. A participant encodes its
    update with ``encode_update``, which encodes ``x - g`` this way.
    """
    return _encode(x, weight, p)[0]


def encode_update(
    x: np.ndarray, base: np.ndarray, weight: int, p: Params
) -> tuple[np.ndarray, int]:
    """The masked-input vector of one participant, and how many coordinates the clip cut.

    ``x`` is the participant's trained model and ``base`` the round's global model it trained
    from, both flat: what is encoded is the update ``x - base`` (in float64, where the
    difference of two float32 values is exact unless one is below 2**-29 of the other), so
    ``clip`` bounds a coordinate of the update. The count is for the participant's own
    records; a large one means ``clip`` is too small for this training.
    """
    arr = np.asarray(x, dtype=np.float64).ravel()
    g = np.asarray(base, dtype=np.float64).ravel()
    if arr.shape != g.shape:
        raise ValidationError(
            f"the model has {arr.size} values but the round's model has {g.size}",
            hint="encode against the global model the participant trained from",
        )
    if not np.all(np.isfinite(g)):
        raise ValidationError("the round's model has NaN or infinite values")
    return _encode(arr - g, weight, p)


def _encode(x: np.ndarray, weight: int, p: Params) -> tuple[np.ndarray, int]:
    p.validate()
    if not _is_int(weight) or weight < 0:
        raise ValidationError(f"weight must be an integer >= 0, got {weight!r}")
    if weight > p.max_weight:
        raise ValidationError(
            f"weight {weight} is over this round's max_weight {p.max_weight}",
            hint="clamp it: min(num_examples, p.max_weight); frac_bits was chosen for that bound",
        )
    arr = np.asarray(x, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValidationError("the vector to aggregate has NaN or infinite values")
    scale = 2.0**p.frac_bits
    if weight * math.ceil(p.clip * scale) >= 1 << (p.bits - 1):
        raise SecAggError(
            f"weight {weight} times clip {p.clip} does not fit {p.bits}-bit fixed point "
            f"with {p.frac_bits} fraction bits",
            hint="choose frac_bits with frac_bits_for(bits, clip, max_weight, max_participants)",
        )
    clipped = int(np.count_nonzero(np.abs(arr) > p.clip))
    q = np.rint(np.clip(arr, -p.clip, p.clip) * scale).astype(np.int64)
    q *= np.int64(weight)
    out = np.empty(arr.size + 1, dtype=np.uint64)
    out[0] = weight
    out[1:] = q.view(np.uint64)
    out &= p.modulus_mask
    return out, clipped


def decode_weighted(total: np.ndarray, p: Params) -> tuple[float, np.ndarray]:
    """(sum of weights, weighted sum) from an unmasked total; divide for the average."""
    p.validate()
    v = _check_vector(total, p, "total")
    if v.size < 1:
        raise ValidationError("the total must hold at least the weight slot")
    if p.bits == 64:
        signed = v.view(np.int64)
    else:
        signed = v.astype(np.int64)
        signed[v >= np.uint64(1 << (p.bits - 1))] -= np.int64(1 << p.bits)
    weight = int(signed[0])
    if weight < 0:
        raise SecAggError(
            f"the sum of weights decodes as {weight}: the sum overflowed {p.bits} bits",
            hint="choose frac_bits with frac_bits_for(...) for this many participants",
        )
    return float(weight), signed[1:].astype(np.float64) / 2.0**p.frac_bits


def decode_average(total: np.ndarray, base: np.ndarray, p: Params) -> tuple[float, np.ndarray]:
    """(sum of weights, the new model): ``base`` plus the weighted mean of the updates.

    The inverse of summing ``encode_update`` over the survivors: FedAvg of their models,
    within 2**-(frac_bits+1) per value whatever the weights (each participant's rounding is
    at most that, and so is their weighted mean). Float64; the caller casts.
    """
    weight, weighted = decode_weighted(total, p)
    g = np.asarray(base, dtype=np.float64).ravel()
    if g.shape != weighted.shape:
        raise ValidationError(
            f"the total holds {weighted.size} values but the round's model has {g.size}"
        )
    if weight <= 0:
        raise SecAggError("the unmasked sum has no weight: no participant's data in it")
    return weight, g + weighted / weight


def add_mod(a: np.ndarray, b: np.ndarray, p: Params) -> np.ndarray:
    out = np.add(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    out &= p.modulus_mask
    return out


def sub_mod(a: np.ndarray, b: np.ndarray, p: Params) -> np.ndarray:
    out = np.subtract(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    out &= p.modulus_mask
    return out


def value_bytes(p: Params) -> int:
    """Bytes of one value on the wire: ceil(bits / 8), so 5 for the default 40 bits."""
    return (p.bits + 7) // 8


def packed_size(dim: int, p: Params) -> int:
    """Bytes of a packed vector of ``dim`` values (what ``secagg_masked.data`` carries)."""
    return dim * value_bytes(p)


def pack(y: np.ndarray, p: Params) -> bytes:
    """Each value in ceil(bits/8) little-endian bytes: the wire form of a masked vector.

    A masked value is uniform below 2**bits, so it cannot be compressed; dropping the bytes
    that are always zero is all there is to gain (at the default bits = 40, 5 bytes per value
    against the 4 of a float32 model, instead of 8). Byte granularity keeps it one strided
    numpy copy.
    """
    p.validate()
    v = _check_vector(y, p, "the vector to pack")
    w = value_bytes(p)
    le = np.ascontiguousarray(v, dtype="<u8")
    if w == 8:
        return le.tobytes()
    return le.view(np.uint8).reshape(v.size, 8)[:, :w].tobytes()


def unpack(data: bytes, dim: int, p: Params) -> np.ndarray:
    """The inverse of ``pack``: ``dim`` uint64 values, each checked to be < 2**bits."""
    p.validate()
    if not _is_int(dim) or dim < 0:
        raise ValidationError(f"the vector length must be an integer >= 0, got {dim!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError(f"a packed vector must be bytes, got {type(data).__name__}")
    w = value_bytes(p)
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size != dim * w:
        raise ValidationError(
            f"a packed vector of {raw.size:,} bytes, expected {dim * w:,} "
            f"({dim:,} values of {w} bytes for bits = {p.bits})"
        )
    if w == 8:
        out = raw.view("<u8").astype(np.uint64)
    else:
        # Value i is the 8 bytes from offset i*w on, masked to its w bytes: an overlapping
        # strided view (8 - w zero bytes padded at the end) and one masking pass, 3x faster
        # than copying (dim, w) into a zeroed (dim, 8) array; this runs n times per round.
        padded = raw.tobytes() + bytes(8 - w)
        window = np.ndarray((dim,), dtype="<u8", buffer=padded, strides=(w,))
        out = np.bitwise_and(window, np.uint64((1 << (8 * w)) - 1), dtype=np.uint64)
    if p.bits % 8 and dim and int(out.max()) >= 1 << p.bits:
        raise ValidationError(f"a packed vector has values >= 2**{p.bits}")
    return out


def _check_vector(y: Any, p: Params, what: str, dim: int | None = None) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.dtype != np.uint64 or y.ndim != 1:
        raise ValidationError(f"{what} must be a one-dimensional uint64 array")
    if dim is not None and y.size != dim:
        raise ValidationError(f"{what} has {y.size} values, expected {dim}")
    if p.bits < 64 and y.size and int(y.max()) >= 1 << p.bits:
        raise ValidationError(f"{what} has values >= 2**{p.bits}")
    return y


# ---------------------------------------------------------------------------------------------
# PRG, KDF, key agreement


def _kdf(ikm: bytes, *info: Any) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_LEN,
        salt=None,
        info=encode([_LABEL + info[0], *info[1:]]),
    ).derive(ikm)


class _Expander:
    """AES-256-CTR keystream into a reused buffer: the PRG of every mask of one round."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._zeros = bytes(8 * dim)
        self._buf = np.empty(dim, dtype=np.uint64)

    def stream(self, key: bytes) -> np.ndarray:
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_NONCE)).encryptor()
        enc.update_into(self._zeros, self._buf.view(np.uint8))
        if not np.little_endian:  # pragma: no cover
            return self._buf.byteswap()
        return self._buf

    def add(self, acc: np.ndarray, key: bytes) -> None:
        np.add(acc, self.stream(key), out=acc)

    def sub(self, acc: np.ndarray, key: bytes) -> None:
        np.subtract(acc, self.stream(key), out=acc)


def prg(key: bytes, dim: int, p: Params) -> np.ndarray:
    """``dim`` pseudo-random values < 2**bits from a 32-byte key (the mask of one seed)."""
    out = _Expander(dim).stream(key).copy()
    out &= p.modulus_mask
    return out


def _public_key(raw: Any, what: str) -> X25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValidationError(f"{what} must be 32 bytes")
    key = X25519PublicKey.from_public_bytes(raw)
    try:  # a low-order point gives the all-zero secret for every private key: refuse it
        _PROBE.exchange(key)
    except ValueError:
        raise ValidationError(f"{what} is a low-order point, not a usable X25519 key") from None
    return key


_PROBE = X25519PrivateKey.generate()


def _exchange(sk: X25519PrivateKey, pk: X25519PublicKey, who: str) -> bytes:
    try:
        return sk.exchange(pk)
    except ValueError:
        raise ValidationError(f"the X25519 key of {who} gives no shared secret") from None


def _pair_key(sk: X25519PrivateKey, pk: X25519PublicKey, u: str, v: str, p: Params) -> bytes:
    a, b = sorted((u, v))
    return _kdf(_exchange(sk, pk, v), "pair-mask", p.round_tag, a, b)


def _self_key(b_seed: bytes, u: str, p: Params) -> bytes:
    return _kdf(b_seed, "self-mask", p.round_tag, u)


def _aad(u: str, v: str, p: Params) -> bytes:
    return encode([_LABEL + "share", p.round_tag, u, v])


def _check_keys(keys: Any, who: str) -> dict[str, bytes]:
    if not isinstance(keys, Mapping) or set(keys) != {"c_pk", "s_pk"}:
        raise ValidationError(f"the keys of {who} must be a map with exactly c_pk and s_pk")
    for name in ("c_pk", "s_pk"):
        _public_key(keys[name], f"{name} of {who}")
    return {"c_pk": keys["c_pk"], "s_pk": keys["s_pk"]}


def _check_id(u: Any) -> str:
    if not isinstance(u, str) or not 0 < len(u) <= MAX_ID_LEN:
        raise ValidationError(f"a participant ID must be text of 1 to {MAX_ID_LEN} characters")
    return u


# ---------------------------------------------------------------------------------------------
# the graph


def neighbours(participants: list[str], p: Params) -> dict[str, list[str]]:
    """Who masks with and holds shares for whom: complete, or a seeded Harary ring (SecAgg+).

    For SecAgg+ the sorted participants are shuffled (Fisher-Yates, AES-CTR keyed by HKDF of
    ``graph_seed``, rejection sampling so that every permutation is equally likely) and each
    is joined to the k/2 next and k/2 previous on the ring: k-regular and symmetric, and a
    function of (participants, graph_seed) only, so every party computes the same graph.
    """
    p.validate()
    ids = sorted(participants)
    if len(set(ids)) != len(ids):
        raise ValidationError("the participant list names someone twice")
    n = len(ids)
    k = p.neighbours
    if k == 0 or k >= n - 1:
        return {u: [v for v in ids if v != u] for u in ids}
    enc = Cipher(algorithms.AES(_kdf(p.graph_seed, "graph")), modes.CTR(_ZERO_NONCE)).encryptor()
    order = list(ids)
    for i in range(n - 1, 0, -1):
        span = i + 1
        limit = (1 << 64) - (1 << 64) % span
        while True:
            r = int.from_bytes(enc.update(bytes(8)), "little")
            if r < limit:
                break
        j = r % span
        order[i], order[j] = order[j], order[i]
    graph: dict[str, list[str]] = {}
    for i, u in enumerate(order):
        near = {order[(i + s) % n] for s in range(1, k // 2 + 1)}
        near |= {order[(i - s) % n] for s in range(1, k // 2 + 1)}
        graph[u] = sorted(near)
    return dict(sorted(graph.items()))


# ---------------------------------------------------------------------------------------------
# Shamir over GF(2**521 - 1)


def _random_element(rng: Callable[[int], bytes]) -> int:
    while True:
        v = int.from_bytes(rng(SHARE_LEN), "big") & FIELD_PRIME
        if v < FIELD_PRIME:
            return v


def _split(secret: bytes, xs: list[int], t: int, rng: Callable[[int], bytes]) -> dict[int, bytes]:
    coeffs = [int.from_bytes(secret, "big")] + [_random_element(rng) for _ in range(t - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % FIELD_PRIME
        out[x] = acc.to_bytes(SHARE_LEN, "big")
    return out


def _share_value(raw: Any, what: str) -> int:
    if not isinstance(raw, bytes) or len(raw) != SHARE_LEN:
        raise ValidationError(f"{what} must be {SHARE_LEN} bytes")
    v = int.from_bytes(raw, "big")
    if v >= FIELD_PRIME:
        raise ValidationError(f"{what} is not an element of the field")
    return v


@lru_cache(maxsize=4096)
def _inv(a: int) -> int:
    return pow(a % FIELD_PRIME, -1, FIELD_PRIME)


def _newton(xs: list[int], ys: list[int]) -> list[int]:
    """Divided differences: the polynomial through the points, in Newton form."""
    c = list(ys)
    for j in range(1, len(xs)):
        for i in range(len(xs) - 1, j - 1, -1):
            c[i] = (c[i] - c[i - 1]) * _inv(xs[i] - xs[i - j]) % FIELD_PRIME
    return c


def _newton_eval(xs: list[int], c: list[int], x: int) -> int:
    acc = c[-1]
    for i in range(len(c) - 2, -1, -1):
        acc = (acc * (x - xs[i]) + c[i]) % FIELD_PRIME
    return acc


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """Gaussian elimination mod the prime; one solution (free unknowns 0) or None."""
    m = [list(r) for r in rows]
    pivots: list[int] = []
    row = 0
    for col in range(unknowns):
        pivot = next((i for i in range(row, len(m)) if m[i][col]), None)
        if pivot is None:
            continue
        m[row], m[pivot] = m[pivot], m[row]
        inv = pow(m[row][col], -1, FIELD_PRIME)
        m[row] = [v * inv % FIELD_PRIME for v in m[row]]
        for i in range(len(m)):
            if i != row and m[i][col]:
                f = m[i][col]
                m[i] = [(a - f * b) % FIELD_PRIME for a, b in zip(m[i], m[row], strict=True)]
        pivots.append(col)
        row += 1
    if any(r[-1] for r in m[row:]):
        return None
    sol = [0] * unknowns
    for i, col in enumerate(pivots):
        sol[col] = m[i][-1]
    return sol


def _berlekamp_welch(xs: list[int], ys: list[int], t: int, e: int) -> list[int] | None:
    """The degree < t polynomial (coefficients) agreeing with all but at most e points."""
    rows = []
    for x, y in zip(xs, ys, strict=True):
        pw = [pow(x, j, FIELD_PRIME) for j in range(t + e + 1)]
        rows.append(
            pw[: t + e] + [(-y * pw[j]) % FIELD_PRIME for j in range(e)] + [y * pw[e] % FIELD_PRIME]
        )
    sol = _solve(rows, t + 2 * e)
    if sol is None:
        return None
    q, err = sol[: t + e], [*sol[t + e :], 1]  # err is monic, degree e
    quotient = [0] * t
    rem = list(q)
    for i in range(len(rem) - 1, e - 1, -1):  # long division by the monic err
        f = rem[i]
        if f:
            quotient[i - e] = f
            for j in range(e + 1):
                rem[i - e + j] = (rem[i - e + j] - f * err[j]) % FIELD_PRIME
    if any(rem[:e]):
        return None
    return quotient


def _poly_eval(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % FIELD_PRIME
    return acc


def _consistent(xs: list[int], ys: list[int], t: int) -> int | None:
    """The secret if every point lies on the polynomial through the first t, else None."""
    c = _newton(xs[:t], ys[:t])
    for x, y in zip(xs[t:], ys[t:], strict=True):
        if _newton_eval(xs[:t], c, x) != y:
            return None
    return _newton_eval(xs[:t], c, 0)


def _reconstruct(
    points: list[tuple[str, int, int]], t: int, ok: Callable[[int], bool]
) -> tuple[int | None, list[str], list[str]]:
    """(secret, culprits, suspects) from (sender, x, y) points; secret None if unattributable.

    The fast path interpolates the first t points and checks the others on that polynomial.
    Otherwise Berlekamp-Welch corrects up to (r - t) / 2 bad points; failing that, with one
    more point than needed, the only left-out point whose removal gives a secret that passes
    ``ok`` is the culprit. Anything else is reported without a name.
    """
    points = sorted(points, key=lambda q: q[1])
    senders = [q[0] for q in points]
    xs = [q[1] for q in points]
    ys = [q[2] for q in points]
    secret = _consistent(xs, ys, t)
    if secret is not None and ok(secret):
        return secret, [], []
    r = len(points)
    e = (r - t) // 2
    if e >= 1:
        poly = _berlekamp_welch(xs, ys, t, e)
        if poly is not None:
            bad = [s for s, x, y in points if _poly_eval(poly, x) != y]
            if 0 < len(bad) <= e and ok(poly[0]):
                return poly[0], bad, []
    if r > t:
        found = []
        for i in range(r):
            rest_x, rest_y = xs[:i] + xs[i + 1 :], ys[:i] + ys[i + 1 :]
            cand = _consistent(rest_x, rest_y, t)
            if cand is not None and ok(cand):
                found.append((i, cand))
        if len(found) == 1:
            i, cand = found[0]
            return cand, [senders[i]], []
    return None, [], senders


# ---------------------------------------------------------------------------------------------
# the participant


class Client:
    """One participant's state for one round (fresh keys every round)."""

    def __init__(self, me: str, p: Params, rng: Callable[[int], bytes] = os.urandom) -> None:
        p.validate()
        self.me = _check_id(me)
        self.p = p
        self._rng = rng
        self._c_sk = X25519PrivateKey.from_private_bytes(rng(32))
        self._s_sk_raw = rng(32)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_raw)
        self._keys = {
            "c_pk": self._c_sk.public_key().public_bytes_raw(),
            "s_pk": self._s_sk.public_key().public_bytes_raw(),
        }
        self._stage = "advertise"
        self._roster: dict[str, dict[str, bytes]] = {}
        self._index: dict[str, int] = {}
        self._nbrs: list[str] = []
        self._needed = 0
        self._b = b""
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (share of b, share of s_sk)
        self.stats: dict[str, int] = {}

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise StateError(f"secagg: {call} is not allowed at stage {self._stage!r}")

    def advertise(self) -> dict[str, bytes]:
        self._expect("advertise", "advertise")
        self.stats["advertise_out"] = 64
        return dict(self._keys)

    def share_keys(self, roster: dict[str, dict]) -> dict[str, bytes]:
        """Share ``b`` and ``s_sk`` among my holders; one ciphertext per neighbour."""
        self._expect("advertise", "share_keys")
        if not isinstance(roster, Mapping):
            raise ValidationError("the roster must be a map of participant -> keys")
        clean = {_check_id(u): _check_keys(k, u) for u, k in roster.items()}
        if clean.get(self.me) != self._keys:
            raise SecAggError(
                "stage share_keys: the roster does not list this participant with its own keys",
                hint="the coordinator altered the roster; leave the round",
            )
        ids = sorted(clean)
        self._roster = clean
        self._index = {u: i + 1 for i, u in enumerate(ids)}
        self._nbrs = neighbours(ids, self.p)[self.me]
        holders = [*self._nbrs, self.me]
        self._needed = shares_needed(len(holders), self.p)
        if len(holders) < 2:
            raise SecAggError(
                f"stage share_keys: {len(self._nbrs)} neighbours in a roster of {len(ids)}; "
                "at least one is needed to hide this participant's input"
            )
        self._b = self._rng(SECRET_LEN)
        xs = [self._index[v] for v in holders]
        b_sh = _split(self._b, xs, self._needed, self._rng)
        s_sh = _split(self._s_sk_raw, xs, self._needed, self._rng)
        self._held[self.me] = (b_sh[self._index[self.me]], s_sh[self._index[self.me]])
        out = {}
        for v in self._nbrs:
            x = self._index[v]
            c_pk = X25519PublicKey.from_public_bytes(clean[v]["c_pk"])
            key = _kdf(_exchange(self._c_sk, c_pk, v), "enc", self.p.round_tag, self.me, v)
            nonce = self._rng(NONCE_LEN)
            pt = encode([self.me, v, b_sh[x], s_sh[x]])
            out[v] = nonce + AESGCM(key).encrypt(nonce, pt, _aad(self.me, v, self.p))
        self.stats["share_keys_out"] = sum(map(len, out.values()))
        self._stage = "masked_input"
        return out

    def _open(self, u: str, ct: Any) -> tuple[bytes, bytes]:
        try:
            if not isinstance(ct, bytes) or len(ct) < NONCE_LEN + 16:
                raise ValueError("short")
            c_pk = X25519PublicKey.from_public_bytes(self._roster[u]["c_pk"])
            key = _kdf(_exchange(self._c_sk, c_pk, u), "enc", self.p.round_tag, u, self.me)
            pt = AESGCM(key).decrypt(ct[:NONCE_LEN], ct[NONCE_LEN:], _aad(u, self.me, self.p))
            msg = decode(pt, what="secagg share")
            if not (isinstance(msg, list) and len(msg) == 4 and msg[:2] == [u, self.me]):
                raise ValueError("shape")
            _share_value(msg[2], "share of b")
            _share_value(msg[3], "share of s_sk")
        except (InvalidTag, ValueError, DecodeError, ValidationError):
            raise InconsistentShares(
                f"stage masked_input: the shares from {u} do not decrypt or are malformed",
                culprits=[u],
            ) from None
        return msg[2], msg[3]

    def masked_input(self, received: dict[str, bytes], x: np.ndarray) -> np.ndarray:
        """Keep the shares sent to me and mask ``x`` (already encoded) for the neighbours in U2."""
        self._expect("masked_input", "masked_input")
        if not isinstance(received, Mapping):
            raise ValidationError("the relayed shares must be a map of sender -> ciphertext")
        strangers = sorted(set(received) - set(self._nbrs))
        if strangers:
            raise SecAggError(
                f"stage masked_input: shares relayed from non-neighbours {strangers[:5]}",
                hint="the coordinator and this participant disagree on the graph; leave the round",
            )
        if len(received) + 1 < self._needed:
            raise SecAggError(
                f"stage masked_input: {len(received)} of {len(self._nbrs)} neighbours sent "
                f"shares, {self._needed - 1} needed for the threshold"
            )
        x = _check_vector(x, self.p, "the encoded input")
        held = {u: self._open(u, ct) for u, ct in sorted(received.items())}
        self._held.update(held)
        exp = _Expander(x.size)
        y = x.copy()
        exp.add(y, _self_key(self._b, self.me, self.p))
        for v in held:
            s_pk = X25519PublicKey.from_public_bytes(self._roster[v]["s_pk"])
            key = _pair_key(self._s_sk, s_pk, self.me, v, self.p)
            if self.me < v:
                exp.add(y, key)
            else:
                exp.sub(y, key)
        y &= self.p.modulus_mask
        self.stats["masked_input_out"] = packed_size(y.size, self.p)  # as pack() sends it
        self._stage = "unmask"
        return y

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, bytes]]:
        """My share of b for the survivors, of s_sk for the dropped; never both for one."""
        self._expect("unmask", "unmask")
        surv, drop = set(survivors), set(dropped)
        if len(surv) != len(survivors) or len(drop) != len(dropped):
            raise SecAggError("stage unmask: the survivor or dropped list names someone twice")
        both = sorted(surv & drop)
        if both:
            raise SecAggError(
                f"stage unmask: {both[:5]} listed as both survived and dropped; revealing both "
                "shares would expose their inputs",
                hint="the coordinator is misbehaving; leave the round",
            )
        if self.me not in surv:
            raise SecAggError("stage unmask: asked to unmask without being listed as a survivor")
        self._stage = "done"
        out = {
            "b": {v: self._held[v][0] for v in sorted(surv) if v in self._held},
            "s": {v: self._held[v][1] for v in sorted(drop) if v in self._held},
        }
        self.stats["unmask_out"] = SHARE_LEN * (len(out["b"]) + len(out["s"]))
        return out


# ---------------------------------------------------------------------------------------------
# the coordinator


_STAGES = ("advertise", "shares", "masked", "unmask", "done")


class Server:
    """The coordinator's state for one round; it only ever holds masked vectors and their sum.

    ``dim`` is the length of every masked vector (for ``encode_weighted``: values + 1).
    ``stats`` counts the bytes of the secagg payloads (not envelopes) per stage and per
    participant, masked vectors at their packed size (``pack``), and the seconds spent in
    ``result``.
    """

    def __init__(self, p: Params, dim: int) -> None:
        p.validate()
        if not _is_int(dim) or dim < 1:
            raise ValidationError(f"the vector length must be an integer >= 1, got {dim!r}")
        self.p = p
        self.dim = dim
        self._stage = "advertise"
        self._keys: dict[str, dict[str, bytes]] = {}
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._graph: dict[str, list[str]] = {}
        self._shares: dict[str, dict[str, bytes]] = {}
        self._sum = np.zeros(dim, dtype=np.uint64)
        self._masked: set[str] = set()
        self._survivors: list[str] = []
        self._dropped: list[str] = []
        self._unmask: dict[str, dict[str, dict[str, bytes]]] = {}
        self.stats: dict[str, Any] = {
            "in": dict.fromkeys(_STAGES[:4], 0),
            "out": dict.fromkeys(_STAGES[:4], 0),
            "per_participant": {},
            "seconds": {},
        }

    def _count(self, stage: str, u: str, n_in: int = 0, n_out: int = 0) -> None:
        self.stats["in"][stage] += n_in
        self.stats["out"][stage] += n_out
        pp = self.stats["per_participant"].setdefault(u, {"in": 0, "out": 0})
        pp["in"] += n_in
        pp["out"] += n_out

    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise StateError(f"secagg: {call} is not allowed at stage {self._stage!r}")

    def _needed(self, v: str) -> int:
        return shares_needed(len(self._graph[v]) + 1, self.p)

    def on_advertise(self, u: str, keys: dict) -> None:
        self._expect("advertise", "on_advertise")
        _check_id(u)
        if u in self._keys:
            raise ValidationError(f"{u} advertised keys twice in one round")
        self._keys[u] = _check_keys(keys, u)
        self._count("advertise", u, n_in=64)

    def roster(self) -> dict[str, dict]:
        """Close the advertise stage: U1, to be sent to every member of it."""
        if self._stage == "advertise":
            if len(self._keys) < 2:
                raise SecAggError(
                    f"stage advertise: {len(self._keys)} participant(s) advertised keys, "
                    "at least 2 are needed"
                )
            self._ids = sorted(self._keys)
            self._index = {u: i + 1 for i, u in enumerate(self._ids)}
            self._graph = neighbours(self._ids, self.p)
            self._stage = "shares"
            for u in self._ids:
                self._count("advertise", u, n_out=64 * len(self._ids))
        elif not self._ids:
            raise StateError("secagg: roster is not available before the advertise stage ends")
        return {u: dict(self._keys[u]) for u in self._ids}

    def on_shares(self, u: str, ciphertexts: dict[str, bytes]) -> None:
        self._expect("shares", "on_shares")
        if u not in self._index:
            raise ValidationError(f"{u} sent shares but is not on this round's roster")
        if u in self._shares:
            raise ValidationError(f"{u} sent shares twice in one round")
        if not isinstance(ciphertexts, Mapping) or set(ciphertexts) != set(self._graph[u]):
            raise ValidationError(f"{u} must send one ciphertext to each of its neighbours")
        for v, ct in ciphertexts.items():
            if not isinstance(ct, bytes) or not 0 < len(ct) <= 4 * MAX_ID_LEN + 4 * SHARE_LEN:
                raise ValidationError(f"the ciphertext from {u} to {v} has a bad type or size")
        self._shares[u] = dict(ciphertexts)
        self._count("shares", u, n_in=sum(map(len, ciphertexts.values())))

    def relay(self) -> dict[str, dict[str, bytes]]:
        """Close the shares stage: {receiver v: {sender u: ciphertext}} for every v in U2."""
        if self._stage != "shares":
            raise StateError(f"secagg: relay is not allowed at stage {self._stage!r}")
        if len(self._shares) < 2:
            raise SecAggError(
                f"stage share_keys: {len(self._shares)} of {len(self._ids)} participants "
                "sent shares, at least 2 are needed"
            )
        self._stage = "masked"
        out: dict[str, dict[str, bytes]] = {v: {} for v in sorted(self._shares)}
        for u, cts in sorted(self._shares.items()):
            for v, ct in cts.items():
                if v in out:
                    out[v][u] = ct
        for v, cts in out.items():
            self._count("shares", v, n_out=sum(map(len, cts.values())))
        return out

    def on_masked(self, u: str, y: np.ndarray) -> None:
        self._expect("masked", "on_masked")
        if u not in self._shares:
            raise ValidationError(f"{u} sent a masked input but did not send shares this round")
        if u in self._masked:
            raise ValidationError(f"{u} sent its masked input twice")
        y = _check_vector(y, self.p, f"the masked input of {u}", self.dim)
        np.add(self._sum, y, out=self._sum)
        self._masked.add(u)
        self._count("masked", u, n_in=packed_size(y.size, self.p))  # as it came, packed

    def unmask_request(self) -> tuple[list[str], list[str]]:
        """Close the masked stage: (U3 survivors, U2 minus U3 dropped), the same for everyone."""
        if self._stage == "unmask":
            return list(self._survivors), list(self._dropped)
        self._expect("masked", "unmask_request")
        survivors = sorted(self._masked)
        dropped = sorted(set(self._shares) - self._masked)
        alive = set(survivors)
        for v in sorted(self._shares):
            have = len(alive & {*self._graph[v], v})
            need = self._needed(v)
            if have < need:
                raise SecAggError(
                    f"stage unmask: {len(survivors)} of {len(self._shares)} participants sent "
                    f"masked inputs; the secret of {v} has {have} surviving holders, {need} needed"
                )
        self._survivors, self._dropped = survivors, dropped
        self._stage = "unmask"
        for u in survivors:
            self._count("unmask", u, n_out=8 * (len(survivors) + len(dropped)))
        return list(survivors), list(dropped)

    def on_unmask(self, u: str, shares: dict) -> None:
        self._expect("unmask", "on_unmask")
        if u not in self._masked:
            raise ValidationError(f"{u} sent unmasking shares but is not a survivor")
        if u in self._unmask:
            raise ValidationError(f"{u} sent unmasking shares twice")
        if not isinstance(shares, Mapping) or set(shares) != {"b", "s"}:
            raise ValidationError(f"the unmasking shares of {u} must be a map with b and s")
        mine = {*self._graph[u], u}
        want = {"b": mine & set(self._survivors), "s": mine & set(self._dropped)}
        for kind in ("b", "s"):
            got = shares[kind]
            if not isinstance(got, Mapping) or set(got) != want[kind]:
                raise ValidationError(
                    f"{u} must send its share of {kind} for exactly {sorted(want[kind])[:5]}..."
                )
            for v, raw in got.items():
                _share_value(raw, f"the share of {kind} of {v} from {u}")
        self._unmask[u] = {"b": dict(shares["b"]), "s": dict(shares["s"])}
        self._count("unmask", u, n_in=SHARE_LEN * (len(want["b"]) + len(want["s"])))

    def result(self) -> np.ndarray:
        """Reconstruct, check, unmask: the sum over U3 of the inputs mod 2**bits."""
        self._expect("unmask", "result")
        start = time.perf_counter()
        culprits: set[str] = set()
        unattributed: list[tuple[str, list[str]]] = []
        short: list[str] = []
        secrets: dict[tuple[str, str], int] = {}
        for kind, owners in (("b", self._survivors), ("s", self._dropped)):
            for v in owners:
                points = [
                    (w, self._index[w], int.from_bytes(sh[kind][v], "big"))
                    for w, sh in self._unmask.items()
                    if v in sh[kind]
                ]
                need = self._needed(v)
                if len(points) < need:
                    short.append(f"{kind} of {v}: {len(points)} shares, {need} needed")
                    continue
                ok = _b_ok if kind == "b" else _s_ok(self._keys[v]["s_pk"])
                secret, bad, suspects = _reconstruct(points, need, ok)
                culprits.update(bad)
                if secret is None:
                    unattributed.append((f"{kind} of {v}", suspects))
                else:
                    secrets[(kind, v)] = secret
        if culprits or unattributed:
            parts = []
            if culprits:
                parts.append(f"shares off the polynomial from {sorted(culprits)}")
            if unattributed:
                parts.append(
                    "shares that do not rebuild a valid secret for "
                    + ", ".join(name for name, _ in unattributed[:5])
                )
            raise InconsistentShares(
                "stage unmask: " + "; ".join(parts),
                culprits=culprits,
                suspects=[s for _, names in unattributed for s in names],
            )
        if short:
            raise SecAggError(
                f"stage unmask: {len(self._unmask)} of {len(self._survivors)} survivors sent "
                f"shares; too few for " + "; ".join(short[:5])
            )
        exp = _Expander(self.dim)
        total = self._sum.copy()
        for v in self._survivors:
            b = secrets[("b", v)].to_bytes(SECRET_LEN, "big")
            exp.sub(total, _self_key(b, v, self.p))
        alive = set(self._survivors)
        for v in self._dropped:
            sk = X25519PrivateKey.from_private_bytes(secrets[("s", v)].to_bytes(SECRET_LEN, "big"))
            for u in self._graph[v]:
                if u not in alive:
                    continue
                key = _pair_key(
                    sk, X25519PublicKey.from_public_bytes(self._keys[u]["s_pk"]), v, u, self.p
                )
                # u added +PRG when u < v, -PRG otherwise: take back what u added
                if u < v:
                    exp.sub(total, key)
                else:
                    exp.add(total, key)
        total &= self.p.modulus_mask
        self._stage = "done"
        self.stats["seconds"]["result"] = time.perf_counter() - start
        return total


def _b_ok(secret: int) -> bool:
    return secret < 1 << (8 * SECRET_LEN)


def _s_ok(s_pk: bytes) -> Callable[[int], bool]:
    def ok(secret: int) -> bool:
        if not _b_ok(secret):
            return False
        sk = X25519PrivateKey.from_private_bytes(secret.to_bytes(SECRET_LEN, "big"))
        return sk.public_key().public_bytes_raw() == s_pk

    return ok


# --- the spec and the wire -------------------------------------------------------------


def params_from_spec(agg: dict[str, Any], n: int, tag: bytes, seed: bytes) -> Params:
    k = 0 if agg["neighbours"] == "all" else int(agg["neighbours"])
    max_weight = agg.get("max_weight", MAX_WEIGHT)
    return Params(
        bits=agg["bits"],
        frac_bits=frac_bits_for(agg["bits"], agg["clip"], max_weight, max(n, 2)),
        clip=agg["clip"],
        threshold=agg["threshold"],
        neighbours=k,
        graph_seed=seed,
        round_tag=tag,
        max_weight=max_weight,
    )


def params_to_wire(p: Params) -> dict[str, Any]:
    return {
        "bits": p.bits,
        "frac_bits": p.frac_bits,
        "clip": p.clip,
        "threshold": p.threshold,
        "neighbours": p.neighbours,
        "graph_seed": p.graph_seed,
        "round_tag": p.round_tag,
        "max_weight": p.max_weight,
    }


def assignment_from_wire(d: dict[str, Any], p: Params) -> tuple[int, float]:
    """This participant's weight and update-norm bound from round_start.secagg.

    The coordinator assigns both (it checks the weights' sum after unmasking and bounds the
    sum's norm), so a participant encodes with exactly this weight and clips its update to
    this norm; 0 means no norm bound.
    """
    weight, norm = d.get("weight"), d.get("max_update_norm", 0.0)
    if not _is_int(weight) or not 1 <= weight <= p.max_weight:
        raise ValidationError(
            f"round_start.secagg.weight must be an integer in [1, {p.max_weight}], "
            f"got {str(weight)[:40]!r}"
        )
    if isinstance(norm, bool) or not isinstance(norm, int | float) or not math.isfinite(norm):
        raise ValidationError("round_start.secagg.max_update_norm must be a finite number")
    if norm < 0:
        raise ValidationError("round_start.secagg.max_update_norm must be >= 0 (0 = no bound)")
    return int(weight), float(norm)


def params_from_wire(d: dict[str, Any]) -> Params:
    try:
        p = Params(
            bits=int(d["bits"]),
            frac_bits=int(d["frac_bits"]),
            clip=float(d["clip"]),
            threshold=float(d["threshold"]),
            neighbours=int(d["neighbours"]),
            graph_seed=bytes(d["graph_seed"]),
            round_tag=bytes(d["round_tag"]),
            max_weight=d["max_weight"],  # checked as given (an integer) by validate
        )
    except (KeyError, TypeError, ValueError):
        raise ValidationError("round_start.secagg is missing or has malformed fields") from None
    p.validate()
    return p
