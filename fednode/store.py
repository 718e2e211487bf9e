"""The node's embedded content store: UnixFS files as verified blocks on local disk.

Why it is shaped like this: a model published by the coordinator must come back byte for
byte, or not at all. So every block is addressed by its CID (``protocol.cid``), every read
re-hashes the block, and every write is atomic (temporary file in the same directory, then
``os.replace``), which leaves either the old state or the new one after a crash.

Layout under ``root``::

    blocks/<xy>/<cid>   one file per block, named by its canonical CID string
    pins/<cid>          one empty marker file per pinned root

``<xy>`` is the two characters before the last one of the CID (kubo's flatfs
"next-to-last/2" scheme). The first characters after the multibase prefix would put
every block in one folder: all sha2-256 CIDv1 strings start "bafk"/"bafy" and all CIDv0
start "Qm", while the tail of a CID is spread evenly.

Pins are marker files rather than one JSON list because pinning then needs no
read-modify-write: two processes pinning at once cannot lose each other's pin, a crash
cannot leave a half-written list, and listing pins is one ``os.scandir``.

Only CID strings that ``protocol.cid.parse_cid`` accepts (letters and digits, a real
sha2-256 raw/dag-pb CID) ever reach a path, so "../x" and the like are refused with
CIDError before the file system sees them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from fednode.files import private_dir
from protocol.cid import (
    build_dag,
    links,
    normalize_cid,
    read_file,
    unixfs_file_size,
    verify_block,
)
from protocol.errors import CIDError, NotFound

_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600  # a temporary file this old was left by a crash, not by a live writer


class BlockStore:
    """Content-addressed blocks and pins in a directory; safe to share between processes."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._blocks = self.root / "blocks"
        self._pins = self.root / "pins"
        self._fsync = fsync
        for d in (self.root, self._blocks, self._pins):
            private_dir(d)

    # --- paths ----------------------------------------------------------------------------

    def _block_path(self, cid: str) -> tuple[str, Path]:
        key = normalize_cid(cid)  # raises CIDError for anything that is not a clean CID
        return key, self._blocks / key[-3:-1] / key

    def _pin_path(self, cid: str) -> tuple[str, Path]:
        key = normalize_cid(cid)
        return key, self._pins / key

    def _write_atomic(self, path: Path, data: bytes, durable: bool = True) -> None:
        private_dir(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if self._fsync and durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # --- blocks ---------------------------------------------------------------------------

    def has(self, cid: str) -> bool:
        """Whether the block named ``cid`` is on disk (the root only, not its children)."""
        return self._block_path(cid)[1].is_file()

    def blocks(self) -> Iterator[str]:
        """The name of every block file on disk, in order (`fednode backup` copies them).
        Names are not checked here: ``get_block`` refuses one that is not a CID or whose
        bytes do not hash to it. Temporary files of writes in flight are skipped."""
        for shard in sorted(os.scandir(self._blocks), key=lambda e: e.name):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in sorted(os.scandir(shard.path), key=lambda e: e.name):
                if not entry.name.startswith(_TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                    yield entry.name

    def put_block(self, cid: str, data: bytes, *, durable: bool = True) -> None:
        """Store one block after checking that ``data`` hashes to ``cid``.

        An existing copy is kept if it still verifies and replaced if it does not, so
        putting a block again repairs a damaged one. ``durable=False`` skips the fsync
        (see ``put``).
        """
        verify_block(cid, data)
        self._store_block(cid, data, durable)

    def _store_block(self, cid: str, data: bytes, durable: bool) -> None:
        """put_block for bytes known to hash to ``cid`` (build_dag just made both)."""
        key, path = self._block_path(cid)
        if path.is_file():
            try:
                verify_block(key, path.read_bytes())
                return
            except (CIDError, OSError):
                pass
        self._write_atomic(path, bytes(data), durable)

    def get_block(self, cid: str) -> bytes:
        """The bytes of one block, re-hashed: CIDError if altered, NotFound if absent."""
        key, path = self._block_path(cid)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"block {key} is not in the local store",
                hint="fetch it from a peer that has it, or publish the file again",
            ) from None
        verify_block(key, data)
        return data

    # --- files ----------------------------------------------------------------------------

    def put(
        self, data: bytes, *, pin: bool = True, cid_version: int = 1, durable: bool = True
    ) -> str:
        """Import ``data`` as a UnixFS file; return its root CID (the one kubo would give).

        ``durable`` (the default) fsyncs each block before it is renamed into place, so a
        ledger row written afterwards never names a block a power cut lost: model versions
        and strategy states. Copies that can be fetched again or that only serve an audit
        (a participant's cache of the round's model, the coordinator's copy of an update)
        are written with ``durable=False``: still atomic (never half a block), but a power
        cut may lose the last ones, which a read then reports as absent, never as wrong."""
        root, blocks = build_dag(data, cid_version)
        for block in blocks:
            self._store_block(block.cid, block.data, durable)
        if pin:
            self.pin(root)
        return root

    def get(self, cid: str) -> bytes:
        """Reassemble a file, verifying every block on the way down."""
        return read_file(cid, self.get_block)

    def size(self, cid: str) -> int:
        """File size recorded in the root block (no need for the rest of the DAG)."""
        return unixfs_file_size(cid, self.get_block(cid))

    # --- pins and garbage collection ------------------------------------------------------

    def pin(self, cid: str) -> None:
        """Keep ``cid`` and everything under it through :meth:`gc`."""
        key, path = self._pin_path(cid)
        if not self.has(key):
            raise NotFound(f"cannot pin {key}: it is not in the local store")
        if not path.exists():
            self._write_atomic(path, b"")

    def unpin(self, cid: str) -> None:
        key, path = self._pin_path(cid)
        try:
            path.unlink()
        except FileNotFoundError:
            raise NotFound(
                f"{key} is not pinned", hint="list pins with BlockStore.pins()"
            ) from None

    def pins(self) -> list[str]:
        return sorted(
            entry.name
            for entry in os.scandir(self._pins)
            if entry.is_file() and not entry.name.startswith(_TMP_PREFIX)
        )

    def _reachable(self) -> set[str]:
        """Every block reachable from a pin (missing blocks are skipped, damaged ones raise).

        Damage aborts the collection: deleting on a guess could lose children of a node
        that is only unreadable for a moment.
        """
        seen: set[str] = set()
        todo = list(self.pins())
        while todo:
            key = normalize_cid(todo.pop())
            if key in seen:
                continue
            seen.add(key)
            try:
                block = self.get_block(key)
            except NotFound:
                continue
            todo.extend(links(key, block))
        return seen

    def gc(self) -> int:
        """Delete every block not reachable from a pin; return how many were removed."""
        keep = self._reachable()
        stale_before = time.time() - _STALE_TMP_S
        removed = 0
        for shard in os.scandir(self._blocks):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if entry.stat().st_mtime < stale_before:
                            os.unlink(entry.path)
                    continue
                if entry.name in keep:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed


class ContentStore(Protocol):
    """What a node needs of a content store: :class:`BlockStore` or ``fednode.ipfs.IpfsStore``.

    Both take and give whole files by the CID ``protocol.cid`` computes, and both re-hash
    every block they read, so callers never see unverified bytes.
    """

    def has(self, cid: str) -> bool: ...
    def put_block(self, cid: str, data: bytes, *, durable: bool = True) -> None: ...
    def get_block(self, cid: str) -> bytes: ...
    def put(
        self, data: bytes, *, pin: bool = True, cid_version: int = 1, durable: bool = True
    ) -> str: ...
    def get(self, cid: str) -> bytes: ...
    def size(self, cid: str) -> int: ...
    def pin(self, cid: str) -> None: ...
    def unpin(self, cid: str) -> None: ...
    def pins(self) -> list[str]: ...
    def gc(self) -> int: ...


def open_store(root: Path, ipfs_api: str = "") -> ContentStore:
    """The node's store: the embedded one under ``root``, or the IPFS daemon at ``ipfs_api``.

    The daemon is asked its version at once, so a node told to use a daemon that is down
    refuses to start (IPFS_UNAVAILABLE) instead of failing at its first model.
    """
    if not ipfs_api:
        return BlockStore(root)
    from fednode.ipfs import IpfsStore

    store = IpfsStore(ipfs_api)
    store.version()
    return store
