"""CAR v1: our archives are byte for byte what js-ipfs exports, and the decoder trusts nothing.

[JS-IPFS-EXPORT] The SHA-256 digests below are of the CAR files that js-ipfs 0.66.1 (npm
    ``ipfs``; ipfs-core 0.18.1, @ipld/car 5.4.7) wrote with ``/api/v0/dag/export?arg=ROOT``
    after ``/api/v0/add`` of the same file (``cid-version=1`` for v1, defaults for v0), run
    on this project's behalf on node 20. Inputs: ``numpy.random.default_rng(n).bytes(n)``.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import cbor2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.admin import AdminAPI
from fednode.store import BlockStore
from protocol.car import decode_car, encode_car, walk_dag
from protocol.cid import CHUNK_SIZE, Block, block_cid, build_dag, links, unixfs_file_data
from protocol.errors import CIDError, DecodeError, NotFound
from protocol.operations import READ_OPS
from tests.conftest import cli, cli_json

K = CHUNK_SIZE


def rng_bytes(n: int) -> bytes:
    return np.random.default_rng(n).bytes(n)


def car_of(data: bytes, version: int = 1) -> tuple[str, bytes]:
    root, blocks = build_dag(data, version)
    by_cid = {b.cid: b.data for b in blocks}
    return root, encode_car(root, walk_dag(root, by_cid.__getitem__))


def reassemble(root: str, blocks: dict[str, bytes]) -> bytes:
    """The file under ``root``, walking links (repeated chunks repeat: no dedup here)."""
    out = bytearray()

    def walk(cid: str) -> None:
        data = blocks[cid]
        out.extend(unixfs_file_data(cid, data))
        for child in links(cid, data):
            walk(child)

    walk(root)
    return bytes(out)


JS_IPFS_EXPORTS = [  # (size, cid version, sha256 of the CAR js-ipfs 0.66.1 exported)
    (K + 1, 1, "0e83ec998eb7cbb6fcea70faee3e5000f1650e8a4c7ca4989f5e54cdb242dc17"),
    (K + 1, 0, "78517c7f485dd6a312abd73544f6ccbf9eaf3726b710501cc91ca608d5cbc9a6"),
    (5_000_000, 1, "8053208ffaf715bc0258b2f1d793a32eebe76a6d797ac70c1db2a9a58efe340e"),
    (5_000_000, 0, "e95fedd087ccc548be926cf111d93126538a970907e30965ba22448d0185dfb0"),
]


@pytest.mark.parametrize(("size", "version", "digest"), JS_IPFS_EXPORTS)
def test_car_is_byte_identical_to_js_ipfs_dag_export(size: int, version: int, digest: str):
    _, car = car_of(rng_bytes(size), version)
    assert hashlib.sha256(car).hexdigest() == digest


def test_header_layout() -> None:
    root, car = car_of(rng_bytes(K + 1))
    # varint 58, then {"roots": [42(h'00' + cid)], "version": 1}: keys in DAG-CBOR order
    header = cbor2.loads(car[1:59])
    assert car[0] == 58 and set(header) == {"roots", "version"} and header["version"] == 1
    assert list(header) == ["roots", "version"]
    (tag,) = header["roots"]
    assert tag.tag == 42 and tag.value[:1] == b"\x00"
    assert decode_car(car).roots == [root]
    # the same 18 bytes js-ipfs writes: 3a, map(2), "roots", array(1), tag 42, bytes(37), 00,
    # then the CIDv1 01 70 (dag-pb) 12 20 (sha2-256, 32 bytes)
    assert car[:18].hex() == "3aa265726f6f747381d82a582500017012" + "20"


@pytest.mark.parametrize("version", [0, 1])
def test_multi_chunk_round_trip(version: int) -> None:
    data = rng_bytes(3 * K + 7)  # 4 leaves under one dag-pb root
    root, car = car_of(data, version)
    got = decode_car(car)
    assert got.roots == [root]
    assert got.blocks[0].cid == root  # depth first: the root comes first
    assert len(got.blocks) == 5
    leaf_prefix = "bafkrei" if version == 1 else "Qm"  # raw leaves (v1), dag-pb leaves (v0)
    assert all(b.cid.startswith(leaf_prefix) for b in got.blocks[1:])
    assert reassemble(root, got.block_map()) == data


def test_repeated_chunks_are_written_once() -> None:
    data = bytes(3 * K)  # three identical leaves: one leaf block + the root
    root, car = car_of(data)
    got = decode_car(car)
    assert len(got.blocks) == 2 and reassemble(root, got.block_map()) == data


def test_two_level_dag_round_trip() -> None:
    data = rng_bytes(174 * K + 1)  # root -> [174 leaves, 1 leaf]: 178 blocks
    root, car = car_of(data)
    got = decode_car(car)
    assert len(got.blocks) == 178
    assert reassemble(root, got.block_map()) == data


# --- the decoder refuses what is wrong, saying what -----------------------------------------


def _header(obj: object) -> bytes:
    body = cbor2.dumps(obj, canonical=True)
    return bytes([len(body)]) + body


SMALL_ROOT, SMALL = car_of(b"a model" * 40000)  # 280000 bytes: 2 leaves + root


def _replace_header(car: bytes, header: bytes) -> bytes:
    return header + car[1 + car[0] :]


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda c: b"", DecodeError, "truncated"),
        (lambda c: c[:30], DecodeError, "truncated"),
        (lambda c: c[:-1], DecodeError, "claims"),
        (lambda c: c + b"\x05\x01", DecodeError, "claims 5 bytes"),
        (lambda c: _replace_header(c, _header({"roots": [], "version": 1})), DecodeError, "roots"),
        (lambda c: _replace_header(c, _header({"version": 2})), DecodeError, "CARv2"),
        (lambda c: _replace_header(c, _header([1, 2])), DecodeError, "not a map"),
        (
            lambda c: _replace_header(c, _header({"roots": [b"x"], "version": 1})),
            DecodeError,
            "not a CID",
        ),
        (
            lambda c: _replace_header(
                c, _header({"roots": [cbor2.CBORTag(43, b"x")], "version": 1})
            ),
            DecodeError,
            "tag 43",
        ),
        (
            lambda c: _replace_header(
                c, _header({"roots": [cbor2.CBORTag(42, b"\x00\x01")], "version": 1, "x": 1})
            ),
            DecodeError,
            "unknown keys",
        ),
        (lambda c: b"\xff" * 12, DecodeError, "longer"),
        (lambda c: b"\x00", DecodeError, "header length"),
        (lambda c: c[:-5] + bytes([c[-5] ^ 1]) + c[-4:], CIDError, "does not hash"),
    ],
)
def test_decoder_refuses(mutate, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        decode_car(mutate(SMALL))


def test_missing_root_is_named() -> None:
    root, blocks = build_dag(b"a model" * 40000)
    leaves = [b for b in blocks if b.cid != root]
    car = encode_car(root, leaves)
    with pytest.raises(DecodeError, match=f"root {root} is not among"):
        decode_car(car)


def test_unsupported_codec_and_hash_are_named() -> None:
    dag_cbor = bytes([0x01, 0x71, 0x12, 0x20]) + hashlib.sha256(b"x").digest()
    identity = bytes([0x01, 0x55, 0x00, 0x01]) + b"x"
    for cid, words in ((dag_cbor, "codec 0x71"), (identity, "hash 0x0")):
        section = bytes([len(cid) + 1]) + cid + b"x"
        with pytest.raises(CIDError, match=words):
            decode_car(SMALL + section)


def test_encoder_refuses_a_block_that_does_not_match() -> None:
    cid = block_cid(b"real", "raw")
    with pytest.raises(CIDError):
        encode_car(cid, [Block(cid, b"fake")])


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 400),
    st.binary(min_size=1, max_size=4),
    st.integers(0, 3),
)
def test_arbitrary_damage_raises_only_typed_errors(at: int, patch: bytes, cut: int) -> None:
    head = SMALL[:400]  # header, the root section's start
    damaged = head[:at] + patch + head[at + len(patch) :] + SMALL[400 : len(SMALL) - cut]
    with contextlib.suppress(DecodeError, CIDError):
        decode_car(damaged)
        assert damaged == SMALL  # whatever else decodes was damaged in a way it must notice


# --- export: the admin op and `fedctl model export` --------------------------------------


class _Coord:
    def __init__(self, store: BlockStore) -> None:
        self.store = store


async def test_admin_model_export_is_a_read_op_returning_the_dag(tmp_path: Path) -> None:
    store = BlockStore(tmp_path, fsync=False)
    data = rng_bytes(2 * K + 3)
    cid = store.put(data)
    assert "model.export" in READ_OPS
    reply = await AdminAPI(_Coord(store)).ops["model.export"]({"cid": cid})
    blocks = [Block(b["cid"], b["data"]) for b in reply["blocks"]]
    assert reply["cid"] == cid and blocks[0].cid == cid and len(blocks) == 4
    assert reassemble(cid, decode_car(encode_car(cid, blocks)).block_map()) == data
    with pytest.raises(NotFound):
        await AdminAPI(_Coord(store)).ops["model.export"]({"cid": block_cid(b"?", "raw")})


def test_fedctl_model_export_offline(tmp_path: Path) -> None:
    node = tmp_path / "node"
    data = rng_bytes(3 * K + 11)
    cid = BlockStore(node / "store").put(data)
    out = tmp_path / "model.car"
    got = cli_json("model", "export", cid, "-o", str(out), "--data-dir", str(node))
    assert got["ok"] and got["cid"] == cid and got["blocks"] == 5
    assert got["size"] == out.stat().st_size and got["file_size"] == len(data)
    car = decode_car(out.read_bytes())
    assert car.roots == [cid] and reassemble(cid, car.block_map()) == data
    assert out.read_bytes() == car_of(data)[1]
    missing = cli("model", "export", block_cid(b"?", "raw"), "-o", str(out), "--data-dir",
                  str(node), "--json")  # fmt: skip
    assert missing.returncode == 1 and '"NOT_FOUND"' in missing.stdout
