"""Files and folders only the node's user may read: 0600 and 0700, by construction.

A node's key, ledger and blocks are its own (the ledger says who took part in what; the
store holds the models), so every folder a node or fedctl makes goes through
``private_dir``, which also narrows a folder that already exists with wider modes (made by
an older version or by hand). Files are created 0600 where they are opened; the process
umask (0o077, set by ``fednode`` and ``fedctl`` at start) covers what libraries create.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_dir(path: Path) -> Path:
    """``path`` and its missing parents made 0700; an existing ``path`` narrowed to 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
