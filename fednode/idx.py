"""MNIST-format IDX files (idx:DIR), parsed with numpy and checked before anything is allocated.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), each dimension as a big-endian uint32, then the values, big-endian, row-major.
The header is checked against the file's length (a plain file: its size on disk; a .gz file:
the uncompressed size its gzip trailer records, then the bytes as they decompress) before the
values are read, so a damaged or hostile header is a DataError naming the file and what is
wrong, never an allocation of what it claims.

A folder holds `train-images-idx3-ubyte` and `train-labels-idx1-ubyte`, and may hold the
`t10k-` pair (the held-out split); each file plain or `.gz`.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fednode.schema import Raw, Schema
from protocol.errors import DataError, SchemaMismatch

# The IDX type codes and the numpy dtypes they are (big-endian).
DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
MAX_DIMS = 4
# The most value bytes one IDX file may hold here (MNIST's training images are 47 MB): a
# header claiming more is refused before anything is read.
MAX_IDX_BYTES = 1 << 30
CHUNK = 1 << 20  # a .gz file is decompressed this much at a time, never all at once
IMAGES, LABELS = "images-idx3-ubyte", "labels-idx1-ubyte"


def _exact(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated IDX file: {len(data)} of the {n} bytes of its {what}")
    return data


def read_idx(path: Path) -> np.ndarray:
    """The array an IDX file holds, in native byte order."""
    gz = path.name.endswith(".gz")
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as f:
            return _parse(f, path, gz)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip's BadGzipFile is an OSError
        raise DataError(f"{path}: not a readable {'gzip ' if gz else ''}file ({e})") from None


def _parse(f: BinaryIO, path: Path, gz: bool) -> np.ndarray:
    magic = _exact(f, 4, path, "magic number")
    if magic[0] or magic[1]:
        raise DataError(
            f"{path}: not an IDX file: magic number {magic.hex()} does not start with two "
            "zero bytes",
            hint="idx: wants MNIST-format files (train-images-idx3-ubyte, ...)",
        )
    dtype = DTYPES.get(magic[2])
    if dtype is None:
        raise DataError(
            f"{path}: unknown IDX type code 0x{magic[2]:02x} (known: "
            + ", ".join(f"0x{c:02x}" for c in DTYPES)
            + ")"
        )
    ndim = magic[3]
    if not 1 <= ndim <= MAX_DIMS:
        raise DataError(f"{path}: IDX header says {ndim} dimensions; 1 to {MAX_DIMS} are read")
    dims = struct.unpack(f">{ndim}I", _exact(f, 4 * ndim, path, f"{ndim} dimensions"))
    if 0 in dims:
        raise DataError(f"{path}: IDX dimensions {list(dims)} hold no values")
    nbytes = math.prod(dims) * dtype.itemsize  # Python integers: no overflow
    if nbytes > MAX_IDX_BYTES:
        raise DataError(
            f"{path}: IDX header claims dimensions {list(dims)} ({nbytes:,} bytes), more "
            f"than the {MAX_IDX_BYTES:,} bytes an IDX file may hold here"
        )
    expected = 4 + 4 * ndim + nbytes
    if not gz:
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"{path}: the file is {size:,} bytes but its header (dimensions {list(dims)}, "
                f"{dtype.itemsize}-byte values) needs {expected:,}: truncated or damaged"
            )
        data: bytes | bytearray = _exact(f, nbytes, path, "values")
    else:
        recorded = _gzip_size(path)
        if recorded is not None and recorded != expected % (1 << 32):
            raise DataError(
                f"{path}: decompresses to {recorded:,} bytes but its IDX header (dimensions "
                f"{list(dims)}) needs {expected:,}: truncated or damaged"
            )
        data = bytearray()
        while len(data) < nbytes:
            chunk = f.read(min(CHUNK, nbytes - len(data)))
            if not chunk:
                raise DataError(
                    f"{path}: truncated IDX file: {len(data):,} of the {nbytes:,} value bytes "
                    f"its header (dimensions {list(dims)}) promises"
                )
            data += chunk
    if f.read(1):
        raise DataError(f"{path}: bytes after the {nbytes:,} its IDX header accounts for")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("=")).reshape(dims)


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size (mod 2^32) a gzip file's trailer records, if it has one."""
    with path.open("rb") as raw:
        raw.seek(0, 2)
        if raw.tell() < 18:  # smaller than a gzip header and trailer: let gzip say so
            return None
        raw.seek(-4, 2)
        return int.from_bytes(raw.read(4), "little")


def _find(folder: Path, prefix: str, name: str) -> Path | None:
    for candidate in (folder / f"{prefix}-{name}", folder / f"{prefix}-{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, Path] | None:
    images, labels = _find(folder, prefix, IMAGES), _find(folder, prefix, LABELS)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        have, lack = (images or labels), (IMAGES if images is None else LABELS)
        raise DataError(f"{folder}: has {have.name} but no {prefix}-{lack}[.gz] to go with it")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(
            f"{images}: IDX images must have 3 dimensions [n, rows, cols], got {x.ndim}"
        )
    if y.ndim != 1:
        raise DataError(f"{labels}: IDX labels must have 1 dimension [n], got {y.ndim}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{images.name} holds {x.shape[0]} images but {labels.name} {y.shape[0]}")
    return x, y, images


def read_idx_folder(folder: Path, schema: Schema) -> Raw:
    """The training pair and, when present, the t10k pair as the held-out rows."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (idx: names a folder of IDX files)")
    train = _pair(folder, "train")
    if train is None:
        raise DataError(
            f"{folder}: no train-{IMAGES} and train-{LABELS} (plain or .gz)",
            hint="idx: wants a folder with the MNIST-format files",
        )
    parts = [train]
    test = _pair(folder, "t10k")
    if test is not None:
        parts.append(test)
    for x, _, path in parts:
        _check_shape(x.shape[1:], path, schema)
    pixels = np.concatenate([x for x, _, _ in parts])[:, None, :, :]  # one (grey) channel
    labels = np.concatenate([y for _, y, _ in parts])
    held = np.zeros(len(labels), dtype=bool)
    held[len(train[1]) :] = True
    return Raw(
        schema.normalise(pixels),
        labels,
        str(folder),
        test=held if test is not None else None,
    )


def _check_shape(hw: tuple[int, ...], path: Path, schema: Schema) -> None:
    if not schema.input_shape:
        return
    want = schema.input_shape
    if want[0] != 1 or tuple(want[1:]) != tuple(hw):
        raise SchemaMismatch(
            f"{path}: images of 1 channel, {hw[0]}x{hw[1]} (rows x cols); the schema wants "
            f"data.input_shape = {list(want)}",
            hint="IDX images are grey: input_shape [1, rows, cols]",
        )
