"""Model downloads block by block (protocol/blockstream.py): the walk's order, every block
checked against the CID expected next, and the bounds a hostile coordinator runs into."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from fednode import weights
from fednode.participant import Participant
from protocol import messages
from protocol.blockstream import MAX_BLOCK_BYTES, BlockStream, DagWalk, max_blocks
from protocol.car import walk_dag
from protocol.cid import (
    CHUNK_SIZE,
    _pb_node,
    _unixfs_file,
    block_cid,
    build_dag,
    file_cid,
    parse_cid,
)
from protocol.errors import BlockStreamError, CIDError

MIB = 1024 * 1024


def stream_order(root: str, blocks: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """What the coordinator sends: DagWalk over the blocks it holds."""
    walk, out = DagWalk(root), []
    while (cid := walk.expected()) is not None:
        walk.visit(blocks[cid])
        out.append((cid, blocks[cid]))
    return out


def dag(data: bytes, **kw: object) -> tuple[str, dict[str, bytes], list[tuple[str, bytes]]]:
    root, blocks = build_dag(data, **kw)  # type: ignore[arg-type]
    by_cid = {b.cid: b.data for b in blocks}
    return root, by_cid, stream_order(root, by_cid)


def receive(root: str, sent: list[tuple[str, bytes]], max_file_bytes: int) -> bytes:
    stream = BlockStream(root, max_file_bytes)
    for cid, data in sent:
        stream.feed(cid, data)
    return stream.result()


@pytest.mark.parametrize("version", [0, 1])
def test_an_honest_stream_reassembles_the_file(version: int) -> None:
    data = os.urandom(CHUNK_SIZE * 3 + 1000)
    root, by_cid, sent = dag(data, cid_version=version)
    assert root == file_cid(data, version)
    assert len(sent) == 5 and sent[0][0] == root  # the root first, then the four leaves
    # the same order `ipfs dag export` writes (protocol.car), on a DAG without repeats
    assert [c for c, _ in sent] == [b.cid for b in walk_dag(root, by_cid.__getitem__)]
    stream = BlockStream(root, len(data))
    for cid, block in sent:
        assert stream.expected() == cid
        stream.feed(cid, block)
    assert stream.done and stream.result() == data
    assert stream.blocks == 5 and stream.block_bytes == sum(len(b) for _, b in sent)


def test_a_single_raw_block_is_a_stream_of_one() -> None:
    data = os.urandom(1000)
    root, _, sent = dag(data)
    assert sent == [(root, data)]  # what the coordinator used to send as the whole model
    assert receive(root, sent, 1000) == data


def test_a_deep_dag_with_repeated_blocks_is_walked_in_full() -> None:
    """Three levels (tiny chunks, three links a node) and identical chunks: every link is
    followed, a block linked twice is sent twice."""
    data = b"\x00" * 64 * 20 + os.urandom(300)
    root, by_cid, sent = dag(data, chunk_size=64, max_links=3)
    assert len(sent) > len(by_cid)  # repeats
    assert receive(root, sent, 100 * CHUNK_SIZE) == data


def test_wrong_order_is_refused() -> None:
    data = os.urandom(CHUNK_SIZE * 2 + 10)
    root, _, sent = dag(data)
    stream = BlockStream(root, len(data))
    stream.feed(*sent[0])
    with pytest.raises(BlockStreamError, match="not the next block"):
        stream.feed(*sent[2])  # the second leaf before the first
    with pytest.raises(BlockStreamError, match="not the next block"):
        BlockStream(root, len(data)).feed(*sent[1])  # a leaf before the root


def test_wrong_hash_is_refused() -> None:
    data = os.urandom(CHUNK_SIZE + 10)
    root, _, sent = dag(data)
    stream = BlockStream(root, len(data))
    stream.feed(*sent[0])
    cid, block = sent[1]
    with pytest.raises(CIDError, match="does not match"):
        stream.feed(cid, b"\x01" + block[1:])
    forged = bytearray(sent[0][1])
    forged[-1] ^= 1
    with pytest.raises(CIDError):
        BlockStream(root, len(data)).feed(root, bytes(forged))


def test_extra_block_and_missing_blocks_are_refused() -> None:
    data = os.urandom(CHUNK_SIZE + 10)
    root, _, sent = dag(data)
    stream = BlockStream(root, len(data))
    for cid, block in sent:
        stream.feed(cid, block)
    with pytest.raises(BlockStreamError, match="after the last block"):
        stream.feed(*sent[-1])
    short = BlockStream(root, len(data))
    short.feed(*sent[0])
    with pytest.raises(BlockStreamError, match="incomplete"):
        short.result()


def test_a_model_larger_than_the_spec_allows_is_refused_at_its_root() -> None:
    data = os.urandom(CHUNK_SIZE * 2)
    root, _, sent = dag(data)
    stream = BlockStream(root, len(data) - 1)
    with pytest.raises(BlockStreamError, match="at most"):
        stream.feed(*sent[0])  # the root says how large the file is: nothing more is taken
    small = os.urandom(500)
    with pytest.raises(BlockStreamError, match="at most"):
        receive(block_cid(small, "raw"), [(block_cid(small, "raw"), small)], 499)


def test_a_root_that_understates_the_file_is_refused() -> None:
    """A coordinator can name the CID of any DAG it builds: here a root whose filesize says
    10 bytes over leaves holding 2 x 1000 (so the bound checked at the root is a lie)."""
    leaves = [os.urandom(1000), os.urandom(1000)]
    links = [(bytes(parse_cid(block_cid(leaf, "raw"))), len(leaf)) for leaf in leaves]
    root_block = _pb_node(links, _unixfs_file(filesize=10, blocksizes=(5, 5)))
    root = block_cid(root_block, "dag-pb")
    stream = BlockStream(root, 3 * CHUNK_SIZE)  # room for 4 blocks
    stream.feed(root, root_block)
    with pytest.raises(BlockStreamError, match="more bytes than the 10"):
        stream.feed(block_cid(leaves[0], "raw"), leaves[0])
    # and one that overstates it: the file ends short of what the root records
    root_block = _pb_node(links, _unixfs_file(filesize=2500, blocksizes=(1250, 1250)))
    root = block_cid(root_block, "dag-pb")
    sent = [(root, root_block)] + [(block_cid(leaf, "raw"), leaf) for leaf in leaves]
    with pytest.raises(BlockStreamError, match="its root records"):
        receive(root, sent, 3 * CHUNK_SIZE)


def test_too_many_blocks_and_oversized_blocks_are_refused() -> None:
    data = os.urandom(4000)
    root, _, sent = dag(data, chunk_size=1)  # 4000 one-byte leaves and their parents
    assert max_blocks(len(data)) == 1
    stream = BlockStream(root, len(data))
    stream.feed(*sent[0])
    with pytest.raises(BlockStreamError, match="more than 1 blocks"):
        stream.feed(*sent[1])
    big = os.urandom(MAX_BLOCK_BYTES + 1)
    with pytest.raises(BlockStreamError, match="at most"):
        BlockStream(block_cid(big, "raw"), 10 * MIB).feed(block_cid(big, "raw"), big)


def test_max_blocks_is_the_importers_count() -> None:
    for size in (0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, 7 * CHUNK_SIZE + 3):
        _, blocks = build_dag(os.urandom(size))
        assert max_blocks(size) == len(blocks), size
    # 175 leaves need two levels of parents: 175 + 2 + 1
    assert max_blocks(175 * CHUNK_SIZE) == 178


def test_max_file_bytes_bounds_real_model_bytes() -> None:
    w = {"0.weight": np.ones((16, 64), np.float32), "0.bias": np.ones(16, np.float32)}
    blob = weights.to_bytes(w)
    bound = weights.max_file_bytes(weights.shapes(w))
    assert len(blob) <= bound < len(blob) + weights.MAX_HEADER_BYTES + 8


# --- the participant's routing of block messages (no sockets) -----------------------------


def _participant() -> Participant:
    p = Participant.__new__(Participant)  # only the download state is used here
    p._fetches, p._streams = {}, {}
    return p


def test_participant_routes_blocks_and_fails_on_a_stranger() -> None:
    async def go() -> None:
        data = os.urandom(CHUNK_SIZE + 10)
        root, _, sent = dag(data)
        p = _participant()
        fut, stream = p._expect_blocks(root, len(data))
        for cid, block in sent:
            p._on_block(messages.Block(cid=cid, data=block))
        assert await p._receive_blocks(root, fut, stream) == (data, stream.block_bytes)
        assert not p._streams and not p._fetches
        p._on_block(messages.Block(cid=sent[1][0], data=sent[1][1]))  # late: dropped

        fut, stream = p._expect_blocks(root, len(data))
        p._on_block(messages.Block(cid=sent[0][0], data=sent[0][1]))
        other = os.urandom(100)
        p._on_block(messages.Block(cid=block_cid(other, "raw"), data=other))
        with pytest.raises(BlockStreamError, match="not the next block"):
            await p._receive_blocks(root, fut, stream)
        assert not p._streams and not p._fetches

    asyncio.run(go())
