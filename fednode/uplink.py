"""A participant's codec step: its trained model into the bytes of its update, with the
error feedback of a lossy codec kept in its own ledger.

A delta codec encodes ``w - g`` (the round's model g); with ``compression.error_feedback``
the participant first adds what earlier rounds left unsent (the residual), and keeps what
this round leaves unsent for the next (fednode.codecs.feedback). The residual lives in the
participant's ledger (``residuals``, one row per session), so it survives a restart; it is
written only once the update has left (``Encoded.commit``): a crash before that keeps the
previous residual, as if this round's update had never been made. The ledger is read and
written on the caller's thread (``residual``, ``commit``), the arithmetic may run in a
worker thread.

Secure rounds with randk select the round's shared coordinates of the same ``w - g +
residual`` (``secure_select``); the rest becomes the residual, exactly as in a plain round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fednode import weights
from fednode.codecs import Codec, CodecParams, Shapes
from fednode.codecs.feedback import ErrorFeedback
from fednode.ledger import Ledger
from protocol.errors import FednodeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Encoded:
    data: bytes  # the update's bytes
    raw: int  # bytes of the same update as float32 values (what identity sends, less header)
    commit: Callable[[], None]  # call once the update has left: saves the new residual


def _nothing() -> None:
    return None


class Uplink:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def residual(self, session: str, codec: str, shapes: Shapes) -> weights.Weights | None:
        """The session's saved residual, when it was left by the same codec for the same
        shapes (another codec's, or a damaged row, is dropped with a log line: error
        feedback then restarts from zero, which loses accuracy, never correctness)."""
        row = self.ledger.residual(session)
        if row is None:
            return None
        if row["codec"] != codec:
            log.info(
                "session %s: the residual of codec %s is not used by %s",
                session,
                row["codec"],
                codec,
            )
            return None
        try:
            saved = weights.from_bytes(row["data"], expect=shapes)
        except FednodeError as err:
            log.warning("session %s: the saved residual is unusable: %s", session, err.message)
            return None
        fb, why = ErrorFeedback.restored(saved, shapes)  # names, order, shapes, finite
        if why is not None:
            log.warning("session %s: %s", session, why)
        return fb.residual

    def _keeper(
        self, session: str, round_no: int, codec: str, residual: weights.Weights
    ) -> Callable[[], None]:
        blob = weights.to_bytes(residual)
        return lambda: self.ledger.save_residual(session, round_no, codec, blob)

    def encode(
        self,
        session: str,
        round_no: int,
        codec: Codec,
        params: CodecParams,
        compression: Mapping[str, Any],
        trained: weights.Weights,
        base: weights.Weights,
        residual: weights.Weights | None = None,
    ) -> Encoded:
        """The update's bytes; ``residual``: ``self.residual(...)``, read beforehand on the
        ledger's own thread (this may run in a worker thread; SQLite objects may not)."""
        shapes = weights.shapes(base)
        raw = 4 * weights.num_params(base)
        if not codec.on_delta:
            return Encoded(codec.encode(trained, params), raw, _nothing)
        delta = {k: np.asarray(trained[k], np.float32) - base[k] for k in shapes}
        if not (codec.lossy and compression.get("error_feedback", True)):
            return Encoded(codec.encode(delta, params), raw, _nothing)
        fb = ErrorFeedback(residual=residual)
        data, _sent = fb.step(delta, codec, params, shapes, np.random.default_rng())
        return Encoded(data, raw, self._keeper(session, round_no, codec.name, fb.residual))

    def secure_select(
        self,
        session: str,
        round_no: int,
        codec: str,
        compression: Mapping[str, Any],
        delta: np.ndarray,
        coords: np.ndarray,
        shapes: Shapes,
    ) -> tuple[np.ndarray, Callable[[], None]]:
        """Secure randk: the values of ``delta`` (flat, float64) plus the residual at the
        round's shared coordinates, and the commit that keeps the rest as the residual."""
        p = np.asarray(delta, dtype=np.float64).copy()
        if not compression.get("error_feedback", True):
            return p[coords], _nothing
        saved = self.residual(session, codec, shapes)
        if saved is not None:
            p += weights.flatten(saved, shapes)
        sent = p[coords].copy()
        p[coords] = 0.0
        return sent, self._keeper(session, round_no, codec, weights.unflatten(p, shapes))
