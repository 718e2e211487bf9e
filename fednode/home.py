"""A node's data directory: where its key, ledger, content store and lock live.

DIR/identity.key   Ed25519 key (libp2p protobuf), mode 0600
DIR/ledger.db      the SQLite quality ledger (WAL: ledger.db-wal, ledger.db-shm)
DIR/store/         content-addressed blocks
DIR/node.lock      held (flock) while a node runs, so a second one refuses to start
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from fednode.files import private_dir
from protocol.envelope import decode, encode
from protocol.errors import FednodeError, IdentityError
from protocol.identity import Identity
from protocol.rotation import Rotation, rotate


def default_home() -> Path:
    env = os.environ.get("FEDNODE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".fednode"


class NodeHome:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root else default_home()
        self._lock_fd: int | None = None

    @property
    def key_path(self) -> Path:
        return self.root / "identity.key"

    @property
    def ledger_path(self) -> Path:
        return self.root / "ledger.db"

    @property
    def store_root(self) -> Path:
        return self.root / "store"

    def init(self) -> tuple[Identity, bool]:
        """Create the directory and key if missing; returns (identity, created)."""
        private_dir(self.root)
        if self.key_path.exists():
            return Identity.load(self.key_path), False
        ident = Identity.generate()
        ident.save(self.key_path)
        return ident, True

    def identity(self) -> Identity:
        if not self.key_path.exists():
            raise IdentityError(
                f"no node identity in {self.root}",
                hint=f"run `fednode init --data-dir {self.root}` first",
            )
        return Identity.load(self.key_path)

    @property
    def rotations_path(self) -> Path:
        return self.root / "rotations.cbor"

    def chain(self) -> list[Rotation]:
        """This node's key-rotation statements, oldest first (empty if never rotated)."""
        if not self.rotations_path.exists():
            return []
        items = decode(self.rotations_path.read_bytes(), what="rotations.cbor")
        return [Rotation(i["old"], i["new"], float(i["ts"]), i["sig"]) for i in items]

    def rotate_key(self) -> tuple[Identity, Identity]:
        """A new identity key signed over by the old one; the old key is kept, retired.

        The chain is written before the key is swapped, and both writes are atomic
        renames, so a crash leaves either the old key or the new key with its statement.
        """
        old = self.identity()
        new = Identity.generate()
        chain = [*self.chain(), rotate(old, new, time.time())]
        tmp_chain = self.rotations_path.with_suffix(".tmp")
        tmp_chain.write_bytes(encode([r.to_wire() for r in chain]))
        tmp_key = self.root / "identity.key.new"
        tmp_key.unlink(missing_ok=True)
        new.save(tmp_key)
        retired = self.root / f"identity.key.retired-{old.peer_id}"
        os.link(self.key_path, retired)  # keep the old key (0600) for audit
        os.replace(tmp_chain, self.rotations_path)
        os.replace(tmp_key, self.key_path)
        return old, new

    def lock(self) -> None:
        """Take the node lock or refuse: two nodes on one ledger would corrupt it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FednodeError(
                f"another fednode (pid {other}) is running on {self.root}",
                code="ALREADY_RUNNING",
                hint="stop it first, or give this node its own --data-dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
