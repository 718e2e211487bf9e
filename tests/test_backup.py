"""`fednode backup` and `fednode restore` (fednode/backup.py).

The end-to-end test backs up a coordinator while it runs a session (real processes), kills
it, restores the backup into a new directory, checks the restored ledger with `fedctl ledger
verify`, starts a coordinator there (same key, same port) and lets it finish the session.
The other tests run in-process on a small node directory: a round trip (ledger, blocks,
pins, modes, the key only when asked), and hostile backup files (a member name that climbs
out, an absolute path, a symbolic link, a hard link, a hash or size other than the
manifest's, a block that is not its CID, a member the manifest lacks, a tampered ledger),
each refused with BAD_BACKUP naming the member and nothing written.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fednode.backup import BadBackup, create_backup, restore_backup
from fednode.home import NodeHome
from fednode.ledger import Ledger
from fednode.store import BlockStore
from protocol.errors import FednodeError
from protocol.identity import Identity
from tests.conftest import Cluster, cli, cli_json, start_cluster
from tests.test_quality_e2e import future_ids, online, until
from tests.test_resume_e2e import check_ledger, restart_coordinator, run_until_ended
from tests.test_resume_e2e import wait_for_round as wait_for_round_started
from tests.test_rollback import admin, events

pytestmark = pytest.mark.timeout(180)


# --- a running coordinator, backed up and restored ---------------------------------------


@pytest.fixture
def fed(tmp_path: Path) -> Iterator[Cluster]:
    c = start_cluster(tmp_path, 0, "--heartbeat", "0.5")
    c.ready["operator"] = Identity.load(c.operator_key).peer_id
    try:
        yield c
    finally:
        c.procs.stop_all()


@pytest.mark.slow  # ~35 s of four processes; the fast tests below cover backup while a
# process writes, restore, and `fedctl ledger verify` of the restored ledger
def test_a_backup_taken_mid_session_restores_and_the_session_completes(
    fed: Cluster, tmp_path: Path
) -> None:
    rounds = 6
    ids = future_ids(fed, 2)
    sid = admin(
        fed,
        "session.create",
        spec={"name": "bk", "rounds": rounds, "participants": ids, "min_participants": 2},
    )["session_id"]
    for k in range(2):
        fed.start_participant(k, 2, "--train-delay", "0.4")
    asyncio.run(until(fed, online(2), timeout=120))
    admin(fed, "session.start", session_id=sid)
    wait_for_round_started(fed, sid, 3)  # rounds 1 and 2 are committed: the middle of it

    # in-process, so that it is taken at once (the CLI is tested below); the node runs on
    out = create_backup(fed.coordinator_home.root, tmp_path / "c.tgz", with_keys=True)
    assert out["with_keys"] and out["peer_id"] == fed.peer_id, out
    assert out["blocks"] > 0 and out["pins"] > 0 and out["damaged"] == []
    backed = _completed_rounds(tmp_path / "c.tgz")
    assert {1, 2} <= backed and len(backed) < rounds, backed  # taken while the session ran

    restored = tmp_path / "restored"
    got = cli_json("fednode", "restore", str(tmp_path / "c.tgz"), "--data-dir", str(restored))
    assert got["ok"] and got["peer_id"] == fed.peer_id and got["with_keys"], got
    verify = cli_json("ledger", "verify", "--data-dir", str(restored))
    assert verify["intact"] is True and verify["events"] == got["events"] > 0, verify

    # the machine is lost: the coordinator dies; it comes back from the backup, with the
    # same key on the same port, and the participants find it again
    fed.coordinator_dir = restored
    restart_coordinator(fed, 0, signal.SIGKILL)
    final = run_until_ended(fed, sid)
    assert final["status"] == "completed" and final["rounds_completed"] == rounds, final
    assert final["restarts"] == 1  # the restored ledger knew the session was running
    check_ledger(fed, sid, rounds)  # every round once, an unbroken lineage, chain verifies
    (restarted,) = events(fed, sid, "coordinator_restarted")
    assert restarted["restarts"] == 1


def _completed_rounds(backup: Path) -> set[int]:
    """The rounds the backup's ledger holds as completed (read from the tar, not restored)."""
    with tarfile.open(backup) as tar:
        data = tar.extractfile("ledger.db").read()  # type: ignore[union-attr]
    path = backup.with_suffix(".probe.db")
    path.write_bytes(data)
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT round FROM training_rounds WHERE status = 'completed'")
        return {r[0] for r in rows}
    finally:
        db.close()
        path.unlink()


# --- in-process: a small node directory ----------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> NodeHome:
    """A node directory: key, a ledger with a session's events, two models (one pinned,
    one over a block boundary)."""
    home = NodeHome(tmp_path / "node")
    home.init()
    with Ledger(home.ledger_path) as ledger:
        ledger.create_session(
            "s-1", name="n", spec={}, strategy="fedavg", secure_aggregation=False, rounds=2,
            created_at=1.0,
        )  # fmt: skip
        for k in range(3):
            ledger.append_event("note", session_id="s-1", data={"k": k})
    store = BlockStore(home.store_root)
    store.put(os.urandom(300_000))  # two leaves and a root, pinned
    store.put(b"unpinned", pin=False)
    return home


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("ledger.db")
    }


def test_round_trip_keeps_the_ledger_blocks_and_pins_private_and_without_the_key(
    node: NodeHome, tmp_path: Path
) -> None:
    out = create_backup(node.root, tmp_path / "b.tar.gz")
    assert out["blocks"] == 4 and out["pins"] == 1 and not out["with_keys"]
    assert stat.S_IMODE((tmp_path / "b.tar.gz").stat().st_mode) == 0o600
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        names = tar.getnames()
    assert "identity.key" not in names and names[-1] == "manifest.json"

    target = tmp_path / "restored"
    got = restore_backup(tmp_path / "b.tar.gz", target)
    assert got["events"] == 3 and got["blocks"] == 4 and got["pins"] == 1
    assert not (target / "identity.key").exists()
    assert _files(target) == {k: v for k, v in _files(node.root).items() if k != "identity.key"}
    for p in [target, *target.rglob("*")]:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, p
    store = BlockStore(target / "store")
    assert store.pins() == BlockStore(node.store_root).pins()
    with Ledger(target / "ledger.db") as ledger:
        assert ledger.verify_chain() == (True, None) and ledger.event_count() == 3
        assert ledger.get_session("s-1")["rounds"] == 2


WRITER = """
import sys, time
from fednode.ledger import Ledger
path, ready, stop = sys.argv[1:]
with Ledger(path, busy_timeout_s=5) as led:
    end = time.monotonic() + 30
    n = 0
    while time.monotonic() < end:
        led.append_event("tick", session_id="s-1", data={"n": n})
        n += 1
        if n == 50:
            open(ready, "w").close()
        if n % 50 == 0 and __import__("os").path.exists(stop):
            break
print(n)
"""


def test_a_backup_while_another_process_writes_restores_a_whole_snapshot(
    node: NodeHome, tmp_path: Path
) -> None:
    """The ledger is written by another process throughout the backup (as a running node
    writes it): the copy is one consistent snapshot, whose restored chain verifies."""
    ready, stop = tmp_path / "ready", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(node.ledger_path), str(ready), str(stop)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # polled: the writer has started writing
            assert writer.poll() is None and time.monotonic() < deadline, "writer did not start"
            time.sleep(0.02)
        out = create_backup(node.root, tmp_path / "b.tgz")
    finally:
        stop.touch()
        written = int(writer.communicate(timeout=60)[0])
    got = restore_backup(tmp_path / "b.tgz", tmp_path / "restored")
    assert 3 + 50 <= got["events"] <= 3 + written, (got["events"], written)
    assert out["schema_version"] == got["schema_version"]
    verify = cli_json("ledger", "verify", "--data-dir", str(tmp_path / "restored"))
    assert verify["intact"] is True and verify["events"] == got["events"]


def test_with_keys_the_node_keeps_its_identity_and_the_tool_says_the_file_is_secret(
    node: NodeHome, tmp_path: Path
) -> None:
    backup = tmp_path / "k.tar"  # .tar: not compressed
    done = cli("fednode", "backup", "--data-dir", str(node.root), "-o", str(backup), "--with-keys")
    assert done.returncode == 0, done.stderr
    assert "holds the node's private key" in " ".join(done.stderr.split())  # rich wraps
    with tarfile.open(backup, "r:") as tar:  # plain tar, as the name says
        assert "identity.key" in tar.getnames()
    got = restore_backup(backup, tmp_path / "again")
    assert got["with_keys"] and got["peer_id"] == node.identity().peer_id
    assert NodeHome(tmp_path / "again").identity().peer_id == node.identity().peer_id
    again = cli("fednode", "backup", "--data-dir", str(node.root), "-o", str(backup))
    assert again.returncode == 2 and "--force" in again.stderr  # an existing file is kept


def test_a_non_empty_target_is_refused_unless_forced_and_then_moved_aside(
    node: NodeHome, tmp_path: Path
) -> None:
    create_backup(node.root, tmp_path / "b.tgz")
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine").write_text("keep me")
    with pytest.raises(FednodeError) as err:
        restore_backup(tmp_path / "b.tgz", target)
    assert err.value.code == "USAGE" and "--force" in err.value.hint
    assert os.listdir(target) == ["mine"]
    got = restore_backup(tmp_path / "b.tgz", target, force=True)
    assert (Path(got["replaced"]) / "mine").read_text() == "keep me"
    assert (target / "ledger.db").is_file() and not (target / "mine").exists()


def test_a_damaged_block_is_left_out_and_reported(node: NodeHome, tmp_path: Path) -> None:
    store = BlockStore(node.store_root)
    cid = store.put(b"to be damaged", pin=False)
    path = node.store_root / "blocks" / cid[-3:-1] / cid
    path.write_bytes(b"rot")
    out = create_backup(node.root, tmp_path / "b.tgz")
    assert [d["block"] for d in out["damaged"]] == [cid] and out["blocks"] == 4
    with tarfile.open(tmp_path / "b.tgz") as tar:
        assert not any(cid in n for n in tar.getnames())


# --- hostile backup files -------------------------------------------------------------------


def _members(backup: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(backup) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def _reg(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o600
    return info, data


def _with_manifest(
    members: list[tuple[tarfile.TarInfo, bytes]], extra: dict[str, bytes]
) -> list[tuple[tarfile.TarInfo, bytes]]:
    """``members`` plus ``extra`` files, the manifest (last) listing the extras honestly."""
    *body, (minfo, mdata) = members
    manifest = json.loads(mdata)
    for name, data in extra.items():
        manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        body.append(_reg(name, data))
    return [*body, (minfo, json.dumps(manifest).encode())]


def _hostile_cases(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (backup file, the member the error must name)."""
    members = _members(good)
    cases: dict[str, tuple[Path, str]] = {}

    cases["traversal"] = (
        _write(tmp / "t.tgz", _with_manifest(members, {"../escaped": b"x"})),
        "../escaped",
    )
    cases["nested traversal"] = (
        _write(tmp / "n.tgz", _with_manifest(members, {"store/blocks/../../../x": b"x"})),
        "store/blocks/../../../x",
    )
    cases["absolute"] = (
        _write(tmp / "a.tgz", _with_manifest(members, {"/tmp/fednode-absolute": b"x"})),
        "/tmp/fednode-absolute",
    )
    link = tarfile.TarInfo("identity.key")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    cases["symlink"] = (_write(tmp / "s.tgz", [(link, b""), *members]), "identity.key")
    hard = tarfile.TarInfo("rotations.cbor")
    hard.type, hard.linkname = tarfile.LNKTYPE, "ledger.db"
    cases["hard link"] = (
        _write(tmp / "h.tgz", [*members[:1], (hard, b""), *members[1:]]),
        "rotations.cbor",
    )

    tampered = []
    for info, data in members:
        if info.name == "ledger.db":
            data = data[:-1] + bytes([data[-1] ^ 1])  # the manifest still has the old hash
        tampered.append((info, data))
    cases["hash mismatch"] = (_write(tmp / "m.tgz", tampered), "ledger.db")

    swapped = []
    for info, data in members:
        if info.name.startswith("store/blocks/") and len(data) > 1000:
            data = bytes(len(data))  # same size, other bytes: not the CID's block
        swapped.append((info, data))
    block = next(i.name for i, d in members if i.name.startswith("store/blocks/") and len(d) > 1000)
    cases["block not its CID"] = (_write(tmp / "c.tgz", swapped), block)

    unlisted = [*members[:-1], _reg("rotations.cbor", b"\x80"), members[-1]]
    cases["not in the manifest"] = (_write(tmp / "u.tgz", unlisted), "rotations.cbor")

    cases["missing member"] = (_write(tmp / "x.tgz", members[1:]), "ledger.db")
    cases["not a tar"] = (tmp / "junk.tgz", "")
    (tmp / "junk.tgz").write_bytes(b"\x1f\x8b" + os.urandom(500))
    return cases


@pytest.fixture
def good_backup(node: NodeHome, tmp_path: Path) -> Path:
    out = tmp_path / "good.tgz"
    create_backup(node.root, out, with_keys=True)
    return out


@pytest.mark.parametrize(
    "case",
    [
        "traversal",
        "nested traversal",
        "absolute",
        "symlink",
        "hard link",
        "hash mismatch",
        "block not its CID",
        "not in the manifest",
        "missing member",
        "not a tar",
    ],
)
def test_a_hostile_backup_is_refused_and_nothing_is_written(
    case: str, good_backup: Path, tmp_path: Path
) -> None:
    work = tmp_path / "cases"
    work.mkdir()
    path, member = _hostile_cases(good_backup, work)[case]
    parent = tmp_path / "restore-here"
    parent.mkdir()
    with pytest.raises(BadBackup) as err:
        restore_backup(path, parent / "node")
    assert err.value.code == "BAD_BACKUP"
    assert member in err.value.message, err.value.message
    assert os.listdir(parent) == []  # no target, no temporary folder left behind
    assert not Path("/tmp/fednode-absolute").exists()
    assert not (tmp_path / "escaped").exists() and not (parent / "escaped").exists()


def test_a_tampered_ledger_with_a_matching_manifest_is_refused(
    good_backup: Path, tmp_path: Path
) -> None:
    """The manifest is the file's own claim: a backup rebuilt around an edited ledger has
    consistent hashes, so restore checks the ledger's hash chain itself."""
    members = _members(good_backup)
    edited = tmp_path / "edited.db"
    edited.write_bytes(next(d for i, d in members if i.name == "ledger.db"))
    db = sqlite3.connect(edited)
    db.execute("UPDATE events SET data = '{\"k\": 99}' WHERE id = 2")
    db.commit()
    db.close()
    data = edited.read_bytes()
    *body, (minfo, mdata) = members
    manifest = json.loads(mdata)
    manifest["members"]["ledger.db"] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    body = [(i, data if i.name == "ledger.db" else d) for i, d in body]
    bad = _write(tmp_path / "t.tgz", [*body, (minfo, json.dumps(manifest).encode())])
    with pytest.raises(BadBackup) as err:
        restore_backup(bad, tmp_path / "target")
    assert "ledger.db" in err.value.message and "hash chain breaks at event 2" in err.value.message
    assert not (tmp_path / "target").exists()


def test_restore_by_the_cli_refuses_with_the_code_and_exit_1(
    good_backup: Path, tmp_path: Path
) -> None:
    path, _ = _hostile_cases(good_backup, tmp_path)["traversal"]
    got = cli("fednode", "restore", str(path), "--data-dir", str(tmp_path / "n"), "--json")
    assert got.returncode == 1, got.stdout + got.stderr
    error = json.loads(got.stdout)["error"]
    assert error["code"] == "BAD_BACKUP" and "../escaped" in error["message"]
    assert not (tmp_path / "n").exists()
