"""``fp16`` and ``bf16``: every value of the update in 16 bits, half of identity's bytes.

Body: d little-endian 16-bit values in the model's order (2 bytes a value).

* fp16 (IEEE binary16): 10 fraction bits (relative error <= 2^-11) but a range of only
  +-65504. A value beyond it would become inf, which every decoder refuses, so the encoder
  clips to +-65504 instead: an update that large is already far outside any norm bound, and a
  clipped value keeps the update usable (error feedback carries the rest to the next round).
  Values below 2^-24 flush to zero.
* bf16 (bfloat16): float32's top 16 bits: float32's range, 7 fraction bits (relative error
  <= 2^-8). Encoded by bit manipulation of the float32 values, rounding to nearest, ties to
  even: add 0x7FFF plus the lowest kept bit, then keep the top half. Values that would round
  past the largest bf16 are clipped to it first, for the same reason as fp16.

Decode refuses a body other than 2d bytes and any inf or NaN.
"""

from __future__ import annotations

import numpy as np

from fednode import weights
from fednode.codecs.base import CodecParams, LossyDelta, Shapes
from fednode.codecs.wire import Reader, finite, flat32, header, model_size, refuse, unflat32

F16 = np.dtype("<f2")
U16 = np.dtype("<u2")
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
BF16_MAX = float(np.array([0x7F7F0000], np.uint32).view(np.float32)[0])  # 3.3895e38


class FP16(LossyDelta):
    name = "fp16"

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        vec = np.clip(flat32(self.name, x), -FP16_MAX, FP16_MAX)
        return header(self.name, weights.shapes(x)) + vec.astype(F16).tobytes()

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        if r.left != 2 * d:
            raise refuse(self.name, f"{r.left:,} bytes of values, expected {2 * d:,} (2 per value)")
        half = np.frombuffer(r.take(2 * d, "the values"), F16)
        finite(self.name, half, "value")
        return unflat32(half.astype(np.float32), expect)


def to_bf16(vec: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bfloat16, rounding to nearest even."""
    bits = np.clip(vec, -BF16_MAX, BF16_MAX).astype(np.float32).view(np.uint32)
    lowest_kept = (bits >> np.uint32(16)) & np.uint32(1)
    return ((bits + np.uint32(0x7FFF) + lowest_kept) >> np.uint32(16)).astype(U16)


def from_bf16(half: np.ndarray) -> np.ndarray:
    """The uint16 bit patterns of bfloat16 -> float32 (exact)."""
    return (half.astype(np.uint32) << np.uint32(16)).view(np.float32)


class BF16(LossyDelta):
    name = "bf16"

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        return header(self.name, weights.shapes(x)) + to_bf16(flat32(self.name, x)).tobytes()

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        if r.left != 2 * d:
            raise refuse(self.name, f"{r.left:,} bytes of values, expected {2 * d:,} (2 per value)")
        half = np.frombuffer(r.take(2 * d, "the values"), U16)
        if ((half & 0x7F80) == 0x7F80).any():  # all exponent bits set: inf or NaN
            at = int(np.argmax((half & 0x7F80) == 0x7F80))
            raise refuse(self.name, f"value {at} is inf or NaN (values must be finite)")
        return unflat32(from_bf16(half), expect)
