"""CAR v1 archives of a model's DAG: what ``ipfs dag import`` / ``ipfs dag export`` exchange.

Why this exists: an operator must be able to hand a model to any IPFS implementation (or
archive it) as one file that keeps every block and its CID, so that the receiver can check
every byte against the CID it was told, with no fednode involved. CAR v1 is that file.

The format, as the CARv1 specification (ipld/specs, now ipld/ipld
``specs/transport/car/carv1/index.md``, https://ipld.io/specs/transport/car/carv1/) gives it::

    varint(len(header)) | header | section | section | ...
    header  = DAG-CBOR {"roots": [CID, ...], "version": 1}, CIDs as CBOR tag 42 around the
              CID's binary form prefixed with the 0x00 multibase byte
    section = varint(len(cid bytes) + len(data)) | cid bytes | data

The CID in a section is raw bytes with no length of its own: a CIDv0 is the 34-byte
multihash ``12 20 <digest>``, a CIDv1 is ``varint(1) varint(codec) varint(hash) varint(len)
<digest>``.

:func:`encode_car` writes exactly one root and the blocks in the order given; with the order
of :func:`walk_dag` (depth first, each block once where first seen) that is the layout go-car
and ``ipfs dag export`` produce. :func:`decode_car` trusts nothing: it checks the header,
re-hashes every block against its CID and checks that every root is present. Only what
``protocol.cid`` can verify is accepted (sha2-256, raw or dag-pb); anything else is refused
with an error that names it. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import cbor2
from multiformats import CID

from protocol.cid import Block, links, normalize_cid, parse_cid, varint, verify_block
from protocol.errors import CIDError, DecodeError

__all__ = ["Car", "decode_car", "encode_car", "walk_dag"]

_CID_TAG = 42
_RAW, _DAG_PB, _SHA2_256 = 0x55, 0x70, 0x12
_MAX_HEADER = 1 << 20  # a one-root header is ~60 bytes; anything near this is not a CAR
_BAD_CAR = "CAR_INVALID"
_BAD_CAR_HINT = "the file is not a complete CAR v1 of a fednode model; export it again"


@dataclass(frozen=True)
class Car:
    """A decoded CAR: its roots and its blocks (each verified, each once, in file order)."""

    roots: list[str]
    blocks: list[Block]

    def block_map(self) -> dict[str, bytes]:
        return {block.cid: block.data for block in self.blocks}


# --- varints (unsigned LEB128, as multiformats' unsigned-varint) -----------------------------


def _read_varint(buf: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    start = pos
    while True:
        if pos >= len(buf):
            raise DecodeError(
                f"CAR truncated in the {what} at byte {start}", code=_BAD_CAR, hint=_BAD_CAR_HINT
            )
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if pos - start > 1 and byte == 0:
                raise DecodeError(
                    f"CAR has a non-minimal varint in the {what} at byte {start}",
                    code=_BAD_CAR,
                    hint=_BAD_CAR_HINT,
                )
            return result, pos
        shift += 7
        if shift >= 63:
            raise DecodeError(
                f"CAR varint in the {what} at byte {start} is longer than 9 bytes",
                code=_BAD_CAR,
                hint=_BAD_CAR_HINT,
            )


# --- CIDs in binary form -------------------------------------------------------------------


def _cid_bytes(cid: str) -> bytes:
    """The binary CID of a CID string (CIDv0: the bare multihash)."""
    return bytes(parse_cid(cid))


def _read_cid(buf: memoryview, pos: int, end: int) -> tuple[str, int]:
    """Decode the binary CID at ``pos`` of a section ending at ``end``: (CID text, next)."""
    if end - pos >= 34 and buf[pos] == _SHA2_256 and buf[pos + 1] == 0x20:
        raw = bytes(buf[pos : pos + 34])
        return str(CID("base58btc", 0, "dag-pb", raw)), pos + 34
    start = pos
    version, pos = _read_varint(buf, pos, "section CID")
    if version != 1:
        raise CIDError(f"CAR section at byte {start} holds a CID of version {version}")
    codec, pos = _read_varint(buf, pos, "section CID")
    hash_code, pos = _read_varint(buf, pos, "section CID")
    length, pos = _read_varint(buf, pos, "section CID")
    if codec not in (_RAW, _DAG_PB):
        raise CIDError(
            f"CAR section at byte {start} has codec 0x{codec:x}; only raw (0x55) and "
            "dag-pb (0x70) blocks make up a model",
        )
    if hash_code != _SHA2_256 or length != 32:
        raise CIDError(
            f"CAR section at byte {start} uses hash 0x{hash_code:x} of {length} bytes; "
            "only sha2-256 can be verified here",
        )
    if pos + length > end:
        raise DecodeError(
            f"CAR section at byte {start}: its CID runs past the section",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    raw = bytes(buf[start : pos + length])
    return str(CID.decode(raw).set(base="base32")), pos + length


# --- the header ----------------------------------------------------------------------------


def _header_bytes(root: str) -> bytes:
    tagged = cbor2.CBORTag(_CID_TAG, b"\x00" + _cid_bytes(root))
    return cbor2.dumps({"roots": [tagged], "version": 1}, canonical=True)


class _Link:
    """A tag-42 value seen while decoding the header (the only tag a CAR header may hold)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _tag_hook(*args: Any) -> Any:
    # cbor2 5.x calls hook(decoder, tag), 6.x hook(tag, immutable): take the tag either way.
    tag = next(arg for arg in args if isinstance(arg, cbor2.CBORTag))
    if tag.tag != _CID_TAG:
        raise DecodeError(
            f"CAR header holds CBOR tag {tag.tag}; only tag 42 (a CID) is allowed",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    return _Link(tag.value)


def _parse_header(data: bytes) -> list[str]:
    try:
        header = cbor2.loads(data, tag_hook=_tag_hook)
    except DecodeError:
        raise
    except Exception as exc:  # cbor2 raises many types
        raise DecodeError(
            f"CAR header is not valid CBOR: {type(exc).__name__}: {exc}",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        ) from None
    if not isinstance(header, dict):
        raise DecodeError(
            f"CAR header is a CBOR {type(header).__name__}, not a map",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    version = header.get("version")
    if version != 1 or isinstance(version, bool):
        extra = (
            " (a CARv2: convert it with `ipfs dag export` or go-car to v1)" if version == 2 else ""
        )
        raise DecodeError(
            f"CAR header has version {version!r}; only version 1 is read{extra}",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    unknown = sorted(str(k) for k in header if k not in ("roots", "version"))
    if unknown:
        raise DecodeError(
            f"CAR header has unknown keys {unknown}", code=_BAD_CAR, hint=_BAD_CAR_HINT
        )
    roots = header.get("roots")
    if not isinstance(roots, list) or not roots:
        raise DecodeError(
            "CAR header has no roots (it needs at least one CID)",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    out = []
    for i, link in enumerate(roots):
        if not isinstance(link, _Link) or not isinstance(link.value, bytes):
            raise DecodeError(
                f"CAR header root {i} is not a CID (CBOR tag 42 around bytes)",
                code=_BAD_CAR,
                hint=_BAD_CAR_HINT,
            )
        raw = link.value
        if raw[:1] != b"\x00":
            raise DecodeError(
                f"CAR header root {i} lacks the 0x00 multibase prefix of a binary CID",
                code=_BAD_CAR,
                hint=_BAD_CAR_HINT,
            )
        view = memoryview(raw)
        cid, pos = _read_cid(view, 1, len(raw))
        if pos != len(raw):
            raise DecodeError(
                f"CAR header root {i} has {len(raw) - pos} bytes after its CID",
                code=_BAD_CAR,
                hint=_BAD_CAR_HINT,
            )
        out.append(normalize_cid(cid))
    return out


# --- encoding and decoding -----------------------------------------------------------------


def encode_car(root: str, blocks: Iterable[Block]) -> bytes:
    """A CAR v1 with one root and ``blocks`` in the order given (each re-hashed first)."""
    header = _header_bytes(root)
    out = bytearray(varint(len(header)))
    out += header
    for block in blocks:
        verify_block(block.cid, block.data)
        cid = _cid_bytes(block.cid)
        out += varint(len(cid) + len(block.data))
        out += cid
        out += block.data
    return bytes(out)


def decode_car(data: bytes) -> Car:
    """Parse and verify a CAR v1: header, every block's hash, every root present.

    DecodeError (code CAR_INVALID) for a malformed file, CIDError for a block whose bytes do
    not hash to its CID or a CID this project cannot verify.
    """
    buf = memoryview(bytes(data))
    length, pos = _read_varint(buf, 0, "header length")
    if length == 0 or length > _MAX_HEADER:
        raise DecodeError(
            f"CAR header length {length} is not in 1..{_MAX_HEADER}",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    if pos + length > len(buf):
        raise DecodeError(
            f"CAR truncated: the header needs {length} bytes, {len(buf) - pos} remain",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    roots = _parse_header(bytes(buf[pos : pos + length]))
    pos += length
    blocks: dict[str, Block] = {}
    while pos < len(buf):
        start = pos
        length, pos = _read_varint(buf, pos, "section length")
        end = pos + length
        if length == 0 or end > len(buf):
            raise DecodeError(
                f"CAR section at byte {start} claims {length} bytes, {len(buf) - pos} remain",
                code=_BAD_CAR,
                hint=_BAD_CAR_HINT,
            )
        cid, pos = _read_cid(buf, pos, end)
        key = normalize_cid(cid)
        block = bytes(buf[pos:end])
        try:
            verify_block(key, block)
        except CIDError:
            raise CIDError(
                f"CAR section at byte {start}: block {key} does not hash to its CID",
            ) from None
        blocks.setdefault(key, Block(key, block))
        pos = end
    missing = [root for root in roots if root not in blocks]
    if missing:
        raise DecodeError(
            f"CAR root {missing[0]} is not among its {len(blocks)} blocks",
            code=_BAD_CAR,
            hint=_BAD_CAR_HINT,
        )
    return Car(roots, list(blocks.values()))


def walk_dag(root: str, get_block: Callable[[str], bytes]) -> Iterator[Block]:
    """Every block under ``root``, depth first, left to right, each once where first seen.

    ``get_block`` is the caller's (a store's verified read); this function only decides the
    order, the one go-car and ``ipfs dag export`` write.
    """
    seen: set[str] = set()
    stack: list[Iterator[str]] = [iter([root])]
    while stack:
        cid = next(stack[-1], None)
        if cid is None:
            stack.pop()
            continue
        key = normalize_cid(cid)
        if key in seen:
            continue
        seen.add(key)
        data = get_block(key)
        yield Block(key, data)
        children = links(key, data)
        if children:
            stack.append(iter(children))
