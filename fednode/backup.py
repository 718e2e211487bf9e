"""A node's backup (`fednode backup`) and its restore (`fednode restore`).

A backup is one tar file (gzip-compressed unless its name ends in ``.tar``) holding:

    ledger.db                      a snapshot of the ledger, taken with SQLite's online
                                   backup API (fednode.ledger.backup_database): consistent
                                   while the node runs, nothing migrated
    store/blocks/<xy>/<cid>        every block of the embedded content store, each read
                                   through BlockStore.get_block, so verified against its CID
    store/pins/<cid>               the pins (empty files)
    identity.key, rotations.cbor,  only with ``--with-keys``: the node's private key, its
    identity.key.retired-<peer>    rotation statements and the keys it retired
    manifest.json                  last: format, version, the node's peer ID, when, the
                                   ledger's schema and every member's size and sha256

The ledger is copied before the blocks: the node writes a model's blocks before the ledger
row that names them, so every model the snapshot names is in the store when it is copied.

A backup file is untrusted input when it is restored (it may come from anywhere), so
``restore`` accepts only the member names above (a CID must be a CID, in its own shard),
regular files only (no links, devices or folders), each within a size bound, every member
once and as the manifest says (size and sha256), blocks that hash to their CID, and a
ledger that passes fednode.ledger.check_database (SQLite's quick_check, a known schema, an
intact hash chain). It extracts into a private temporary folder beside the target and
renames it into place only when all of that holds: a refused backup leaves nothing.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fednode import __version__
from fednode.files import private_dir
from fednode.home import NodeHome
from fednode.ledger import backup_database, check_database
from fednode.store import BlockStore
from protocol.cid import normalize_cid, verify_block
from protocol.errors import (
    BadBackup,
    CIDError,
    FednodeError,
    IdentityError,
    NotFound,
    UsageError,
)
from protocol.identity import Identity

FORMAT = "fednode-backup"
VERSION = 1
MANIFEST = "manifest.json"
LEDGER = "ledger.db"
KEY = "identity.key"
ROTATIONS = "rotations.cbor"

# Bounds on what a restore reads: a block is at most kubo's 1 MiB (fednode's are 256 KiB
# chunks and dag-pb nodes of at most 174 links), so 2 MiB leaves room; a key file is a
# 68-byte protobuf; the manifest's JSON is parsed in memory, and 64 MiB is ~400,000 blocks.
MAX_BLOCK = 2 << 20
MAX_KEY = 64 << 10
MAX_ROTATIONS = 16 << 20
MAX_MANIFEST = 64 << 20
MAX_MEMBERS = 1_000_000
COPY_CHUNK = 1 << 20

_SHA256 = re.compile(r"[0-9a-f]{64}")
_RETIRED = re.compile(r"identity\.key\.retired-(12D3KooW[1-9A-HJ-NP-Za-km-z]{44})")
_BLOCK = re.compile(r"store/blocks/([A-Za-z0-9]{2})/([A-Za-z0-9]+)")
_PIN = re.compile(r"store/pins/([A-Za-z0-9]+)")


# --- backup ------------------------------------------------------------------------------


@dataclass
class _Writer:
    """A tar being written, and the manifest's record of every member."""

    tar: tarfile.TarFile
    created: float
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes: int = 0

    def add(self, name: str, data: bytes) -> None:
        self.add_stream(name, io.BytesIO(data), len(data))

    def add_stream(self, name: str, stream: IO[bytes], size: int) -> None:
        digest = _HashingReader(stream)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o600, int(self.created)
        self.tar.addfile(info, digest)
        if digest.read_bytes != size:
            raise FednodeError(f"{name} changed size while it was copied", code="ERROR")
        self.members[name] = {"size": size, "sha256": digest.hash.hexdigest()}
        self.bytes += size


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it."""

    def __init__(self, inner: IO[bytes]) -> None:
        self.inner, self.hash, self.read_bytes = inner, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.hash.update(data)
        self.read_bytes += len(data)
        return data


def create_backup(
    data_dir: Path, output: Path, *, with_keys: bool = False, force: bool = False
) -> dict[str, Any]:
    """Write a backup of the node at ``data_dir`` to ``output`` (see the module's text).
    The node may be running. The file is written 0600 beside ``output`` and renamed into
    place, so a failed backup leaves no partial file."""
    home = NodeHome(data_dir)
    if not home.ledger_path.is_file():
        raise NotFound(
            f"no ledger at {home.ledger_path}",
            hint="pass the node's --data-dir (the folder holding ledger.db)",
        )
    if output.exists() and not force:
        raise UsageError(f"{output} exists", hint="pass --force to overwrite it")
    peer_id = None
    if home.key_path.exists():
        peer_id = home.identity().peer_id
    elif with_keys:
        raise IdentityError(f"--with-keys: no node identity in {home.root}")
    created = time.time()
    compress = not output.name.endswith(".tar")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {output}: the folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        # the ledger's snapshot waits beside the output, on a disk that must hold it anyway
        work_dir = tempfile.TemporaryDirectory(dir=parent, prefix=f".{output.name}.")
        with os.fdopen(fd, "wb") as raw, work_dir as work:
            os.chmod(raw.fileno(), 0o600)
            mode = "w:gz" if compress else "w"
            kwargs: dict[str, Any] = {"compresslevel": 6} if compress else {}
            with tarfile.open(fileobj=raw, mode=mode, format=tarfile.PAX_FORMAT, **kwargs) as tar:
                w = _Writer(tar, created)
                snapshot = Path(work) / LEDGER
                schema = backup_database(home.ledger_path, snapshot)
                with snapshot.open("rb") as f:
                    w.add_stream(LEDGER, f, snapshot.stat().st_size)
                snapshot.unlink()
                blocks, pins, damaged = _add_store(w, home.store_root)
                if with_keys:
                    _add_keys(w, home)
                manifest = {
                    "format": FORMAT,
                    "version": VERSION,
                    "peer_id": peer_id,
                    "created": created,
                    "fednode_version": __version__,
                    "schema_version": schema,
                    "with_keys": with_keys,
                    "members": w.members,
                }
                tar_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
                info = tarfile.TarInfo(MANIFEST)
                info.size, info.mode, info.mtime = len(tar_bytes), 0o600, int(created)
                tar.addfile(info, io.BytesIO(tar_bytes))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, output)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):  # a full disk, a file it may not read: said, not a trace
            raise _io_error(f"the backup to {output} failed", exc) from None
        raise
    return {
        "path": str(output),
        "size": output.stat().st_size,
        "compressed": compress,
        "peer_id": peer_id,
        "created": created,
        "schema_version": schema,
        "with_keys": with_keys,
        "members": len(w.members),
        "blocks": blocks,
        "pins": pins,
        "damaged": damaged,
        "bytes": w.bytes,
    }


def _add_store(w: _Writer, root: Path) -> tuple[int, int, list[dict[str, str]]]:
    """Every block (verified) and pin of the store at ``root``; a block that does not verify
    is left out and reported, never copied."""
    if not (root / "blocks").is_dir():
        return 0, 0, []
    store = BlockStore(root, fsync=False)
    blocks, damaged = 0, []
    for name in store.blocks():
        try:
            key = normalize_cid(name)
            data = store.get_block(key)
        except NotFound:
            continue  # collected (gc) after it was listed: nothing to keep
        except CIDError as err:
            damaged.append({"block": name, "error": err.message})
            continue
        w.add(f"store/blocks/{key[-3:-1]}/{key}", data)
        blocks += 1
    pins = 0
    for cid in store.pins():
        name = f"store/blocks/{cid[-3:-1]}/{cid}"
        if name in w.members:  # a pin whose block is not in the backup would not restore
            w.add(f"store/pins/{cid}", b"")
            pins += 1
    return blocks, pins, damaged


def _add_keys(w: _Writer, home: NodeHome) -> None:
    w.add(KEY, home.key_path.read_bytes())
    if home.rotations_path.is_file():
        w.add(ROTATIONS, home.rotations_path.read_bytes())
    for path in sorted(home.root.glob("identity.key.retired-*")):
        if _RETIRED.fullmatch(path.name) and path.is_file():
            w.add(path.name, path.read_bytes())


# --- restore -----------------------------------------------------------------------------


def _kind(name: str) -> str:
    """What a member name is, or BadBackup: only the names a backup writes are accepted,
    so no path can leave the target (no '..', no absolute path, no odd character)."""
    if name in (LEDGER, MANIFEST, KEY, ROTATIONS):
        return name
    if _RETIRED.fullmatch(name):
        return "retired"
    m = _BLOCK.fullmatch(name)
    if m:
        cid = _cid(name, m.group(2))
        if m.group(1) != cid[-3:-1] or m.group(2) != cid:
            raise BadBackup(f"member {_shown(name)}: a block stored under the wrong name")
        return "block"
    m = _PIN.fullmatch(name)
    if m:
        if _cid(name, m.group(1)) != m.group(1):
            raise BadBackup(f"member {_shown(name)}: a pin under a name that is not its CID")
        return "pin"
    raise BadBackup(f"member {_shown(name)}: not a name a fednode backup holds")


def _cid(member: str, text: str) -> str:
    try:
        return normalize_cid(text)
    except CIDError:
        raise BadBackup(f"member {_shown(member)}: {_shown(text)} is not a CID") from None


def _shown(name: str) -> str:
    """A member name as the error shows it: quoted, bounded (it is the file's words)."""
    return json.dumps(name[:200])


_BOUNDS = {
    MANIFEST: MAX_MANIFEST,
    KEY: MAX_KEY,
    "retired": MAX_KEY,
    ROTATIONS: MAX_ROTATIONS,
    "block": MAX_BLOCK,
    "pin": 0,
}


# what reading a damaged or foreign file raises: a tar, gzip or zlib error, or the end early
_UNREADABLE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
    """The members of the tar at ``path``, read as one stream (gzip or not), each checked
    for its kind before its bytes are read."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    what = (
                        "a symbolic link"
                        if info.issym()
                        else "a hard link"
                        if info.islnk()
                        else "a folder"
                        if info.isdir()
                        else "not a regular file"
                    )
                    raise BadBackup(f"member {_shown(info.name)} is {what}")
                stream = tar.extractfile(info)
                assert stream is not None  # a regular file always has one
                yield info, stream
    except _UNREADABLE as exc:
        raise BadBackup(f"{path} is not a readable tar file ({exc})") from None


def _copy(stream: IO[bytes], out: IO[bytes], size: int) -> str:
    h = hashlib.sha256()
    left = size
    while left > 0:
        chunk = stream.read(min(COPY_CHUNK, left))
        if not chunk:
            raise BadBackup("a member ends early: the file is truncated")
        h.update(chunk)
        out.write(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _read_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBackup(f"member {MANIFEST} is not JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BadBackup(f"member {MANIFEST} is not a fednode backup manifest")
    if manifest.get("version") != VERSION:
        raise BadBackup(
            f"member {MANIFEST}: backup format version {manifest.get('version')!r}; this "
            f"fednode reads version {VERSION}",
            hint="restore it with the fednode version that wrote it",
        )
    members = manifest.get("members")
    if not isinstance(members, dict):
        raise BadBackup(f"member {MANIFEST}: no members listed")
    for name, entry in members.items():
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        )
        if not ok:
            raise BadBackup(f"member {MANIFEST}: the entry of {_shown(name)} is malformed")
    if not isinstance(manifest.get("with_keys"), bool):
        raise BadBackup(f"member {MANIFEST}: with_keys is not true or false")
    peer = manifest.get("peer_id")
    if peer is not None and not isinstance(peer, str):
        raise BadBackup(f"member {MANIFEST}: peer_id is not text")
    return manifest


def _target_state(target: Path, force: bool) -> bool:
    """Whether ``target`` holds anything (refused without ``force``)."""
    if target.exists() and not target.is_dir():
        raise UsageError(f"--data-dir {target} is a file, not a folder")
    full = target.is_dir() and any(target.iterdir())
    if full and not force:
        raise UsageError(
            f"--data-dir {target} is not empty",
            hint="restore into a new folder, or pass --force to replace it (its contents "
            "are moved aside to a .replaced-TIME folder, not deleted)",
        )
    return full


def restore_backup(backup: Path, data_dir: Path, *, force: bool = False) -> dict[str, Any]:
    """Restore the backup file ``backup`` into the node directory ``data_dir``: all of it
    after every check has passed, or nothing (see the module's text)."""
    target = data_dir.expanduser()
    if not backup.is_file():
        raise NotFound(
            f"no backup file at {backup}", hint="give the path `fednode backup -o` wrote"
        )
    _target_state(target, force)  # refuse early, before reading anything
    private_dir(target.parent)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.restore-"))
    try:
        manifest, counts = _extract(backup, staging)
        replaced = _commit(staging, target, force)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _io_error(f"the restore into {target} failed", exc) from None
        raise
    return {
        "data_dir": str(target),
        "peer_id": manifest.get("peer_id"),
        "created": manifest.get("created"),
        "with_keys": manifest["with_keys"],
        "replaced": str(replaced) if replaced else None,
        **counts,
    }


def _extract(backup: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every member into ``staging``, checked; then the manifest against what was read."""
    try:
        return _extract_members(backup, staging)
    except _UNREADABLE as exc:  # raised while a member's bytes were read
        raise BadBackup(f"{backup} is damaged ({exc})") from None


def _extract_members(backup: Path, staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    free = shutil.disk_usage(staging).free
    seen: dict[str, dict[str, Any]] = {}
    pins: list[str] = []
    manifest: dict[str, Any] | None = None
    store: BlockStore | None = None
    total = 0
    for info, stream in _members(backup):
        name = info.name
        kind = _kind(name)
        if name in seen or (kind == MANIFEST and manifest is not None):
            raise BadBackup(f"member {_shown(name)} appears twice")
        if len(seen) >= MAX_MEMBERS:
            raise BadBackup(f"more than {MAX_MEMBERS:,} members")
        bound = _BOUNDS.get(kind)
        if bound is not None and info.size > bound:
            raise BadBackup(f"member {_shown(name)} is {info.size:,} bytes, over {bound:,}")
        total += info.size
        if total > free:
            raise FednodeError(
                f"{staging.parent} has {free:,} bytes free; the backup needs more",
                code="STORAGE_UNAVAILABLE",
                hint="free space, or restore onto another disk",
            )
        if kind == MANIFEST:
            manifest = _read_manifest(stream.read(info.size))
            continue
        if kind == "block":
            data = stream.read(info.size)
            cid = name.rsplit("/", 1)[1]
            try:
                verify_block(cid, data)
            except CIDError:
                raise BadBackup(
                    f"member {_shown(name)}: its bytes do not hash to its CID"
                ) from None
            store = store or BlockStore(staging / "store")
            store.put_block(cid, data)
            seen[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        elif kind == "pin":
            pins.append(name.rsplit("/", 1)[1])
            seen[name] = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        else:
            dest = staging / name
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                digest = _copy(stream, out, info.size)
                out.flush()
                os.fsync(out.fileno())
            seen[name] = {"size": info.size, "sha256": digest}
    if manifest is None:
        raise BadBackup(f"no {MANIFEST}: not a fednode backup")
    listed: dict[str, dict[str, Any]] = manifest["members"]
    for name in sorted(set(listed) | set(seen)):
        if name not in seen:
            raise BadBackup(f"member {_shown(name)} is in the manifest but not in the file")
        if name not in listed:
            raise BadBackup(f"member {_shown(name)} is not in the manifest")
        if listed[name]["size"] != seen[name]["size"]:
            raise BadBackup(f"member {_shown(name)}: its size differs from the manifest's")
        if listed[name]["sha256"] != seen[name]["sha256"]:
            raise BadBackup(f"member {_shown(name)}: its sha256 differs from the manifest's")
    if LEDGER not in seen:
        raise BadBackup(f"no {LEDGER}: a backup holds the node's ledger")
    try:
        ledger = check_database(staging / LEDGER)
    except ValueError as exc:
        raise BadBackup(f"member {LEDGER}: {exc}") from None
    for cid in pins:
        if store is None or not store.has(cid):
            raise BadBackup(f"member store/pins/{cid}: its block is not in the backup")
        store.pin(cid)
    if manifest["with_keys"] != (KEY in seen):
        raise BadBackup(f"member {MANIFEST}: with_keys does not match the members")
    if KEY in seen:
        try:
            peer = Identity.load(staging / KEY).peer_id
        except IdentityError as exc:
            raise BadBackup(f"member {KEY}: {exc.message}") from None
        if peer != manifest.get("peer_id"):
            raise BadBackup(f"member {KEY}: its peer ID is not the manifest's peer_id")
    blocks = sum(1 for n in seen if n.startswith("store/blocks/"))
    return manifest, {
        "schema_version": ledger["schema_version"],
        "events": ledger["events"],
        "blocks": blocks,
        "pins": len(pins),
        "bytes": sum(s["size"] for s in seen.values()),
    }


def _commit(staging: Path, target: Path, force: bool) -> Path | None:
    """Rename the checked ``staging`` folder into ``target``; with ``force`` a non-empty
    target is moved aside first (refused while a node runs on it), and back on failure."""
    os.chmod(staging, 0o700)
    if not _target_state(target, force):  # absent or empty: one rename (over an empty one)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        return None
    home = NodeHome(target)
    home.lock()  # ALREADY_RUNNING while a node uses it
    aside = target.with_name(f"{target.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
    try:
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except OSError:
            os.replace(aside, target)
            raise
    finally:
        home.unlock()
    _fsync_dir(target.parent)
    return aside


def _io_error(what: str, exc: OSError) -> FednodeError:
    return FednodeError(
        f"{what}: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}",
        code="STORAGE_UNAVAILABLE",
        hint="check the disk's free space and the files' permissions; nothing was left behind",
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
