"""A plain round's accepted updates, each held once, read back in column blocks.

Outlier detection judges every update against the round's coordinate-wise median, and the
share cap weighs each update by all the others' claims: both need every update of the round
before the aggregate can be formed, so a plain round cannot fold its updates into one running
sum as they arrive (a secure round does: protocol.secagg adds each masked input to its sum).
What the round can avoid is holding them as many Python objects and whole-model copies:

- each accepted update is flattened once into a float32 row (the dtype on the wire) and its
  tensors are dropped; the norm and finiteness of its delta (update - round's model) are taken
  on arrival;
- everything after reads *column blocks*: for columns [a, b) of the model, the rows of the
  updates it asks for, as float64 deltas. Detection (fednode.robustness), the mean family's
  weighted mean and central DP's clipped sum need only a block at a time plus O(d) results;
  so besides the rows themselves the round holds O(d + rows x block) — the block sized so that
  one float64 block is at most BLOCK_BYTES;
- the rows live in memory up to ``ram_bytes`` (``fednode run --round-ram-mib``), and beyond
  it in a file in the node's home that is unlinked as soon as it is opened (0600, nothing left
  behind by a crash; the space is the kernel's to free when the round closes it). Read with
  pread, its pages stay in the page cache rather than in the coordinator's RSS.

The layout is block-major: block j of row i is at ((j * capacity) + i) * width values, so the
rows 0..n-1 of a block are one contiguous read. ``capacity`` is the round's selected count:
no round accepts more updates than it asked for.

The robust strategies (median, trimmed mean, Krum, Bulyan: Strategy.by_columns) work
coordinate by coordinate or sum over coordinates; they get the model cut into the same column
blocks (``by_columns``), each update's block read when their arithmetic stacks it. A strategy
of an operator's own gets every kept update as a whole model (``weights_of``).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fednode.files import private_dir
from fednode.robustness import DeltaRows
from fednode.uploads import ROUND_RAM_MIB
from fednode.weights import Weights

# A float64 block of the rows is at most this (or MIN_WIDTH columns, if that is more).
BLOCK_BYTES = 4 * 2**20
MIN_WIDTH = 1024


class RoundUpdates:
    """The accepted updates of one plain round (see the module's docstring)."""

    def __init__(
        self,
        base: Weights,
        capacity: int,
        *,
        ram_bytes: int = ROUND_RAM_MIB * 2**20,
        spill_dir: Path | None = None,
    ) -> None:
        self.order = list(base)
        self.shapes = [tuple(np.shape(base[k])) for k in self.order]
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        self.base = _flat(base, self.order)
        self.d = int(self.base.size)
        self.capacity = max(1, int(capacity))
        self.width = max(1, min(self.d, max(MIN_WIDTH, BLOCK_BYTES // (8 * self.capacity))))
        self.blocks_n = max(1, math.ceil(self.d / self.width))
        self.peers: list[str] = []
        self._row: dict[str, int] = {}
        self._norms: list[float] = []  # inf: the delta has a non-finite value
        self._fd: int | None = None
        # on disk: the block ``read`` read last, every row of it (block number, rows)
        self._cached: tuple[int, np.ndarray] = (-1, np.empty((0, 0), np.float32))
        self._ram: np.ndarray | None = None
        if spill_dir is None or self.blocks_n * self.capacity * self.width * 4 <= ram_bytes:
            # np.zeros takes pages from the OS as rows are written: an unfilled round costs
            # what it received, not its capacity
            self._ram = np.zeros((self.blocks_n, self.capacity, self.width), np.float32)
        else:
            path = private_dir(spill_dir) / f"round-{uuid.uuid4().hex}.f32"
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.unlink(path)  # the open descriptor keeps it; nothing outlives the process

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    @property
    def held_bytes(self) -> int:
        """What the updates held so far take (in memory or in the file)."""
        return len(self.peers) * self.blocks_n * self.width * 4

    def add(self, peer: str, w: Weights) -> None:
        """Hold ``peer``'s update (its tensors in the round model's names and shapes, which
        the codec's decode checked). OSError when the spill file cannot be written."""
        if peer in self._row:
            raise ValueError(f"{peer} already has an update in this round")
        i = len(self.peers)
        if i >= self.capacity:
            raise ValueError(f"the round holds at most {self.capacity} updates")
        row = _flat(w, self.order)
        delta = row - self.base  # float32, as every figure of it is taken
        norm = math.inf
        if np.isfinite(delta).all():
            d64 = delta.astype(np.float64)
            norm = math.sqrt(float(np.dot(d64, d64)))
        if self._ram is not None:  # one strided copy: the row's blocks side by side
            padded = np.zeros(self.blocks_n * self.width, np.float32)
            padded[: self.d] = row
            self._ram[:, i, :] = padded.reshape(self.blocks_n, self.width)
        else:
            assert self._fd is not None
            for j in range(self.blocks_n):
                seg = row[j * self.width : (j + 1) * self.width]
                _pwrite_all(self._fd, seg, self._at(j, i))
        self.peers.append(peer)
        self._row[peer] = i
        self._norms.append(norm)

    def norm(self, peer: str) -> float:
        """The L2 norm of ``peer``'s delta (inf when it has non-finite values)."""
        return self._norms[self._row[peer]]

    def weights_of(self, peer: str) -> Weights:
        """``peer``'s update as named tensors (a new copy: O(d))."""
        i = self._row[peer]
        if self._ram is not None:
            return self.split(self._ram[:, i, :].reshape(-1)[: self.d].copy())
        row = np.empty(self.d, np.float32)
        for j in range(self.blocks_n):
            a, b = j * self.width, min(self.d, (j + 1) * self.width)
            assert self._fd is not None
            row[a:b] = _pread(self._fd, b - a, self._at(j, i))
        return self.split(row)

    def blocks(self, peers: Sequence[str]) -> Iterator[tuple[int, np.ndarray]]:
        """Each column block of ``peers``' deltas: (first column, float64 array of
        len(peers) x block width), rows in ``peers``' order; a new array each time, which
        the caller may change."""
        rows = np.array([self._row[p] for p in peers], dtype=np.intp)
        for j in range(self.blocks_n):
            a, b = j * self.width, min(self.d, (j + 1) * self.width)
            out = np.empty((len(rows), b - a), np.float64)
            # the float32 subtraction the tensors' own would be, written out as float64
            np.subtract(self._block(j)[rows, : b - a], self.base[a:b], out=out, dtype=np.float32)
            yield a, out

    def _block(self, j: int) -> np.ndarray:
        """Every row held of block ``j`` (rows x width, float32): a view in memory, one read
        from the file."""
        n = len(self.peers)
        if self._ram is not None:
            return self._ram[j, :n]
        assert self._fd is not None
        return _pread(self._fd, n * self.width, self._at(j, 0)).reshape(n, self.width)

    def delta_rows(self, peers: Sequence[str]) -> DeltaRows:
        """``peers``' deltas as outlier detection reads them (fednode.robustness)."""
        ordered = list(peers)
        return DeltaRows(ordered, lambda: (blk for _a, blk in self.blocks(ordered)))

    def weighted_delta(self, coefs: Mapping[str, float]) -> np.ndarray:
        """sum_p coefs[p] * delta_p over every column, float64 (length d): the mean family's
        aggregate step and central DP's clipped sum, a block at a time."""
        peers = sorted(coefs)
        c = np.array([coefs[p] for p in peers], dtype=np.float64)
        out = np.zeros(self.d, np.float64)
        for a, blk in self.blocks(peers):
            out[a : a + blk.shape[1]] = c @ blk
        return out

    def read(self, peer: str, block: int) -> np.ndarray:
        """Block ``block`` of ``peer``'s row: its float32 values (a new array)."""
        i = self._row[peer]
        a, b = block * self.width, min(self.d, (block + 1) * self.width)
        if self._ram is not None:
            return self._ram[block, i, : b - a].copy()
        if self._cached[0] != block:  # one read for every row of the block: the arithmetic
            self._cached = (block, self._block(block))  # stacks a block of each in turn
        return self._cached[1][i, : b - a].copy()

    def by_columns(
        self, scales: Mapping[str, float]
    ) -> tuple[Weights, dict[str, dict[str, ColumnBlock]]]:
        """The round's model and each of ``scales``' peers' updates (each step scaled by its
        scale: the clip) as named column blocks instead of tensors, for a strategy that
        cuts the model anywhere (Strategy.by_columns): the model's blocks, and per peer its
        blocks, read from the rows only when the arithmetic turns them into arrays."""
        names = self._column_names()
        base = {n: self.base[j * self.width : (j + 1) * self.width] for j, n in enumerate(names)}
        return base, {
            p: {n: ColumnBlock(self, p, j, s) for j, n in enumerate(names)}
            for p, s in scales.items()
        }

    def from_columns(self, blocks: Mapping[str, np.ndarray]) -> Weights:
        """A model given as ``by_columns``' named blocks, as the round model's tensors."""
        names = self._column_names()
        flat = np.concatenate([np.asarray(blocks[n], np.float32).ravel() for n in names])
        return self.split(flat)

    def _column_names(self) -> list[str]:
        return [f"columns {j * self.width}-" for j in range(self.blocks_n)]

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A flat vector of length d as the round model's named tensors (views of it)."""
        return {
            k: flat[self.offsets[i] : self.offsets[i + 1]].reshape(self.shapes[i])
            for i, k in enumerate(self.order)
        }

    def model(self, delta: np.ndarray) -> Weights:
        """The round's model plus ``delta`` (float64, length d), as float32 tensors."""
        return self.split((self.base.astype(np.float64) + delta).astype(np.float32))

    def close(self) -> None:
        """Let go of the rows (the spill file's space is freed with its descriptor)."""
        self._ram = None
        self._cached = (-1, np.empty((0, 0), np.float32))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _at(self, block: int, row: int) -> int:
        return (block * self.capacity + row) * self.width * 4


class ColumnBlock:
    """One block of one update's row, its step scaled by ``scale`` (the round's clip), that
    becomes an array only when numpy asks (``np.asarray``, a stack's assignment): the robust
    strategies' arithmetic stacks one block of every update at a time, so a round holds
    n × a block, not n whole models."""

    __slots__ = ("_block", "_peer", "_rows", "_scale", "dtype", "shape")

    def __init__(self, rows: RoundUpdates, peer: str, block: int, scale: float) -> None:
        self._rows, self._peer, self._block, self._scale = rows, peer, block, scale
        a, b = block * rows.width, min(rows.d, (block + 1) * rows.width)
        self.shape = (b - a,)
        self.dtype = np.dtype(np.float32)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self._rows.read(self._peer, self._block)
        if self._scale != 1.0:  # as fednode.bounds.scaled_update: float64 inside
            a = self._block * self._rows.width
            g = self._rows.base[a : a + x.size].astype(np.float64)
            x = (g + (x.astype(np.float64) - g) * self._scale).astype(np.float32)
        return x if dtype is None else x.astype(dtype, copy=False)


def _flat(w: Mapping[str, np.ndarray], order: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(w[k], dtype=np.float32).ravel() for k in order])


def _pwrite_all(fd: int, values: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(values)).cast("B")
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread(fd: int, count: int, offset: int) -> np.ndarray:
    """``count`` float32 values from ``offset``; a hole (a row not written) reads as 0."""
    out = np.zeros(count, np.float32)
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:  # past the end of what was written: zeros, as the array already holds
            break
        got += n
    return out
