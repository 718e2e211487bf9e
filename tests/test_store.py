"""The embedded block store: round trips, dedup, tamper and loss detection, pins, gc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fednode.store import BlockStore
from protocol.cid import CHUNK_SIZE, build_dag, file_cid, links
from protocol.errors import CIDError, NotFound

K = CHUNK_SIZE


def pattern(n: int, seed: int = 0) -> bytes:
    return (bytes((i * 7 + seed) % 256 for i in range(256)) * (n // 256 + 1))[:n]


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blocks").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    return BlockStore(tmp_path, fsync=False)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("size", [0, 1, 1000, K, K + 1, 3 * K + 17])
def test_put_get_roundtrip(store: BlockStore, version: int, size: int) -> None:
    data = pattern(size)
    cid = store.put(data, cid_version=version)
    assert cid == file_cid(data, version)
    assert store.get(cid) == data
    assert store.size(cid) == size
    assert store.has(cid)
    assert cid in store.pins()


def test_blocks_are_sharded_by_cid_tail(store: BlockStore, tmp_path: Path) -> None:
    cid = store.put(b"hello")
    path = tmp_path / "blocks" / cid[-3:-1] / cid
    assert path.read_bytes() == b"hello"


def test_reopening_the_store_sees_the_same_blocks(tmp_path: Path) -> None:
    cid = BlockStore(tmp_path).put(pattern(K + 3))
    again = BlockStore(tmp_path)
    assert again.get(cid) == pattern(K + 3)
    assert again.pins() == [cid]


def test_shared_chunks_are_stored_once(store: BlockStore, tmp_path: Path) -> None:
    shared = pattern(K, seed=1)
    a = store.put(shared + pattern(K, seed=2))
    b = store.put(shared + pattern(K, seed=3))
    # two roots + the shared leaf + two distinct leaves: 5 blocks, not 6
    assert len(block_files(tmp_path)) == 5
    assert store.get(a)[:K] == store.get(b)[:K] == shared
    # a file of identical chunks keeps one leaf
    store.put(bytes(4 * K))
    assert len(block_files(tmp_path)) == 7


def test_tampered_block_is_detected(store: BlockStore, tmp_path: Path) -> None:
    data = pattern(2 * K + 5)
    cid = store.put(data)
    leaf = links(cid, store.get_block(cid))[1]
    path = tmp_path / "blocks" / leaf[-3:-1] / leaf
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(CIDError, match=leaf):
        store.get(cid)
    with pytest.raises(CIDError):
        store.get_block(leaf)
    # putting the file again repairs the damaged copy
    assert store.put(data) == cid
    assert store.get(cid) == data


def test_missing_block_is_not_found(store: BlockStore, tmp_path: Path) -> None:
    cid = store.put(pattern(2 * K))
    leaf = links(cid, store.get_block(cid))[0]
    (tmp_path / "blocks" / leaf[-3:-1] / leaf).unlink()
    with pytest.raises(NotFound):
        store.get(cid)
    with pytest.raises(NotFound):
        store.get(file_cid(b"never stored"))
    assert not store.has(file_cid(b"never stored"))


def test_put_block_verifies_before_writing(store: BlockStore, tmp_path: Path) -> None:
    root, blocks = build_dag(pattern(K + 1))
    with pytest.raises(CIDError):
        store.put_block(blocks[0].cid, b"not the block")
    assert block_files(tmp_path) == []
    for block in blocks:
        store.put_block(block.cid, block.data)
    assert store.get(root) == pattern(K + 1)
    assert store.get_block(blocks[0].cid) == blocks[0].data


@pytest.mark.parametrize(
    "bad", ["../x", "../../etc/passwd", "/etc/passwd", "bafk/../x", "..", "Qm..", "a\x00b", ""]
)
def test_path_traversal_cids_are_refused(store: BlockStore, bad: str) -> None:
    for call in (store.has, store.get, store.get_block, store.size, store.pin, store.unpin):
        with pytest.raises(CIDError):
            call(bad)
    with pytest.raises(CIDError):
        store.put_block(bad, b"x")


def test_no_temporary_files_left_behind(store: BlockStore, tmp_path: Path) -> None:
    store.put(pattern(2 * K + 1))
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_pin_unpin(store: BlockStore) -> None:
    cid = store.put(b"abc", pin=False)
    assert store.pins() == []
    store.pin(cid)
    store.pin(cid)  # idempotent
    assert store.pins() == [cid]
    store.unpin(cid)
    assert store.pins() == []
    with pytest.raises(NotFound):
        store.unpin(cid)
    with pytest.raises(NotFound):
        store.pin(file_cid(b"not here"))


def test_gc_removes_only_unpinned(store: BlockStore, tmp_path: Path) -> None:
    shared = pattern(K, seed=5)
    kept = store.put(shared + pattern(K, seed=6))  # 3 blocks
    dropped = store.put(shared + pattern(K, seed=7), pin=False)  # root + 1 own leaf
    loose = store.put(b"loose", pin=False)
    assert len(block_files(tmp_path)) == 6
    assert store.gc() == 3
    assert store.get(kept) == shared + pattern(K, seed=6)
    assert not store.has(dropped) and not store.has(loose)
    assert store.gc() == 0
    store.unpin(kept)
    assert store.gc() == 3
    assert block_files(tmp_path) == []


def test_gc_leaves_fresh_temp_files_and_clears_stale_ones(
    store: BlockStore, tmp_path: Path
) -> None:
    store.put(b"x")
    shard = next((tmp_path / "blocks").iterdir())
    fresh, stale = shard / ".tmp-fresh", shard / ".tmp-stale"
    fresh.write_bytes(b"1")
    stale.write_bytes(b"2")
    os.utime(stale, (0, 0))
    assert store.gc() == 0
    assert fresh.exists() and not stale.exists()
