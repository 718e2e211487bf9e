"""The index encoding of the sparse codecs (topk, topk_quantize): k strictly increasing
indices in [0, d), in whichever of two forms is smaller.

* ``VARINT`` (tag 0): ``u32 byte length | k LEB128 varints`` of the deltas: the first index
  itself, then each index minus the one before (so every delta after the first is >= 1).
  LEB128: 7 bits per byte, low group first, the high bit set on every byte but the last.
* ``BITMAP`` (tag 1): ``ceil(d / 8)`` bytes, bit i (least significant bit first) set when
  index i is sent.

Sparse updates (k much below d/8) pick varints at 1 to 3 bytes an index; denser ones the
bitmap's d/8 bytes. The decoder is strict, because a payload that decodes two ways would
let two peers disagree about an update: an index out of range, a delta of 0 after the first
(a duplicate or a step back), a varint longer than the value needs (a redundant 0x80 byte) or
longer than any index of d, a count other than k, a bitmap of the wrong length or with bits
at or past d set, are all refused. Both directions are vectorised numpy: a model's indices
are encoded and decoded on every update.
"""

from __future__ import annotations

import numpy as np

from fednode.codecs.wire import Reader, refuse

VARINT = 0
BITMAP = 1
MAX_D = 1 << 40  # the cumulative sum of k deltas each below d stays far inside int64


def _max_varint_bytes(d: int) -> int:
    """The most bytes a varint of any index below d needs."""
    return max(1, -(-max(d - 1, 0).bit_length() // 7))


def varint_bytes(values: np.ndarray) -> np.ndarray:
    """How many LEB128 bytes each (non-negative) value takes."""
    v = values.astype(np.uint64, copy=False)
    n = np.ones(v.shape, np.int64)
    top = int(v.max(initial=0))
    for j in range(1, 10):
        if top < 1 << (7 * j):  # no value needs this many bytes: skip the passes
            break
        n += v >= np.uint64(1 << (7 * j))
    return n


def encode_varints(values: np.ndarray) -> bytes:
    """LEB128 of each value, concatenated (a loop over the <= 10 byte positions, not over the
    values)."""
    v = values.astype(np.uint64, copy=False)
    n = varint_bytes(v)
    out = np.empty(int(n.sum()), np.uint8)
    starts = np.cumsum(n) - n
    for j in range(int(n.max(initial=0))):
        has = np.flatnonzero(n > j) if j else slice(None)
        group = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (n[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


def decode_varints(codec: str, raw: np.ndarray, count: int, max_bytes: int) -> np.ndarray:
    """``count`` varints from ``raw`` (uint8), exactly filling it, each at most ``max_bytes``
    long and written in the fewest bytes; as int64."""
    ends = np.flatnonzero((raw & 0x80) == 0)
    unterminated = bool(len(raw)) and bool(raw[-1] & 0x80)  # the last varint runs off the end
    if len(ends) != count or unterminated:
        found = len(ends) + unterminated
        raise refuse(codec, f"the index block holds {found:,} varints, expected {count:,}")
    if count == 0:
        return np.zeros(0, np.int64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    redundant = (raw[ends] == 0) & (lengths > 1)
    if redundant.any():
        at = int(np.argmax(redundant))
        raise refuse(codec, f"varint {at} is longer than its value needs (a final 0x00 byte)")
    if int(lengths.max()) > max_bytes:
        at = int(np.argmax(lengths > max_bytes))
        raise refuse(
            codec,
            f"varint {at} is {int(lengths[at])} bytes long: an index of this model needs at "
            f"most {max_bytes}",
        )
    # a varint's last byte holds its most significant group: start there and shift in the
    # groups before it, one byte position at a time for the varints that long
    values = (raw[ends] & 0x7F).astype(np.int64)
    for j in range(1, int(lengths.max())):
        has = np.flatnonzero(lengths > j)
        values[has] = (values[has] << 7) | (raw[ends[has] - j] & 0x7F)
    return values


def encode(indices: np.ndarray, d: int) -> bytes:
    """The smaller form of ``indices`` (strictly increasing, in [0, d))."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.ndim != 1 or (len(idx) and (idx[0] < 0 or idx[-1] >= d)):
        raise ValueError(f"indices must be a vector within [0, {d})")
    deltas = np.diff(idx, prepend=np.int64(0))
    if len(idx) > 1 and (deltas[1:] < 1).any():
        raise ValueError("indices must be strictly increasing")
    varint_len = 1 + 4 + int(varint_bytes(deltas).sum())
    bitmap_len = 1 + -(-d // 8)
    if varint_len <= bitmap_len:
        body = encode_varints(deltas)
        return bytes([VARINT]) + len(body).to_bytes(4, "little") + body
    mask = np.zeros(d, np.bool_)
    mask[idx] = True
    return bytes([BITMAP]) + np.packbits(mask, bitorder="little").tobytes()


def read(r: Reader, d: int, k: int) -> np.ndarray:
    """The k indices at the reader's position (checked as the module says), as int64."""
    if not 0 <= k <= d or d > MAX_D:
        raise refuse(r.codec, f"{k:,} indices for a model of {d:,} values")
    tag = r.u8("the index form")
    if tag == VARINT:
        n = r.u32("the index block's length")
        longest = _max_varint_bytes(d)
        if n > k * longest:  # bounds the decoder's work by d, whatever the payload's size
            raise refuse(
                r.codec, f"an index block of {n:,} bytes for {k:,} indices of at most {longest}"
            )
        raw = np.frombuffer(r.take(n, "the index block"), np.uint8)
        deltas = decode_varints(r.codec, raw, k, longest)
        if k and (deltas >= d).any():  # also bounds the cumulative sum below k * d
            at = int(np.argmax(deltas >= d))
            raise refuse(r.codec, f"index delta {at} ({int(deltas[at]):,}) is not below {d:,}")
        if k > 1 and (deltas[1:] == 0).any():
            at = int(np.argmax(deltas[1:] == 0)) + 1
            raise refuse(
                r.codec, f"index {at} repeats the one before (indices must strictly increase)"
            )
        idx = np.cumsum(deltas)
        if k and idx[-1] >= d:
            at = int(np.argmax(idx >= d))
            raise refuse(
                r.codec, f"index {int(idx[at]):,} out of range for a model of {d:,} values"
            )
        return idx
    if tag == BITMAP:
        raw = np.frombuffer(r.take(-(-d // 8), "the index bitmap"), np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[d:].any():
            raise refuse(r.codec, f"the index bitmap sets bits at or past the model's {d:,} values")
        idx = np.flatnonzero(bits[:d]).astype(np.int64)
        if len(idx) != k:
            raise refuse(r.codec, f"the index bitmap sets {len(idx):,} indices, expected {k:,}")
        return idx
    raise refuse(r.codec, f"unknown index form {tag} (0: varints, 1: bitmap)")


def decode(codec: str, data: bytes, d: int, k: int) -> np.ndarray:
    """``data`` holding exactly one index block of k indices of d (no trailing bytes)."""
    r = Reader(codec, data)
    idx = read(r, d, k)
    r.end()
    return idx
