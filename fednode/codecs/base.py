"""What every update codec shares: the Codec interface, its per-round settings and the code
of a refused payload (fednode.codecs re-exports each; the codec modules import them from
here, so that no codec module imports the package that imports it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fednode import weights

Shapes = Mapping[str, tuple[int, ...]]
BAD_UPDATE = "BAD_UPDATE"  # the ValidationError code of a payload a codec refuses


@dataclass(frozen=True)
class CodecParams:
    """A codec's settings for one round: the spec's ``[compression]`` section plus the
    round's shared seed."""

    fraction: float = 0.01  # topk, randk: share of the coordinates sent
    bits: int = 8  # quantize: 8, 4 or 2
    chunk: int = 0  # quantize: values per scale (0 = one scale per tensor)
    seed: bytes = b""  # the round's shared seed: randk's coordinates

    @classmethod
    def of_spec(cls, compression: Mapping[str, Any], seed: bytes = b"") -> CodecParams:
        return cls(
            fraction=float(compression.get("fraction", cls.fraction)),
            bits=int(compression.get("bits", cls.bits)),
            chunk=int(compression.get("chunk", cls.chunk)),
            seed=seed,
        )


class Codec(Protocol):
    name: str
    on_delta: bool  # encodes w - g (True) or the weights themselves (identity)
    lossy: bool  # decode(encode(x)) may differ from x: error feedback applies
    secure: bool  # can run under secure aggregation

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        """The update's bytes for the wire. ``rng``: stochastic rounding's draws (a fresh
        generator when None)."""
        ...

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        """Float32 tensors of exactly the shapes ``expect``, finite, or ValidationError.
        ``data`` comes from a peer: decoding must never run code or allocate more than the
        shapes need."""
        ...


class LossyDelta:
    """What the compressing codecs share: each encodes the update's difference from the
    round's model, lossily (error feedback applies), and, but for randk, cannot be summed
    under secure aggregation."""

    on_delta = True
    lossy = True
    secure = False
