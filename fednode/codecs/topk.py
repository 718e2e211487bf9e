"""``topk`` and ``topk_quantize``: only the k = max(1, ceil(fraction * d)) coordinates of
largest magnitude over the whole model (global top-k, not k per tensor: a tensor whose
update is large gets more of the budget), the others decoded as 0.

topk body: ``k (u32) | the index block (fednode.codecs.sparse) | k float32 values`` in
index order. topk_quantize body: ``k (u32) | the index block | the kept values quantised``
(fednode.codecs.quantize's body, its segments the kept values of each tensor with
``chunk = 0``, else runs of ``chunk`` kept values).

The header carries k although the round's fraction implies it: decode compares the two and
refuses a k above d or other than the fraction's, so a payload can neither ask for more
than the round allows nor be misread with another round's setting. The indices are checked
by the sparse decoder, the values must be finite (topk) or pass quantize's checks.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from fednode import weights
from fednode.codecs import sparse
from fednode.codecs.base import CodecParams, LossyDelta, Shapes
from fednode.codecs.quantize import quantize_values, read_values, segment_lengths
from fednode.codecs.wire import (
    F32,
    Reader,
    finite,
    flat32,
    header,
    keep_count,
    model_size,
    refuse,
    unflat32,
)


def top_indices(vec: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k values of largest magnitude, ascending (int64). Ties at the
    k-th magnitude are broken by np.argpartition: any k of them is a valid top-k."""
    if k >= len(vec):
        return np.arange(len(vec), dtype=np.int64)
    part = np.argpartition(np.abs(vec), len(vec) - k)[len(vec) - k :]
    return np.sort(part).astype(np.int64)


def _read_k(r: Reader, d: int, fraction: float) -> int:
    k = r.u32("the count k")
    if k > d:
        raise refuse(r.codec, f"k = {k:,} is larger than the model's {d:,} values")
    want = keep_count(d, fraction)
    if k != want:
        raise refuse(
            r.codec, f"k = {k:,}, but the round's fraction {fraction} keeps {want:,} of {d:,}"
        )
    return k


def _kept_lengths(idx: np.ndarray, sizes: list[int], chunk: int) -> np.ndarray:
    """The quantisation segments of the kept values: per tensor (chunk 0) or per chunk."""
    if chunk > 0:
        return segment_lengths([], len(idx), chunk)
    bounds = np.cumsum([0, *sizes])
    return np.diff(np.searchsorted(idx, bounds)).astype(np.int64)


class TopK(LossyDelta):
    name = "topk"

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        vec = flat32(self.name, x)
        idx = top_indices(vec, keep_count(len(vec), p.fraction))
        return (
            header(self.name, weights.shapes(x))
            + struct.pack("<I", len(idx))
            + sparse.encode(idx, len(vec))
            + vec[idx].astype(F32).tobytes()
        )

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        k = _read_k(r, d, p.fraction)
        idx = sparse.read(r, d, k)
        values = r.floats(k, "the values")
        r.end()
        finite(self.name, values, "value")
        vec = np.zeros(d, np.float32)
        vec[idx] = values
        return unflat32(vec, expect)


class TopKQuantize(LossyDelta):
    name = "topk_quantize"

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        vec = flat32(self.name, x)
        idx = top_indices(vec, keep_count(len(vec), p.fraction))
        lengths = _kept_lengths(idx, [v.size for v in x.values()], p.chunk)
        return (
            header(self.name, weights.shapes(x))
            + struct.pack("<I", len(idx))
            + sparse.encode(idx, len(vec))
            + quantize_values(vec[idx], lengths, p.bits, rng or np.random.default_rng())
        )

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        k = _read_k(r, d, p.fraction)
        idx = sparse.read(r, d, k)
        sizes = [math.prod(s) for s in expect.values()]
        values = read_values(r, _kept_lengths(idx, sizes, p.chunk), p.bits)
        r.end()
        vec = np.zeros(d, np.float32)
        vec[idx] = values
        return unflat32(vec, expect)
