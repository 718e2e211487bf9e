"""Model weights <-> bytes, through safetensors only.

Received bytes are never unpickled: safetensors is a JSON header plus raw little-endian
buffers, so parsing cannot run code. Models are content-addressed, so the same weights
must always give the same bytes; the tensor order of the dict travels in the header
metadata, because safetensors itself lays tensors out in its own (sorted) order.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


# The header is read before safetensors allocates anything: its length is bounded, and
# every tensor's declared size must agree with its byte range inside the buffer, so a
# 100-byte model claiming a 65536 x 65536 tensor is refused without allocating 17 GB.
MAX_HEADER_BYTES = 1 << 20  # ours are ~100 bytes per tensor; 1 MiB is thousands of tensors
MAX_DIMS = 8  # our tensors have 1 or 2; a bound keeps the size arithmetic cheap
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_NOT_ST = "model bytes are not safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the safetensors header declares it (offsets relative to the data)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in the header's order
    metadata: dict[str, str]
    data_start: int  # 8 + the header length


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise ValidationError(f"{_NOT_ST}: the header names {k!r} twice")
        seen[k] = v
    return seen


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_header(b: bytes | bytearray | memoryview) -> Header:
    """Parse and check a safetensors header without touching the tensor data.

    Checked: the 8-byte little-endian length (at most MAX_HEADER_BYTES and inside the
    buffer), a JSON object of tensors, each with a known dtype, a shape of at most MAX_DIMS
    non-negative integers and data_offsets [begin, end] such that end - begin is exactly the
    shape's size in that dtype, inside the buffer and overlapping no other tensor. Any
    failure is a ValidationError that names the tensor.
    """
    if not isinstance(b, bytes | bytearray | memoryview):
        raise ValidationError(f"{_NOT_ST}: got {type(b).__name__}")
    view = memoryview(b)
    if len(view) < 8:
        raise ValidationError(f"{_NOT_ST}: {len(view)} bytes, shorter than the 8-byte length")
    n = int.from_bytes(view[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > len(view):
        raise ValidationError(
            f"{_NOT_ST}: the header claims {n:,} bytes; the buffer has {len(view) - 8:,} after "
            f"the length and a header may have at most {MAX_HEADER_BYTES:,}"
        )
    try:
        raw = json.loads(bytes(view[8 : 8 + n]), object_pairs_hook=_no_duplicates)
    except ValidationError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValidationError(f"{_NOT_ST}: the header is not JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValidationError(f"{_NOT_ST}: the header is not a JSON object")
    data_len = len(view) - 8 - n
    meta = raw.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValidationError(f"{_NOT_ST}: __metadata__ must map text to text")
    tensors: dict[str, TensorInfo] = {}
    for name, info in raw.items():
        tensors[name] = _tensor_info(name, info, data_len)
    spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
    for (_b0, e0, k0), (b1, _e1, k1) in itertools.pairwise(spans):
        if b1 < e0:
            raise ValidationError(f"{_NOT_ST}: tensors {k0!r} and {k1!r} overlap in the buffer")
    return Header(tensors, dict(meta), 8 + n)


def _tensor_info(name: str, info: Any, data_len: int) -> TensorInfo:
    where = f"{_NOT_ST}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValidationError(f"{where} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise ValidationError(f"{where} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise ValidationError(
            f"{where} has shape {shape!r}: expected at most {MAX_DIMS} integers >= 0"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise ValidationError(f"{where} has data_offsets {offsets!r}: expected [begin, end]")
    begin, end = offsets
    size = math.prod(shape) * DTYPE_SIZES[dtype]
    if end < begin or end - begin != size:
        raise ValidationError(
            f"{where} declares shape {shape} of {dtype} ({size:,} bytes) but data_offsets "
            f"[{begin}, {end}] hold {max(0, end - begin):,}"
        )
    if end > data_len:
        raise ValidationError(
            f"{where} has data_offsets [{begin}, {end}] beyond the {data_len:,} bytes of data"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def header_shapes(b: bytes | bytearray | memoryview) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the (checked) header only: nothing is allocated for
    the tensors, so a caller can compare a model's size with its limits first."""
    return {k: t.shape for k, t in read_header(b).tensors.items()}


def _check_expected(header: Header, expect: Mapping[str, tuple[int, ...]]) -> None:
    declared = header.tensors
    missing = [k for k in expect if k not in declared]
    extra = [k for k in declared if k not in expect]
    if missing:
        raise ValidationError(f"tensor {missing[0]!r} is missing from the model bytes")
    if extra:
        raise ValidationError(f"tensor {extra[0]!r} is not part of the model")
    for k, want in expect.items():
        t = declared[k]
        if t.dtype != "F32":
            raise ValidationError(f"tensor {k!r} has dtype {t.dtype}, expected F32 (float32)")
        if t.shape != tuple(want):
            raise ValidationError(f"tensor {k!r} has shape {t.shape}, expected {tuple(want)}")


def from_bytes(b: bytes, *, expect: Mapping[str, tuple[int, ...]] | None = None) -> Weights:
    """Parse safetensors bytes; with `expect` (name -> shape) also check every tensor.

    The header is checked first (read_header; with `expect` also names, dtype F32 and
    shapes), so nothing is allocated for a model that lies about its size or is not the one
    expected. With `expect`, the result is in `expect`'s order; otherwise in the order
    recorded by `to_bytes` (or the file's order for safetensors written elsewhere).
    """
    header = read_header(b)
    if expect is not None:
        _check_expected(header, expect)
    try:
        loaded = st_load(bytes(b))
    except Exception as e:  # safetensors raises its own error type, and numpy others
        raise ValidationError(f"{_NOT_ST}: {e}") from None
    meta = header.metadata
    order = list(loaded)
    recorded = meta.get(ORDER_KEY)
    if isinstance(recorded, str):
        try:
            names = json.loads(recorded)
        except ValueError:
            names = None
        if isinstance(names, list) and sorted(map(str, names)) == sorted(loaded):
            order = [str(n) for n in names]
    if expect is not None:
        order = list(expect)
        for k in order:
            v = loaded[k]
            if v.dtype != np.float32 or tuple(v.shape) != tuple(expect[k]):  # header said so
                raise ValidationError(f"tensor {k!r} does not match its header")
            if not np.isfinite(v).all():
                raise ValidationError(f"tensor {k!r} has non-finite values (NaN or inf)")
    return {k: loaded[k] for k in order}


def shapes(w: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in w.items()}


def num_params(w: Mapping[str, np.ndarray]) -> int:
    return int(sum(v.size for v in w.values()))


def max_file_bytes(expect: Mapping[str, tuple[int, ...]]) -> int:
    """The most bytes a model with these shapes can take as a file `from_bytes` accepts:
    its float32 tensors and the largest header read_header allows. A download is bounded
    by this before any of it is kept (protocol.blockstream)."""
    params = sum(math.prod(shape) for shape in expect.values())
    return 8 + MAX_HEADER_BYTES + params * DTYPE_SIZES["F32"]


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
