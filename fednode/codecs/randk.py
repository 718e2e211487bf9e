"""``randk``: k = max(1, ceil(fraction * d)) coordinates drawn from the round's shared seed
(fednode.codecs.round_seed), the same for every participant of the round, the others 0.

Body: ``seed tag (4 bytes) | k float32 values`` at ``coordinates(d, fraction, seed)``,
ascending. The indices are never sent: both sides draw them. The seed tag (the first 4 bytes
of SHA-256 over the seed) lets decode refuse an update drawn for another round's coordinates
instead of placing its values at the wrong ones. Decode refuses a body other than 4 + 4k
bytes and any value that is not finite.

Because every participant sends the same coordinates, masked sparse vectors still sum
coordinate by coordinate: randk is the one compressing codec secure aggregation can use
(secure rounds call ``coordinates`` directly and mask the values at them).
"""

from __future__ import annotations

import hashlib

import numpy as np

from fednode import weights
from fednode.codecs.base import CodecParams, LossyDelta, Shapes
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


def coordinates(d: int, fraction: float, seed: bytes) -> np.ndarray:
    """The round's k coordinates of a model of d values, sorted, as int64.

    Every node must draw the same ones from the same seed, whatever its numpy. NumPy
    promises no stream stability for Generator methods (choice, permutation may change
    algorithm between versions: NEP 19), so this uses only what is fixed by definition: the
    seed bytes as one integer into SeedSequence, PCG64's raw 64-bit outputs (random_raw),
    one per coordinate, and the k coordinates of the smallest outputs, ties (a 1-in-2^64
    event) going to the lower index. That is a uniformly random k-subset, and costs one
    O(d) pass (about 10 ms for d = 10^6), encode and decode alike.
    """
    if not seed:
        raise ValueError("randk needs the round's shared seed (fednode.codecs.round_seed)")
    k = keep_count(d, fraction)
    if k >= d:
        return np.arange(d, dtype=np.int64)
    entropy = int.from_bytes(seed, "little")
    keys = np.random.PCG64(np.random.SeedSequence(entropy)).random_raw(d)
    # argpartition finds the k-th smallest key; which of several equal keys it keeps is
    # numpy's choice, so the set is rebuilt from the threshold: all below, then the lowest
    # indices of those equal to it
    kth = keys[np.argpartition(keys, k - 1)[k - 1]]
    below = np.flatnonzero(keys < kth)
    tied = np.flatnonzero(keys == kth)[: k - len(below)]
    return np.sort(np.concatenate([below, tied])).astype(np.int64)


def seed_tag(seed: bytes) -> bytes:
    return hashlib.sha256(b"fednode/randk/" + seed).digest()[:4]


class RandK(LossyDelta):
    name = "randk"
    secure = True  # the coordinates are the round's, not the participant's

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        vec = flat32(self.name, x)
        idx = coordinates(len(vec), p.fraction, p.seed)
        return (
            header(self.name, weights.shapes(x)) + seed_tag(p.seed) + vec[idx].astype(F32).tobytes()
        )

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        d = model_size(expect)
        r = Reader(self.name, data)
        r.header(expect)
        if bytes(r.take(4, "the seed tag")) != seed_tag(p.seed):
            raise refuse(self.name, "the update was drawn from another round's coordinates")
        k = keep_count(d, p.fraction)
        if r.left != 4 * k:
            raise refuse(
                self.name, f"{r.left:,} bytes of values, expected {4 * k:,} ({k:,} float32)"
            )
        values = r.floats(k, "the values")
        finite(self.name, values, "value")
        vec = np.zeros(d, np.float32)
        vec[coordinates(d, p.fraction, p.seed)] = values
        return unflat32(vec, expect)
