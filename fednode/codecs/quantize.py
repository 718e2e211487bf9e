"""``quantize``: every value in ``bits`` (8, 4 or 2) bits, with stochastic rounding.

Body: ``bits (1 byte) | n (u32) | n float32 minimums | n float32 steps | packed levels``.

The scheme is **min/max affine**: a segment of values (a tensor with ``chunk = 0``, else each
run of ``chunk`` values of the flat vector, the last one shorter) gets ``lo`` = its minimum
and ``step`` = (max - lo) / (2^bits - 1), and a value x becomes the level
``q = floor((x - lo) / step + u)``, u ~ U[0, 1) drawn from the encoder's rng, clipped to
[0, 2^bits - 1]; it decodes to ``lo + q * step``. E[q] = (x - lo) / step, so the decoded value
is x on average (stochastic rounding is unbiased: the round's mean of many participants'
updates loses no signal to rounding), and within one step of it always.

Why affine rather than symmetric (lo = -max|x|): it uses all 2^bits levels of the segment's
actual range. At 2 bits symmetric has 3 usable levels (-1, 0, 1) spaced max|x| apart, affine 4
spaced (max - min) / 3, a finer grid for the same bytes; and a tensor whose update is not
centred on 0 (a bias pushed one way) keeps its full resolution. It costs 4 more bytes a
segment (the minimum), nothing beside a chunk's values.

Levels are packed little-end first: 2 per byte at 4 bits, 4 at 2 bits; the unused high bits
of the last byte are 0. Decode refuses a bits tag other than the round's, a scale count
other than what d and chunk give, a minimum that is not finite, a step that is NaN, inf or
negative, a packed length other than ceil(n * bits / 8) bytes, set padding bits, and any
decoded value that is not finite.

``quantize_values`` and ``read_values`` are the same scheme over any vector and segments:
topk_quantize uses them for its kept values.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from fednode import weights
from fednode.codecs.base import CodecParams, LossyDelta, Shapes
from fednode.codecs.wire import F32, Reader, flat32, header, model_size, refuse, unflat32

BITS = (8, 4, 2)


def segment_lengths(sizes: list[int], n: int, chunk: int) -> np.ndarray:
    """The lengths of the segments sharing a scale: ``sizes`` (one per tensor) when chunk is
    0, else runs of ``chunk`` of the n values."""
    if chunk <= 0:
        return np.asarray(sizes, dtype=np.int64)
    full, rest = divmod(n, chunk)
    lengths = np.full(full + (1 if rest else 0), chunk, dtype=np.int64)
    if rest:
        lengths[-1] = rest
    return lengths


def _pack(q: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    if per == 1:
        return q.astype(np.uint8).tobytes()
    padded = np.zeros(-(-len(q) // per) * per, np.uint8)
    padded[: len(q)] = q
    groups = padded.reshape(-1, per)
    out = np.zeros(len(groups), np.uint8)
    for j in range(per):
        out |= groups[:, j] << np.uint8(bits * j)
    return out.tobytes()


def _unpack(codec: str, raw: np.ndarray, n: int, bits: int) -> np.ndarray:
    per = 8 // bits
    if per == 1:
        return raw
    mask = np.uint8((1 << bits) - 1)
    levels = np.stack([(raw >> np.uint8(bits * j)) & mask for j in range(per)], axis=1).ravel()
    if levels[n:].any():
        raise refuse(codec, "the packed levels set padding bits past the last value")
    return levels[:n]


def quantize_values(
    values: np.ndarray, lengths: np.ndarray, bits: int, rng: np.random.Generator
) -> bytes:
    """The body for ``values`` (float32) cut into segments of ``lengths``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    top = (1 << bits) - 1
    lo = np.zeros(len(lengths), np.float32)
    step = np.zeros(len(lengths), np.float32)
    full = lengths > 0
    if full.any():
        starts = (np.cumsum(lengths) - lengths)[full]
        lo[full] = np.minimum.reduceat(values, starts)
        hi = np.maximum.reduceat(values, starts)
        # the step is computed in float64 then stored as float32: encoder and decoder use
        # the same (stored) step, which is what keeps the rounding unbiased
        step[full] = ((hi.astype(np.float64) - lo[full]) / top).astype(np.float32)
    inv = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    scaled = (values - np.repeat(lo, lengths)) * np.repeat(inv, lengths)
    q = np.floor(scaled + rng.random(len(values), dtype=np.float32))
    q = np.clip(q, 0, top).astype(np.uint8)
    return (
        struct.pack("<BI", bits, len(lengths))
        + lo.astype(F32).tobytes()
        + step.astype(F32).tobytes()
        + _pack(q, bits)
    )


def read_values(r: Reader, lengths: np.ndarray, bits: int) -> np.ndarray:
    """The float32 values of a body at the reader's position, segmented as ``lengths``
    says (the caller derives them from d and chunk, never from the payload)."""
    got = r.u8("the bits tag")
    if got != bits:
        raise refuse(r.codec, f"the update is in {got} bits, the round uses {bits}")
    n_scales = r.u32("the scale count")
    if n_scales != len(lengths):
        raise refuse(
            r.codec,
            f"{n_scales:,} scales, expected {len(lengths):,} for {int(lengths.sum()):,} values",
        )
    lo = r.floats(n_scales, "the minimums")
    step = r.floats(n_scales, "the scales")
    if not np.isfinite(lo).all():
        at = int(np.argmax(~np.isfinite(lo)))
        raise refuse(r.codec, f"minimum {at} is {lo[at]} (must be finite)")
    bad = ~np.isfinite(step) | (step < 0)
    if bad.any():
        at = int(np.argmax(bad))
        what = "NaN" if np.isnan(step[at]) else f"{step[at]}"
        raise refuse(r.codec, f"scale {at} is {what} (scales must be finite and >= 0)")
    n = int(lengths.sum())
    packed = math.ceil(n * bits / 8)
    raw = np.frombuffer(r.take(packed, f"{n:,} levels of {bits} bits"), np.uint8)
    q = _unpack(r.codec, raw, n, bits)
    with np.errstate(over="ignore"):  # an overflow is the inf refused just below
        out = np.repeat(lo, lengths) + q.astype(np.float32) * np.repeat(step, lengths)
    if not np.isfinite(out).all():
        at = int(np.argmax(~np.isfinite(out)))
        raise refuse(r.codec, f"value {at} decodes to {out[at]} (a scale too large)")
    return out


class Quantize(LossyDelta):
    name = "quantize"

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        vec = flat32(self.name, x)
        lengths = segment_lengths([v.size for v in x.values()], len(vec), p.chunk)
        body = quantize_values(vec, lengths, p.bits, rng or np.random.default_rng())
        return header(self.name, weights.shapes(x)) + body

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        sizes = [math.prod(s) for s in expect.values()]
        vec = read_values(r, segment_lengths(sizes, d, p.chunk), p.bits)
        r.end()
        return unflat32(vec, expect)
