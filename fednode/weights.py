"""Model weights <-> bytes, through safetensors only.

Received bytes are never unpickled: safetensors is a JSON header plus raw little-endian
buffers, so parsing cannot run code. Models are content-addressed, so the same weights
must always give the same bytes; the tensor order of the dict travels in the header
metadata, because safetensors itself lays tensors out in its own (sorted) order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from protocol.errors import ValidationError

Weights = dict[str, np.ndarray]
ORDER_KEY = "fednode.order"


def to_bytes(w: Mapping[str, np.ndarray]) -> bytes:
    tensors: dict[str, np.ndarray] = {}
    for k, v in w.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray):
            raise ValidationError(f"weights must map names to numpy arrays; bad entry {k!r}")
        tensors[k] = np.ascontiguousarray(v)
    metadata = {ORDER_KEY: json.dumps(list(tensors), separators=(",", ":"))}
    return bytes(st_save(tensors, metadata=metadata))


def _header(b: bytes) -> dict:
    n = int.from_bytes(b[:8], "little")
    return json.loads(b[8 : 8 + n])


def from_bytes(b: bytes, *, expect: Mapping[str, tuple[int, ...]] | None = None) -> Weights:
    """Parse safetensors bytes; with `expect` (name -> shape) also check every tensor.

    With `expect`, the result is in `expect`'s order; otherwise in the order recorded by
    `to_bytes` (or the file's order for safetensors written elsewhere).
    """
    if not isinstance(b, bytes | bytearray | memoryview):
        raise ValidationError(f"model bytes are not safetensors: got {type(b).__name__}")
    b = bytes(b)
    try:
        loaded = st_load(b)
        meta = _header(b).get("__metadata__") or {}
    except Exception as e:  # safetensors raises its own error type, and numpy others
        raise ValidationError(f"model bytes are not safetensors: {e}") from None
    order = list(loaded)
    recorded = meta.get(ORDER_KEY) if isinstance(meta, dict) else None
    if isinstance(recorded, str):
        try:
            names = json.loads(recorded)
        except ValueError:
            names = None
        if isinstance(names, list) and sorted(map(str, names)) == sorted(loaded):
            order = [str(n) for n in names]
    if expect is not None:
        missing = [k for k in expect if k not in loaded]
        extra = [k for k in loaded if k not in expect]
        if missing:
            raise ValidationError(f"tensor {missing[0]!r} is missing from the model bytes")
        if extra:
            raise ValidationError(f"tensor {extra[0]!r} is not part of the model")
        order = list(expect)
        for k in order:
            v = loaded[k]
            if v.dtype != np.float32:
                raise ValidationError(f"tensor {k!r} has dtype {v.dtype}, expected float32")
            if tuple(v.shape) != tuple(expect[k]):
                raise ValidationError(
                    f"tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expect[k])}"
                )
            if not np.isfinite(v).all():
                raise ValidationError(f"tensor {k!r} has non-finite values (NaN or inf)")
    return {k: loaded[k] for k in order}


def shapes(w: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in w.items()}


def num_params(w: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.size for v in w.values()))


def nbytes(w: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.nbytes for v in w.values()))


def flatten(w: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """One float64 vector of every tensor, in ``shapes``' order (secure aggregation masks it)."""
    return np.concatenate([np.asarray(w[k], dtype=np.float64).ravel() for k in shapes])


def unflatten(vec: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> Weights:
    """The inverse of ``flatten``: float32 tensors in ``shapes``' order."""
    total = sum(int(np.prod(s)) for s in shapes.values())
    if vec.shape != (total,):
        raise ValidationError(f"a flat model of {vec.size} values, expected {total}")
    out: Weights = {}
    at = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = vec[at : at + n].reshape(shape).astype(np.float32)
        at += n
    return out
