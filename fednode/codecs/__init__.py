"""Update codecs: the step between a participant's local training and the wire.

A participant encodes its trained weights through the round's codec (``round_start.codec``,
the spec's ``aggregation.codec``) into the bytes of its ``update``; the coordinator, after its
checks on those bytes (the CID), decodes them back into weights of the model's shapes. A codec
is where compression or quantisation goes. ``identity`` is today's format: safetensors
through fednode.weights, byte for byte what an update carried before codecs existed.

Secure rounds do not use a codec: their input is the fixed-point vector of protocol.secagg.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from fednode import weights
from protocol import plugins
from protocol.plugins import Registry

Shapes = Mapping[str, tuple[int, ...]]


class Codec(Protocol):
    name: str

    def encode(self, w: weights.Weights) -> bytes:
        """The update's bytes for the wire."""
        ...

    def decode(self, data: bytes, expect: Shapes) -> weights.Weights:
        """Weights of exactly the shapes ``expect`` (float32, finite), or ValidationError.
        ``data`` comes from a peer: decoding must never run code or allocate more than the
        shapes need (fednode.weights.from_bytes checks the header first)."""
        ...


class Identity:
    name = plugins.IDENTITY_CODEC

    def encode(self, w: weights.Weights) -> bytes:
        return weights.to_bytes(w)

    def decode(self, data: bytes, expect: Shapes) -> weights.Weights:
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
