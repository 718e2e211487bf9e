"""Update codecs: the step between a participant's local training and the wire.

A participant encodes its update through the round's codec (the spec's
``compression.codec``, carried as ``round_start.codec``) into the bytes of its ``update``;
the coordinator, after its checks on those bytes (the CID), decodes them back. ``identity``
is the uncompressed format: the trained weights as safetensors (fednode.weights), byte for
byte what an update carried before codecs existed.

Every other codec is lossy and encodes the update's *difference* from the round's model
(``on_delta``): a participant sends ``C(w - g)``, the coordinator rebuilds ``g + D(C(w - g))``
and every later step (bounds, robustness, strategies) sees weights as before. The error
feedback of fednode.codecs.feedback keeps, per participant, what a lossy codec did not send
and adds it to the next round's difference.

Each codec is a small module of this package; ``fednode.codecs.sparse`` holds the index
encoding the sparse ones share. A codec works on one flat float32 vector of the model's
values in the order of ``expect`` (fednode.weights.flatten's order), so that top-k and the
round's random coordinates are chosen over the whole model.

Decoding reads bytes a peer chose: it checks every length, index and scale before it
allocates or uses them, allocates nothing beyond the model's size, and raises
ValidationError (code BAD_UPDATE) naming what is wrong; the update is then left out.

Secure rounds use the codec only if it ``secure``-ly can (``randk``: every participant keeps
the same coordinates, so the masked sparse vectors still sum); their input is then the
fixed-point vector of protocol.secagg over those coordinates.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fednode import weights

# The interface lives in base.py so that the codec modules can import it without a cycle.
from fednode.codecs.base import BAD_UPDATE as BAD_UPDATE
from fednode.codecs.base import Codec, CodecParams, Shapes
from protocol import plugins
from protocol.plugins import Registry


def round_seed(session_id: str, round_no: int, model_cid: str) -> bytes:
    """The seed every node of a round derives alike (randk's coordinates): bound to the
    session, the round and its model, so that no two rounds share coordinates."""
    return hashlib.sha256(f"fednode/codec/{session_id}/{round_no}/{model_cid}".encode()).digest()


class Identity:
    name = plugins.IDENTITY_CODEC
    on_delta = False
    lossy = False
    secure = True  # secure rounds send their own fixed-point vector of every value

    def encode(
        self, x: weights.Weights, p: CodecParams, rng: np.random.Generator | None = None
    ) -> bytes:
        return weights.to_bytes(x)

    def decode(self, data: bytes, expect: Shapes, p: CodecParams) -> weights.Weights:
        return weights.from_bytes(data, expect=expect)


CODECS: Registry[Codec] = Registry("update codec", plugins.CODECS.hint)


def register(codec: Codec) -> Codec:
    """Make ``codec`` available under its name, which specs must be able to carry
    (protocol.plugins.CODECS)."""
    if codec.name not in plugins.CODECS:
        raise ValueError(f"codec {codec.name!r} is not in protocol.plugins.CODECS")
    return CODECS.register(codec.name, codec)


register(Identity())


def get_codec(name: str) -> Codec:
    return CODECS.get(name)


# The codecs register on import of this package, so that get_codec finds every name a spec
# may carry wherever fednode.codecs is imported. They import the interface from base.py,
# never this package, so there is no import cycle (tests/test_imports.py forbids one).
from fednode.codecs import halfprec, quantize, randk, topk  # noqa: E402

register(halfprec.FP16())
register(halfprec.BF16())
register(quantize.Quantize())
register(topk.TopK())
register(topk.TopKQuantize())
register(randk.RandK())
