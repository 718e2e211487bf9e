"""What every lossy codec's payload shares: its 5-byte header, the strict reader that
decodes take bytes through, the flat float32 vector they work on, and the refusal.

A payload is ``codec id (1 byte) | layout tag (4 bytes) | the codec's body``. The id makes a
payload of one codec fed to another a clear refusal rather than noise read as values; the
layout tag (the first 4 bytes of SHA-256 over the tensors' names and shapes, in order) makes
an update encoded for another model, or for the same tensors in another order, a refusal
rather than values silently placed in the wrong coordinates. Every number is little-endian.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping

import numpy as np

from fednode import weights
from fednode.codecs.base import BAD_UPDATE, Shapes
from protocol.errors import ValidationError

# One byte per codec: never reuse a number for another format.
CODEC_IDS = {"fp16": 1, "bf16": 2, "quantize": 3, "topk": 4, "topk_quantize": 5, "randk": 6}
HEADER_BYTES = 5
F32 = np.dtype("<f4")


def refuse(codec: str, message: str) -> ValidationError:
    """The error of every payload a codec refuses: the update is left out of the round."""
    return ValidationError(
        f"{codec}: {message}",
        code=BAD_UPDATE,
        hint="the update was left out; the sender's node encodes updates differently "
        "(another version or model) or the bytes were altered",
    )


def model_size(shapes: Shapes) -> int:
    return sum(math.prod(s) for s in shapes.values())


def layout_tag(shapes: Shapes) -> bytes:
    text = json.dumps([[k, [int(n) for n in s]] for k, s in shapes.items()], separators=(",", ":"))
    return hashlib.sha256(text.encode()).digest()[:4]


def header(codec: str, shapes: Shapes) -> bytes:
    return bytes([CODEC_IDS[codec]]) + layout_tag(shapes)


def flat32(codec: str, x: Mapping[str, np.ndarray]) -> np.ndarray:
    """The update as one float32 vector in ``x``'s order (the caller builds ``x`` in the
    model's order; the layout tag records it). Non-finite values are refused here, at the
    sender: every decoder would refuse them anyway."""
    if not x:
        return np.zeros(0, np.float32)
    vec = np.concatenate([np.asarray(v, dtype=np.float32).ravel() for v in x.values()])
    if not np.isfinite(vec).all():
        bad = next(k for k, v in x.items() if not np.isfinite(np.asarray(v)).all())
        raise refuse(codec, f"cannot encode tensor {bad!r}: it has NaN or inf values")
    return vec


def unflat32(vec: np.ndarray, shapes: Shapes) -> weights.Weights:
    """Float32 tensors of ``shapes`` over ``vec`` (views: no copy beyond ``vec``)."""
    out: weights.Weights = {}
    at = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = vec[at : at + n].reshape(shape)
        at += n
    return out


def keep_count(d: int, fraction: float) -> int:
    """k = max(1, ceil(fraction * d)) coordinates of d, at most d. The product is rounded to
    9 decimals first so that 0.1 * 30 (3.0000000000000004 in binary) keeps 3, not 4: both
    sides compute k from the round's fraction, and a surprise here would refuse updates."""
    if d <= 0:
        return 0
    return min(d, max(1, math.ceil(round(fraction * d, 9))))


class Reader:
    """Reads a peer's payload front to back; every read checks the bytes are there first,
    so a count in the payload is never trusted before it is compared with what is left."""

    def __init__(self, codec: str, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise refuse(codec, f"the update is {type(data).__name__}, not bytes")
        self.codec = codec
        self.view = memoryview(data).cast("B")
        self.at = 0

    @property
    def left(self) -> int:
        return len(self.view) - self.at

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left:
            raise refuse(self.codec, f"truncated: {what} needs {n:,} bytes, {self.left:,} left")
        out = self.view[self.at : self.at + n]
        self.at += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def floats(self, count: int, what: str) -> np.ndarray:
        """``count`` float32 values (a read-only view of the payload)."""
        return np.frombuffer(self.take(4 * count, what), dtype=F32)

    def header(self, shapes: Shapes) -> None:
        ids = {v: k for k, v in CODEC_IDS.items()}
        got = self.u8("the codec id")
        if got != CODEC_IDS[self.codec]:
            other = ids.get(got)
            raise refuse(
                self.codec,
                f"the payload is a {other} update" if other else f"unknown codec id {got}",
            )
        if bytes(self.take(4, "the layout tag")) != layout_tag(shapes):
            raise refuse(
                self.codec,
                "the update was encoded for another model layout (tensor names, shapes or "
                "order differ from the round's model)",
            )

    def end(self) -> None:
        if self.left:
            raise refuse(self.codec, f"{self.left:,} trailing bytes after the update")


def finite(codec: str, values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        at = int(np.flatnonzero(~np.isfinite(values))[0])
        raise refuse(codec, f"{what} {at} is {values[at]} (values must be finite)")
