"""Error feedback: what a lossy codec did not send this round is added to the next round's
update, so that over rounds every part of every update gets through (top-k's small
coordinates accumulate until they are large enough to be picked; quantisation's rounding
errors cancel instead of being lost).

Pure: the participant holds one ErrorFeedback per session and persists ``residual``; this
module does no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fednode import weights
from fednode.codecs.base import Codec, CodecParams, Shapes


def _mismatch(residual: Mapping[str, np.ndarray], expect: Shapes) -> str | None:
    """Why ``residual`` cannot be added to an update of ``expect``, or None."""
    if list(residual) != list(expect):
        return (
            f"its tensors ({', '.join(residual) or 'none'}) are not the model's "
            f"({', '.join(expect) or 'none'})"
        )
    for name, shape in expect.items():
        r = residual[name]
        if not isinstance(r, np.ndarray) or tuple(r.shape) != tuple(shape):
            got = getattr(r, "shape", type(r).__name__)
            return f"tensor {name!r} has shape {got}, the model's is {tuple(shape)}"
        if not np.isfinite(r).all():
            return f"tensor {name!r} has NaN or inf values"
    return None


class ErrorFeedback:
    """The residual of one participant's updates under a lossy codec."""

    def __init__(self, residual: weights.Weights | None = None) -> None:
        self._residual = residual

    @classmethod
    def restored(
        cls, residual: weights.Weights | None, expect: Shapes
    ) -> tuple[ErrorFeedback, str | None]:
        """An ErrorFeedback from a persisted residual, which is kept only if it fits the
        model ``expect`` (names, order, shapes, finite); otherwise a fresh one and the reason
        it was dropped, for the caller to log."""
        if residual is None:
            return cls(), None
        why = _mismatch(residual, expect)
        if why is not None:
            return cls(), f"error feedback residual dropped: {why}"
        return cls({k: np.asarray(v, dtype=np.float32) for k, v in residual.items()}), None

    @property
    def residual(self) -> weights.Weights | None:
        return self._residual

    def step(
        self,
        delta: weights.Weights,
        codec: Codec,
        params: CodecParams,
        expect: Shapes,
        rng: np.random.Generator | None = None,
    ) -> tuple[bytes, weights.Weights]:
        """Encode ``delta`` plus the residual; keep what was not sent. Returns the payload
        and what the coordinator will decode from it (``sent``)."""
        if self._residual is not None and (why := _mismatch(self._residual, expect)):
            raise ValueError(f"the residual does not fit the update: {why}")
        p: weights.Weights = {}
        for name in expect:
            v = np.asarray(delta[name], dtype=np.float32)
            p[name] = v if self._residual is None else v + self._residual[name]
        data = codec.encode(p, params, rng)
        sent = codec.decode(data, expect, params)
        self._residual = {name: p[name] - sent[name] for name in expect}
        return data, sent
