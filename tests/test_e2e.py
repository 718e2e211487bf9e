"""End to end: real fednode processes on 127.0.0.1 driven by the real fedctl CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from fedctl.client import AdminClient, Target
from protocol.cid import file_cid
from tests.conftest import Cluster, cli, cli_json
from tests.test_quality_e2e import until
from tests.test_storage_e2e import wait_status


def _spec(path: Path, cluster: Cluster, **top: object) -> Path:
    """A spec that admits the cluster's participants by listing their peer IDs."""
    top.setdefault("participants", cluster.peer_ids)
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in top.items())
    path.write_text(text + "\n")
    return path


def test_manual_walkthrough(cluster3: Cluster, tmp_path: Path) -> None:
    """The README's by-hand session: init a spec, create, start, watch, status, model get."""
    spec = tmp_path / "spec.toml"
    assert cli_json("session", "init", str(spec))["path"] == str(spec)
    ids = json.dumps(cluster3.peer_ids)
    text = spec.read_text().replace("rounds = 10 ", "rounds = 3  ")
    text = text.replace("participants = []", f"participants = {ids}")
    spec.write_text(text)

    sid = cli_json("session", "create", str(spec), target=cluster3)["session_id"]
    assert cli_json("session", "start", sid, target=cluster3)["status"] == "running"

    watch = cli("session", "watch", sid, "--json", target=cluster3, check=True)
    events = [json.loads(line) for line in watch.stdout.splitlines()]
    assert events[0]["kind"] == "snapshot"
    # rounds that ended before the watch subscribed are in its snapshot's recent events
    before = [e for e in events[0]["data"]["events"] if e["kind"] == "round_completed"]
    after = [e for e in events[1:] if e["kind"] == "round_completed"]
    by_round = {e["data"]["round"]: e for e in before + after}
    completed = [by_round[r] for r in sorted(by_round)]
    assert [e["data"]["round"] for e in completed] == [1, 2, 3]
    # one upload in flight at a time (cluster3: --max-uploads 1), and every round completed
    assert [e["data"]["uploads_peak"] for e in completed] == [1, 1, 1], completed
    # and its rounds' updates were held on disk (cluster3: --round-ram-mib 0)
    assert all(e["data"]["updates_on_disk"] for e in completed), completed
    assert all(e["data"]["updates_held_bytes"] >= 3 * 4 * 650 for e in completed), completed
    assert events[-1]["kind"] == "session" and events[-1]["data"]["status"] == "completed"

    status = cli_json("session", "status", sid, target=cluster3)
    assert status["ok"] and status["status"] == "completed"
    assert status["rounds_completed"] == 3 and status["participants"] == 3
    acc = [h["accuracy"] for h in status["history"]]
    assert acc[-1] > acc[0] and acc[-1] > 0.9, acc

    models = cli_json("model", "list", sid, target=cluster3)["models"]
    assert [m["round"] for m in models] == [0, 1, 2, 3]
    assert models[0]["accuracy"] < acc[0]  # training moved the untrained model
    assert models[-1]["cid"] == status["model_cid"]

    out = tmp_path / "model.safetensors"
    got = cli_json("model", "get", status["model_cid"], "-o", str(out), target=cluster3)
    assert got["size"] == out.stat().st_size > 0
    assert file_cid(out.read_bytes()) == status["model_cid"]

    people = cli_json("participants", "list", target=cluster3)["participants"]
    assert len(people) == 3 and all(p["online"] for p in people)
    assert {p["rounds_completed"] for p in people} == {3}

    db = sqlite3.connect(cluster3.coordinator_home.ledger_path)
    assert (
        db.execute(
            "select count(*) from training_rounds where session_id=? and status='completed'", (sid,)
        ).fetchone()[0]
        == 3
    )
    assert (
        db.execute(
            "select count(*) from client_updates where session_id=? and status='accepted'", (sid,)
        ).fetchone()[0]
        == 9
    )
    assert cli_json("ledger", "verify", "--data-dir", str(cluster3.coordinator_home.root))["intact"]


def test_only_operators_drive(cluster3: Cluster, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger.key"
    res = cli(
        "--coordinator",
        cluster3.url,
        "--coordinator-id",
        cluster3.peer_id,
        "--key",
        str(stranger),
        "session",
        "list",
        "--json",
    )
    assert res.returncode == 1
    err = json.loads(res.stdout)["error"]
    assert err["code"] == "NOT_AUTHORIZED" and "--operator" in err["hint"]
    # the coordinator is still serving its operator
    assert cli_json("session", "list", target=cluster3)["ok"]


def test_wrong_coordinator_id_refused(cluster3: Cluster, tmp_path: Path) -> None:
    other = cli_json("fednode", "init", "--data-dir", str(tmp_path / "other"))["peer_id"]
    res = cli(
        "--coordinator",
        cluster3.url,
        "--coordinator-id",
        other,
        "--key",
        str(cluster3.operator_key),
        "session",
        "list",
        "--json",
    )
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"]["code"] == "PEER_MISMATCH"


def test_bad_spec_exit_2_names_field(cluster3: Cluster, tmp_path: Path) -> None:
    bad = _spec(tmp_path / "bad.toml", cluster3, rounds=0)
    before = cli_json("session", "list", target=cluster3)["sessions"]
    res = cli("session", "create", str(bad), "--json", target=cluster3)
    assert res.returncode == 2
    err = json.loads(res.stdout)["error"]
    assert err["code"] == "SPEC_INVALID" and "rounds" in err["message"]
    assert cli_json("session", "list", target=cluster3)["sessions"] == before  # nothing made


def test_lifecycle_errors_and_stop(cluster3: Cluster, tmp_path: Path) -> None:
    spec = _spec(tmp_path / "s.toml", cluster3, rounds=50)
    sid = cli_json("session", "create", str(spec), target=cluster3)["session_id"]
    res = cli("session", "pause", sid, "--json", target=cluster3)
    assert res.returncode == 1 and json.loads(res.stdout)["error"]["code"] == "BAD_STATE"
    cli_json("session", "start", sid, target=cluster3)
    assert cli_json("session", "stop", sid, target=cluster3)["status"] == "stopped"
    assert cli_json("session", "status", sid, target=cluster3)["status"] == "stopped"
    res = cli("session", "status", "s-nope", "--json", target=cluster3)
    assert json.loads(res.stdout)["error"]["code"] == "NOT_FOUND"


def test_node_refuses_second_start_on_same_dir(cluster3: Cluster) -> None:
    res = cli(
        "fednode",
        "run",
        "--role",
        "coordinator",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(cluster3.coordinator_home.root),
    )
    assert res.returncode == 1
    assert "ALREADY_RUNNING" in res.stderr and "another fednode" in res.stderr


def test_pause_and_resume(cluster3: Cluster, tmp_path: Path) -> None:
    """A pause takes effect after the round in flight, the last one too: a two-round session
    paused as its last round starts stays paused (idle, not completed) until resumed."""
    spec = _spec(tmp_path / "p.toml", cluster3, rounds=2)
    sid = cli_json("session", "create", str(spec), target=cluster3)["session_id"]

    async def pause_in_last_round() -> dict[str, Any]:
        async with AdminClient(
            Target(cluster3.url, cluster3.peer_id, cluster3.operator_key)
        ) as client:
            await client.call("subscribe")
            await client.call("session.start", session_id=sid)
            async for ev in client.stream():
                if ev.kind == "round_started" and ev.data["round"] == 2:
                    return await client.call("session.pause", session_id=sid)
        raise AssertionError("the connection closed before round 2 started")

    paused = asyncio.run(pause_in_last_round())
    assert paused.get("status") == "paused", paused
    # until the pause has taken effect (idle), or, were the last round to end the session
    # regardless, until it completed
    status = wait_status(cluster3, sid, lambda st: st["idle"] or st["status"] != "paused")
    assert status["status"] == "paused" and status["idle"], status
    assert status["rounds_completed"] == 2  # the last round ran to its end, then waited
    res = cli("session", "start", sid, "--json", target=cluster3)
    assert json.loads(res.stdout)["error"]["code"] == "BAD_STATE"
    assert cli_json("session", "resume", sid, target=cluster3)["status"] == "running"
    cli("session", "watch", sid, "--json", target=cluster3, check=True)
    done = cli_json("session", "status", sid, target=cluster3)
    assert done["status"] == "completed" and done["rounds_completed"] == 2
    assert not done["idle"]


def test_fednode_init_id_and_cid(tmp_path: Path) -> None:
    made = cli_json("fednode", "init", "--data-dir", str(tmp_path / "n"))
    assert made["peer_id"].startswith("12D3KooW") and made["created"]
    key = tmp_path / "n" / "identity.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (
        cli_json("fednode", "id", "--data-dir", str(tmp_path / "n"))["peer_id"] == made["peer_id"]
    )
    again = cli_json("fednode", "init", "--data-dir", str(tmp_path / "n"))
    assert again["peer_id"] == made["peer_id"] and not again["created"]
    missing = cli("fednode", "id", "--data-dir", str(tmp_path / "none"), "--json")
    assert missing.returncode == 1 and "fednode init" in json.loads(missing.stdout)["error"]["hint"]
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # kubo's CIDs of the empty file (ipfs add --only-hash, with and without --cid-version=1)
    assert cli_json("fednode", "cid", "--cid-version", "0", str(empty))["cid"] == (
        "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    )
    assert cli_json("fednode", "cid", str(empty))["cid"] == (
        "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    )


def test_invite_flow(cluster3: Cluster, tmp_path: Path) -> None:
    """The README's walkthrough: create, invite, a participant joins with the token, run."""
    spec = tmp_path / "invite.toml"
    spec.write_text("rounds = 2\nmin_participants = 1\nparticipants = []\n")
    sid = cli_json("session", "create", str(spec), target=cluster3)["session_id"]
    inv = cli_json("invite", "--session", sid, "--uses", "1", "--expires", "10m", target=cluster3)
    assert inv["token"].startswith("fnjt1.") and inv["uses"] == 1
    newcomer = cluster3.start_participant(3, 4, "--join-token", inv["token"])
    cli_json("session", "start", sid, target=cluster3)
    cli("session", "watch", sid, "--json", target=cluster3, check=True)
    status = cli_json("session", "status", sid, target=cluster3)
    assert status["status"] == "completed" and status["participants"] == 1
    db = sqlite3.connect(cluster3.coordinator_home.ledger_path)
    trained = {
        r[0]
        for r in db.execute("select participant from client_updates where session_id=?", (sid,))
    }
    assert trained == {newcomer.identity().peer_id}  # the uninvited three did not take part
    bad = cli("invite", "--session", sid, "--expires", "forever", "--json", target=cluster3)
    assert bad.returncode == 2 and json.loads(bad.stdout)["error"]["code"] == "USAGE"


def test_operator_excludes_and_readmits_a_participant(cluster3: Cluster, tmp_path: Path) -> None:
    """An excluded peer stays online but is not selected; readmitted, it is selected again."""
    out = cluster3.peer_ids[0]
    sid = cli_json(
        "session",
        "create",
        str(_spec(tmp_path / "a.toml", cluster3, rounds=1, min_participants=2)),
        target=cluster3,
    )["session_id"]

    # A node admits only peers an open session lists: with this test alone, the session
    # just created is the first, and the peer connects after it (its backoff)
    async def seen(client: AdminClient) -> bool:
        ps = (await client.call("participants.list"))["participants"]
        return any(p["peer_id"] == out and p["online"] for p in ps)

    asyncio.run(until(cluster3, seen))
    got = cli_json("participants", "exclude", out, "--reason", "maintenance", target=cluster3)
    assert got["participant"]["status"] == "excluded" and got["participant"]["excluded"]
    cli_json("session", "start", sid, target=cluster3)
    cli("session", "watch", sid, "--json", target=cluster3, check=True)
    db = sqlite3.connect(cluster3.coordinator_home.ledger_path)
    (sel,) = db.execute("SELECT selected FROM training_rounds WHERE session_id = ?", (sid,))
    assert out not in json.loads(sel[0])  # (the module's other tests started more peers)
    reasons = [
        json.loads(d)["reason"]
        for (d,) in db.execute(
            "SELECT data FROM events WHERE kind = 'action' AND entity_id = ?", (out,)
        )
    ]
    assert "maintenance" in reasons  # the operator's exclude action, with its reason
    assert any("excluded by an operator" in r for r in reasons)  # and the selection's

    back = cli_json("participants", "readmit", out, target=cluster3)["participant"]
    assert back["status"] == "active" and not back["excluded"]
    sid = cli_json(
        "session",
        "create",
        str(_spec(tmp_path / "b.toml", cluster3, rounds=1, min_participants=3)),
        target=cluster3,
    )["session_id"]
    cli_json("session", "start", sid, target=cluster3)
    cli("session", "watch", sid, "--json", target=cluster3, check=True)
    (sel,) = db.execute("SELECT selected FROM training_rounds WHERE session_id = ?", (sid,))
    assert out in json.loads(sel[0])
    unknown = cli("participants", "exclude", "12D3KooWnobody", "--json", target=cluster3)
    assert unknown.returncode == 1 and json.loads(unknown.stdout)["error"]["code"] == "NOT_FOUND"
    db.close()


def test_median_session_reads_its_rows_by_columns(cluster3: Cluster, tmp_path: Path) -> None:
    """A robust strategy through a real round: the coordinate-wise median of the three
    participants' updates, held on disk (cluster3: --round-ram-mib 0) and handed to the
    strategy in column blocks; the session completes and its models learn."""
    spec = _spec(tmp_path / "m.toml", cluster3, rounds=2, min_participants=3)
    spec.write_text(spec.read_text() + '[aggregation]\nstrategy = "median"\n')
    sid = cli_json("session", "create", str(spec), target=cluster3)["session_id"]
    cli_json("session", "start", sid, target=cluster3)
    cli("session", "watch", sid, "--json", target=cluster3, check=True)
    status = cli_json("session", "status", sid, target=cluster3)
    assert status["status"] == "completed" and status["rounds_completed"] == 2, status
    models = cli_json("model", "list", sid, target=cluster3)["models"]
    assert [m["round"] for m in models] == [0, 1, 2]
    assert models[-1]["accuracy"] > models[0]["accuracy"] + 0.2, models
