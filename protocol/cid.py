"""Content identifiers that match what an IPFS (kubo) node computes for the same bytes.

Why this exists: a participant must be able to check, with no daemon running, that the
model bytes it fetched are exactly the ones the coordinator named, and an operator must be
able to run ``ipfs add --only-hash`` on a file and get the same CID fednode printed. So the
importer below reproduces kubo's defaults bit for bit:

* ``ipfs add -Q --only-hash`` (CIDv0): dag-pb leaves, base58btc "Qm..." CIDs;
* ``ipfs add -Q --only-hash --cid-version=1`` (CIDv1): raw leaves, base32 "baf..." CIDs;
* both with chunker ``size-262144`` and the ``balanced`` layout, at most 174 links a node.

Sources the encoding follows (read, not copied):

* UnixFS: ipfs/specs ``UNIXFS.md`` (now ``src/unixfs.md``). ``Data`` message: Type=1
  (File=2), Data=2 (bytes), filesize=3, blocksizes=4 (repeated uint64, *not* packed, as
  the proto2 schema and go's encoder write it).
* DAG-PB: ipld/specs ``block-layer/codecs/dag-pb.md``. ``PBNode``: Links=2 (repeated
  PBLink) written *before* Data=1; ``PBLink``: Hash=1 (binary CID), Name=2, Tsize=3.
  Kubo always writes ``Name`` even when empty (a zero-length field ``12 00``), and Tsize
  is the child's block size plus the Tsize of all of the child's own links.
* Layout: ipfs/boxo ``ipld/unixfs/importer/balanced/builder.go`` (formerly go-unixfs). It
  fills a root with up to ``maxlinks`` children, then, while data remains, makes a new root
  one level deeper whose first child is the old root. The result is the same tree as
  grouping leaves bottom-up in runs of ``maxlinks`` until one node is left, which is what
  :func:`build_dag` does. A file of a single chunk has that leaf as its root (no wrapper).
* An empty file is one empty chunk; its dag-pb leaf carries no UnixFS ``Data`` field
  (kubo's QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH is ``0a 04 08 02 18 00``).

Hand-written: the protobuf wire format (varints, length-delimited fields) and, for the two
canonical text forms only (CIDv1 sha2-256 in base32, CIDv0 in base58btc), the CID's binary
layout and its multibase text, because ``multiformats``' pure-Python encoders cost about
0.7 ms per CID, which was 80 % of the time of a CID of a 100 MB file (docs/benchmarks.md).
``multiformats`` still parses every other form, and the tests check the hand-written forms
against it. Everything here is pure: bytes in, CIDs out.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from multiformats import CID

from protocol.errors import CIDError

CHUNK_SIZE = 262144
MAX_LINKS = 174

_CODECS = ("raw", "dag-pb")
_CODEC_CODES = {"raw": 0x55, "dag-pb": 0x70}  # multicodec table; both fit one varint byte
_CODEC_NAMES = {code: name for name, code in _CODEC_CODES.items()}
_SHA2_256 = b"\x12\x20"  # multihash: sha2-256, 32-byte digest
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}
_UNIXFS_FILE = 2
_BAD_CID_HINT = "a CID looks like Qm... (v0) or bafk.../bafy... (v1); check where it came from"
_MAX_CID_TEXT = 200  # a sha2-256 CIDv1 in base32 is 59 characters; be generous, not unbounded

__all__ = [
    "CHUNK_SIZE",
    "MAX_LINKS",
    "Block",
    "block_cid",
    "block_cid_v0",
    "build_dag",
    "cid_codec",
    "file_cid",
    "links",
    "normalize_cid",
    "parse_cid",
    "pb_links",
    "read_file",
    "unixfs_file_data",
    "unixfs_file_size",
    "varint",
    "verify_block",
]


@dataclass(frozen=True)
class Block:
    """One content-addressed block: its CID string and the exact bytes hashed for it."""

    cid: str
    data: bytes


# --- protobuf wire format -----------------------------------------------------------------


def varint(n: int) -> bytes:
    """Unsigned LEB128, as multiformats' unsigned-varint (also CAR's section lengths)."""
    if n < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _uint_field(field: int, value: int) -> bytes:
    return _key(field, 0) + varint(value)


def _bytes_field(field: int, value: bytes) -> bytes:
    return _key(field, 2) + varint(len(value)) + value


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; reject truncated and over-long (> 64-bit) encodings."""
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise CIDError("truncated varint in dag-pb block")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= 1 << 64:
                raise CIDError("varint overflows 64 bits in dag-pb block")
            return result, pos
        shift += 7
        if shift >= 70:
            raise CIDError("varint longer than 10 bytes in dag-pb block")


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for a message that uses wire types 0 and 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise CIDError("protobuf field number 0 in dag-pb block")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos)
            yield field, wire_type, value
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if length > len(buf) - pos:
                raise CIDError("length-delimited field runs past the end of the dag-pb block")
            yield field, wire_type, buf[pos : pos + length]
            pos += length
        else:
            raise CIDError(f"unexpected protobuf wire type {wire_type} in dag-pb block")


# --- UnixFS and dag-pb encoding -----------------------------------------------------------


def _unixfs_file(
    *, data: bytes | None = None, filesize: int, blocksizes: tuple[int, ...] = ()
) -> bytes:
    out = _uint_field(1, _UNIXFS_FILE)
    if data:
        out += _bytes_field(2, data)
    out += _uint_field(3, filesize)
    for size in blocksizes:
        out += _uint_field(4, size)
    return out


def _pb_leaf(chunk: bytes | memoryview) -> bytes:
    """``_pb_node([], _unixfs_file(data=chunk, filesize=n))`` for n > 0, with one copy."""
    n = varint(len(chunk))
    unixfs_len = 3 + len(n) + len(chunk) + 1 + len(n)  # 08 02 | 12 n chunk | 18 n
    return b"".join((b"\x0a", varint(unixfs_len), b"\x08\x02\x12", n, chunk, b"\x18", n))


def _pb_node(node_links: list[tuple[bytes, int]], data: bytes) -> bytes:
    """Encode a PBNode: every link first (Hash, empty Name, Tsize), then Data."""
    out = bytearray()
    for cid_bytes, tsize in node_links:
        link = _bytes_field(1, cid_bytes) + _bytes_field(2, b"") + _uint_field(3, tsize)
        out += _bytes_field(2, link)
    out += _bytes_field(1, data)
    return bytes(out)


# --- CIDs ---------------------------------------------------------------------------------


def _cid_binary(data: bytes | memoryview, version: int, codec: str) -> bytes:
    """The binary CID of a block: the bare multihash (v0) or 01 <codec> <multihash> (v1)."""
    mh = _SHA2_256 + hashlib.sha256(data).digest()
    if version == 0:
        return mh
    return bytes((1, _CODEC_CODES[codec])) + mh


def _b58encode(raw: bytes) -> str:
    n = int.from_bytes(raw, "big")
    out = []
    while n:
        n, r = divmod(n, 58)
        out.append(_B58[r])
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + "".join(reversed(out))


def _b58decode(text: str) -> bytes | None:
    n = 0
    for c in text:
        i = _B58_INDEX.get(c)
        if i is None:
            return None
        n = n * 58 + i
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + n.to_bytes((n.bit_length() + 7) // 8, "big")


def _cid_text(raw: bytes) -> str:
    """Canonical text of a binary CID made here: base58btc for v0, "b" + base32 for v1."""
    if len(raw) == 34:
        return _b58encode(raw)
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


@functools.lru_cache(maxsize=16384)
def _fast_parse(cid: str) -> tuple[int, str, bytes] | None:
    """(version, codec, digest) of a CID in one of the two canonical forms, else None.

    Only exact canonical spellings pass (re-encoding gives the same text); anything else
    goes through multiformats in :func:`_parse_cid`, which also produces the errors.
    """
    if len(cid) == 46 and cid.startswith("Qm"):
        raw = _b58decode(cid)
        if raw is not None and len(raw) == 34 and raw[:2] == _SHA2_256 and _b58encode(raw) == cid:
            return 0, "dag-pb", raw[2:]
    elif len(cid) == 59 and cid.startswith("b") and cid.islower() and cid.isalnum():
        try:
            raw = base64.b32decode(cid[1:].upper() + "======")
        except ValueError:
            return None
        codec = _CODEC_NAMES.get(raw[1]) if len(raw) == 36 else None
        if raw[0] == 1 and codec and raw[2:4] == _SHA2_256 and _cid_text(raw) == cid:
            return 1, codec, raw[4:]
    return None


def block_cid(data: bytes, codec: str) -> str:
    """CIDv1 (sha2-256, base32) of one block; ``codec`` is "raw" or "dag-pb"."""
    if codec not in _CODECS:
        raise CIDError(f"unsupported codec {codec!r}; expected one of {_CODECS}")
    return _cid_text(_cid_binary(data, 1, codec))


def block_cid_v0(data: bytes) -> str:
    """CIDv0 ("Qm...", dag-pb, sha2-256) of one dag-pb block."""
    return _cid_text(_cid_binary(data, 0, "dag-pb"))


def parse_cid(cid: str) -> CID:
    """Parse a CID string, turning every failure into CIDError.

    Only sha2-256 raw / dag-pb CIDs (what this module produces and can check) written with
    letters and digits only ("Qm..." for v0, an alphanumeric multibase such as base32 or
    base58btc for v1) are accepted, so a value that passes is also safe as a file name.
    """
    if not isinstance(cid, str):
        raise CIDError(f"a CID must be a string, not {type(cid).__name__}", hint=_BAD_CID_HINT)
    return _parse_cid(cid)


@functools.lru_cache(maxsize=4096)  # CID objects are immutable; parsing costs ~0.5 ms
def _parse_cid(cid: str) -> CID:
    if not cid or len(cid) > _MAX_CID_TEXT or not cid.isascii():
        raise CIDError(f"malformed CID {cid!r}", hint=_BAD_CID_HINT)
    if not cid.isalnum():
        raise CIDError(
            f"malformed CID {cid!r}: only letters and digits are allowed", hint=_BAD_CID_HINT
        )
    try:
        parsed = CID.decode(cid)
    except Exception as exc:  # multiformats raises several unrelated types
        raise CIDError(f"malformed CID {cid!r}: {exc}", hint=_BAD_CID_HINT) from None
    if parsed.codec.name not in _CODECS:
        raise CIDError(
            f"CID {cid} uses codec {parsed.codec.name!r}; only raw and dag-pb", hint=_BAD_CID_HINT
        )
    if parsed.hashfun.name != "sha2-256":
        raise CIDError(
            f"CID {cid} uses hash {parsed.hashfun.name!r}; only sha2-256", hint=_BAD_CID_HINT
        )
    if len(parsed.raw_digest) != 32:
        raise CIDError(
            f"CID {cid} has a {len(parsed.raw_digest)}-byte sha2-256 digest", hint=_BAD_CID_HINT
        )
    return parsed


def normalize_cid(cid: str) -> str:
    """The one text form of a CID: base58btc "Qm..." for v0, base32 "baf..." for v1.

    Stores key blocks by this string so that one block never sits under two names.
    """
    if isinstance(cid, str) and _fast_parse(cid) is not None:
        return cid
    parsed = parse_cid(cid)
    if parsed.version == 0:
        return str(parsed)
    return str(parsed.set(base="base32"))


def cid_codec(cid: str) -> str:
    """The codec of a CID: "raw" or "dag-pb" (CIDError for anything else)."""
    fast = _fast_parse(cid) if isinstance(cid, str) else None
    if fast is not None:
        return fast[1]
    return str(parse_cid(cid).codec.name)


def verify_block(cid: str, data: bytes) -> None:
    """Raise CIDError unless sha2-256 of ``data`` is the digest inside ``cid``."""
    fast = _fast_parse(cid) if isinstance(cid, str) else None
    digest = fast[2] if fast is not None else bytes(parse_cid(cid).raw_digest)
    if hashlib.sha256(data).digest() != digest:
        raise CIDError(f"block {cid} does not match its CID: the data was altered")


@functools.lru_cache(maxsize=16384)  # multibase text encoding is the slow part of a walk
def _cid_string(cid_bytes: bytes) -> str:
    if (len(cid_bytes) == 34 and cid_bytes[:2] == _SHA2_256) or (
        len(cid_bytes) == 36
        and cid_bytes[0] == 1
        and cid_bytes[1] in _CODEC_NAMES
        and cid_bytes[2:4] == _SHA2_256
    ):
        return _cid_text(bytes(cid_bytes))  # one of the two forms made here: valid as is
    try:
        if len(cid_bytes) == 34 and cid_bytes[:2] == b"\x12\x20":
            text = str(CID("base58btc", 0, "dag-pb", cid_bytes))
        else:
            text = str(CID.decode(cid_bytes).set(base="base32"))
    except Exception as exc:
        raise CIDError(f"dag-pb link holds a malformed CID: {exc}") from None
    parse_cid(text)
    return text


def _decode_pb_node(data: bytes) -> tuple[list[tuple[str, int | None]], bytes | None]:
    """Parse a PBNode strictly: (links as (cid, tsize), Data or None)."""
    node_links: list[tuple[str, int | None]] = []
    node_data: bytes | None = None
    for field, wire_type, value in _fields(data):
        if field == 2 and wire_type == 2:
            if node_data is not None:
                raise CIDError("dag-pb block has Links after Data (non-canonical)")
            assert isinstance(value, bytes)
            node_links.append(_decode_pb_link(value))
        elif field == 1 and wire_type == 2:
            if node_data is not None:
                raise CIDError("dag-pb block has two Data fields")
            assert isinstance(value, bytes)
            node_data = value
        else:
            raise CIDError(f"dag-pb block has unexpected field {field} (wire type {wire_type})")
    return node_links, node_data


def _decode_pb_link(buf: bytes) -> tuple[str, int | None]:
    hash_bytes: bytes | None = None
    tsize: int | None = None
    seen: set[int] = set()
    last = 0
    for field, wire_type, value in _fields(buf):
        expected_type = 0 if field == 3 else 2
        if field not in (1, 2, 3) or wire_type != expected_type:
            raise CIDError(f"dag-pb link has unexpected field {field} (wire type {wire_type})")
        if field in seen or field < last:
            raise CIDError("dag-pb link fields are repeated or out of order")
        seen.add(field)
        last = field
        if field == 1:
            assert isinstance(value, bytes)
            hash_bytes = value
        elif field == 2:
            assert isinstance(value, bytes)
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise CIDError("dag-pb link name is not UTF-8") from None
        else:
            assert isinstance(value, int)
            tsize = value
    if hash_bytes is None:
        raise CIDError("dag-pb link without a Hash")
    return _cid_string(hash_bytes), tsize


def pb_links(data: bytes) -> list[tuple[str, int | None]]:
    """(child CID, Tsize) for every link of a dag-pb block, in order; CIDError if malformed."""
    return _decode_pb_node(bytes(data))[0]


def links(cid: str, data: bytes) -> list[str]:
    """Child CIDs of a block, in order: empty for raw blocks, the PBLinks for dag-pb."""
    if cid_codec(cid) == "raw":
        return []
    node_links, _ = _decode_pb_node(bytes(data))
    return [child for child, _ in node_links]


def unixfs_file_data(cid: str, data: bytes) -> bytes:
    """The file bytes a leaf block holds: the block itself (raw) or UnixFS ``Data`` (dag-pb).

    Internal dag-pb nodes hold no bytes of their own, so this returns b"" for them.
    """
    if cid_codec(cid) == "raw":
        return bytes(data)
    _, node_data = _decode_pb_node(bytes(data))
    if node_data is None:
        raise CIDError(f"dag-pb block {cid} has no UnixFS Data")
    kind: int | None = None
    payload = b""
    for field, wire_type, value in _fields(node_data):
        if field == 1 and wire_type == 0:
            assert isinstance(value, int)
            kind = value
        elif field == 2 and wire_type == 2:
            assert isinstance(value, bytes)
            payload = value
    if kind not in (0, _UNIXFS_FILE):  # 0 = Raw, 2 = File; both carry file bytes
        raise CIDError(f"dag-pb block {cid} is not a UnixFS file node (type {kind})")
    return payload


def unixfs_file_size(cid: str, data: bytes) -> int:
    """File size recorded in a root block: its length (raw) or the UnixFS ``filesize``."""
    if cid_codec(cid) == "raw":
        return len(data)
    _, node_data = _decode_pb_node(bytes(data))
    if node_data is None:
        raise CIDError(f"dag-pb block {cid} has no UnixFS Data")
    payload_len = 0
    for field, wire_type, value in _fields(node_data):
        if field == 3 and wire_type == 0:
            assert isinstance(value, int)
            return value
        if field == 2 and wire_type == 2:
            assert isinstance(value, bytes)
            payload_len = len(value)
    return payload_len


# --- the importer -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    cid: bytes  # binary CID
    tsize: int  # serialized size of the node plus everything under it
    filesize: int  # file bytes under it


def build_dag(
    data: bytes,
    cid_version: int = 1,
    *,
    raw_leaves: bool | None = None,
    chunk_size: int = CHUNK_SIZE,
    max_links: int = MAX_LINKS,
) -> tuple[str, list[Block]]:
    """Import ``data`` as a UnixFS file: (root CID, every block once, root last).

    The keyword options mirror ``ipfs add --raw-leaves --chunker=size-N`` and boxo's
    ``Maxlinks``; their defaults are kubo's, so only tests need to touch them. As in kubo,
    ``raw_leaves`` defaults to true for CIDv1 and false for CIDv0, and raw leaves are always
    CIDv1 even when the internal nodes are CIDv0.
    """
    blocks: dict[str, Block] = {}
    root = _import(data, cid_version, raw_leaves, chunk_size, max_links, blocks)
    ordered = [block for key, block in blocks.items() if key != root]
    ordered.append(blocks[root])
    return root, ordered


def read_file(cid: str, get_block: Callable[[str], bytes]) -> bytes:
    """Reassemble a UnixFS file from its root, asking ``get_block`` for each block.

    Depth-first, left to right; a stack of iterators keeps memory to one path. Verifying
    what ``get_block`` returns is the caller's job (both stores re-hash every block); the
    walk itself is the same whatever the blocks come from.
    """
    out = bytearray()
    stack = [iter([cid])]
    while stack:
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            continue
        block = get_block(child)
        out += unixfs_file_data(child, block)
        children = links(child, block)
        if children:
            stack.append(iter(children))
    return bytes(out)


def file_cid(data: bytes, cid_version: int = 1) -> str:
    """The CID kubo prints for ``ipfs add -Q --only-hash [--cid-version=1]`` of ``data``."""
    return _import(data, cid_version, None, CHUNK_SIZE, MAX_LINKS, None)


def _import(
    data: bytes,
    cid_version: int,
    raw_leaves: bool | None,
    chunk_size: int,
    max_links: int,
    blocks: dict[str, Block] | None,
) -> str:
    """The root CID; every block goes into ``blocks`` unless it is None (only the CID)."""
    if cid_version not in (0, 1):
        raise ValueError(f"cid_version must be 0 or 1, not {cid_version!r}")
    if chunk_size < 1 or max_links < 2:
        raise ValueError("chunk_size must be >= 1 and max_links >= 2")
    if raw_leaves is None:
        raw_leaves = cid_version == 1
    view = memoryview(bytes(data) if not isinstance(data, bytes) else data)

    def emit(block_data: bytes | memoryview, version: int, codec: str) -> bytes:
        cid = _cid_binary(block_data, version, codec)
        if blocks is not None:
            text = _cid_text(cid)
            if text not in blocks:
                blocks[text] = Block(text, bytes(block_data))
        return cid

    level: list[_Node] = []
    for start in range(0, max(len(view), 1), chunk_size):
        chunk = view[start : start + chunk_size]  # no copy unless a block is kept
        if raw_leaves:
            cid = emit(chunk, 1, "raw")
            level.append(_Node(cid, len(chunk), len(chunk)))
        else:
            leaf = _pb_leaf(chunk) if len(chunk) else _pb_node([], _unixfs_file(filesize=0))
            cid = emit(leaf, cid_version, "dag-pb")
            level.append(_Node(cid, len(leaf), len(chunk)))

    while len(level) > 1:
        parents: list[_Node] = []
        for start in range(0, len(level), max_links):
            children = level[start : start + max_links]
            sizes = tuple(child.filesize for child in children)
            unixfs = _unixfs_file(filesize=sum(sizes), blocksizes=sizes)
            encoded = _pb_node([(c.cid, c.tsize) for c in children], unixfs)
            cid = emit(encoded, cid_version, "dag-pb")
            tsize = len(encoded) + sum(child.tsize for child in children)
            parents.append(_Node(cid, tsize, sum(sizes)))
        level = parents

    return _cid_text(level[0].cid)
