"""A model download as a stream of blocks, each checked before the next is taken.

Why this exists: a model used to come down as one ``block`` message holding the whole file,
hashed against its CID once it was all there. Now the coordinator sends the file's UnixFS DAG
(protocol.cid) one block per message, and the participant checks each block as it arrives
against the CID it expects next: the root's for the first, then each link of a parent that
was already verified, in the order :class:`DagWalk` gives (depth first, left to right, the
root first). So every byte kept was proven to belong to the CID the round named, and a
coordinator that sends anything else is caught at its first wrong block, not after the
whole file.

The participant's memory is bounded by the model the spec describes, not by what the
coordinator sends: :class:`BlockStream` refuses a root that declares a larger file, file bytes
beyond that bound, a block larger than any protocol.cid makes, and more blocks than kubo's
layout gives a file of that size. A DAG that links one block twice gets it twice (no cache on
either side: memory stays one block plus the file).

Pure: no I/O. The coordinator walks with :class:`DagWalk` (its store re-hashes each block), the
participant checks with :class:`BlockStream`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from protocol import text
from protocol.cid import (
    CHUNK_SIZE,
    MAX_LINKS,
    links,
    normalize_cid,
    unixfs_file_data,
    unixfs_file_size,
    verify_block,
)
from protocol.errors import BlockStreamError

# The largest block protocol.cid's importer makes is a dag-pb leaf: a chunk and a few bytes
# of UnixFS framing; an internal node of MAX_LINKS links is about 12 KiB. Room for both.
MAX_BLOCK_BYTES = CHUNK_SIZE + 16 * 1024


def max_blocks(file_bytes: int) -> int:
    """How many blocks kubo's balanced layout (protocol.cid.build_dag) makes for a file of
    ``file_bytes``: its leaves, then a parent per MAX_LINKS nodes, level by level. Files
    no larger have no more."""
    level = max(1, math.ceil(file_bytes / CHUNK_SIZE))
    total = level
    while level > 1:
        level = math.ceil(level / MAX_LINKS)
        total += level
    return total


class DagWalk:
    """The order of a UnixFS DAG's blocks on the wire: the root, then depth first, left to
    right. The walker is told each block as it is visited and follows its links."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._stack: list[Iterator[str]] = [iter([root])]
        self._pending: str | None = None

    def expected(self) -> str | None:
        """The CID of the next block (None: the walk is complete)."""
        while self._pending is None and self._stack:
            child = next(self._stack[-1], None)
            if child is None:
                self._stack.pop()
            else:
                self._pending = child
        return self._pending

    def visit(self, data: bytes) -> list[str]:
        """Take ``data`` as the block :meth:`expected` named; returns its links, which come
        next. CIDError for a dag-pb block that does not parse. Verifying ``data`` against the
        CID is the caller's (a store's read, or :class:`BlockStream`)."""
        cid = self.expected()
        if cid is None:
            raise BlockStreamError(f"the DAG of {self.root} has no more blocks")
        children = links(cid, data)
        self._pending = None
        if children:
            self._stack.append(iter(children))
        return children


class BlockStream:
    """A participant's side of a download: each block checked against the walk, the file
    reassembled, everything bounded by ``max_file_bytes`` (what the spec's model can be)."""

    def __init__(self, root: str, max_file_bytes: int) -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_blocks = max_blocks(max_file_bytes)
        self.blocks = 0  # received and verified
        self.block_bytes = 0  # their bytes: the file plus the DAG's own nodes
        self._walk = DagWalk(root)
        self._declared = 0  # the file size the root records
        self._out = bytearray()

    def expected(self) -> str | None:
        """The CID of the block this stream takes next (None: complete)."""
        return self._walk.expected()

    @property
    def done(self) -> bool:
        return self._walk.expected() is None

    def feed(self, cid: str, data: bytes) -> None:
        """Check one received block and keep its file bytes. Raises BlockStreamError (out of
        order, after the end, over a bound) or CIDError (the bytes are not that CID's)."""
        want = self._walk.expected()
        if want is None:
            raise BlockStreamError(
                f"block {text.shown(cid)} came after the last block of model {self.root}"
            )
        if normalize_cid(cid) != normalize_cid(want):
            raise BlockStreamError(
                f"block {text.shown(cid)} is not the next block of model {self.root}: "
                f"expected {want} (block {self.blocks + 1}, depth first from the root)"
            )
        if len(data) > MAX_BLOCK_BYTES:
            raise BlockStreamError(
                f"block {want} of model {self.root} has {len(data):,} bytes; a block may "
                f"have at most {MAX_BLOCK_BYTES:,}"
            )
        if self.blocks >= self.max_blocks:
            raise BlockStreamError(
                f"model {self.root} has more than {self.max_blocks:,} blocks, the most a "
                f"file of {self.max_file_bytes:,} bytes (the spec's model) has"
            )
        verify_block(want, data)
        if self.blocks == 0:
            self._declared = unixfs_file_size(want, data)
            if self._declared > self.max_file_bytes:
                raise BlockStreamError(
                    f"model {self.root} is a file of {self._declared:,} bytes; the spec's "
                    f"model has at most {self.max_file_bytes:,}"
                )
        piece = unixfs_file_data(want, data)
        if len(self._out) + len(piece) > self._declared:
            raise BlockStreamError(
                f"model {self.root} holds more bytes than the {self._declared:,} its root records"
            )
        self._walk.visit(data)
        self._out += piece
        self.blocks += 1
        self.block_bytes += len(data)

    def result(self) -> bytes:
        """The file, once every block came: its length is the one the root records."""
        if not self.done:
            raise BlockStreamError(
                f"model {self.root} is incomplete: {self.blocks} blocks came, next is "
                f"{self.expected()}"
            )
        if len(self._out) != self._declared:
            raise BlockStreamError(
                f"model {self.root} holds {len(self._out):,} bytes; its root records "
                f"{self._declared:,}"
            )
        return bytes(self._out)
