"""`fedctl demo`: the acceptance run of the foundation, and its clean-up guarantees."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from protocol.cid import file_cid
from tests.conftest import Charts, cli, cli_json


def _leftovers(workdir: Path) -> list[int]:
    """Processes still running whose command line names the demo's directory."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(workdir) in part for part in p.info["cmdline"] or []):
                found.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_demo_converges_and_leaves_nothing_running(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = cli(
        "--key",
        str(tmp_path / "op.key"),
        "demo",
        "--participants",
        "3",
        "--rounds",
        "10",
        "--workdir",
        str(work),
        "--json",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object on stdout; progress went to stderr
    s = json.loads(lines[0])
    assert s["ok"] and s["status"] == "completed"
    assert s["rounds_completed"] == 10 and s["participants"] == 3
    assert s["final_accuracy"] >= 0.95, s["history"]
    assert s["strategy"] == "fedavg" and s["secure_aggregation"] is False
    assert s["dropped"] == 0 and s["bytes_up"] > 0 and s["bytes_down"] > 0
    assert len(s["history"]) == 10 and s["history"][-1]["participants"] == 3
    assert "round 10/10" in res.stderr

    db = sqlite3.connect(s["ledger"])
    assert (
        db.execute("select count(*) from training_rounds where status='completed'").fetchone()[0]
        == 10
    )
    assert (
        db.execute("select count(*) from client_updates where status='accepted'").fetchone()[0]
        == 30
    )

    out = tmp_path / "final.safetensors"
    got = cli_json(
        "model", "get", s["model_cid"], "-o", str(out), "--data-dir", str(work / "coordinator")
    )
    assert got["size"] > 0 and file_cid(out.read_bytes()) == s["model_cid"]
    assert _leftovers(work) == []

    # The nodes are gone; the report comes from the coordinator's ledger.
    page = tmp_path / "report.html"
    cli(
        "report",
        s["session_id"],
        "--format",
        "html",
        "-o",
        str(page),
        "--data-dir",
        str(work / "coordinator"),
        check=True,
    )
    charts = Charts()
    charts.feed(page.read_text(encoding="utf-8"))
    accuracy = [round(h["accuracy"], 4) for h in s["history"]]
    assert [round(v, 4) for v in charts.points["accuracy-chart"]] == accuracy
    assert len(charts.points["loss-chart"]) == 10
    scores = charts.points["scores-chart"]
    assert len(scores) == 3 and all(0 < v <= 100 for v in scores)
    assert len(charts.points["health-chart"]) == 10


@pytest.mark.slow  # 13 s; dropouts: test_secure_e2e, test_quality_e2e (a killed participant)
def test_demo_drop_counts_the_dropped(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    s = cli_json(
        "--key",
        str(tmp_path / "op.key"),
        "demo",
        "--participants",
        "4",
        "--rounds",
        "3",
        "--drop",
        "1",
        "--workdir",
        str(work),
        timeout=300,
    )
    assert s["status"] == "completed" and s["rounds_completed"] == 3
    assert s["dropped"] == 1
    assert [h["participants"] for h in s["history"]] == [4, 3, 3]
    assert _leftovers(work) == []


def _sigint_default() -> None:  # runs in the child between fork and exec
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_demo_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedctl",
            "--key",
            str(tmp_path / "op.key"),
            "demo",
            "--rounds",
            "1000",
            "--workdir",
            str(work),
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        # Ctrl-C as at a terminal: a shell without job control starts background commands
        # (`make test &`) with SIGINT ignored, and a child inherits that
        preexec_fn=_sigint_default,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # wait for real progress, not for a guessed time
            if "round 1/1000 accuracy" in line:
                break
        else:
            raise AssertionError("the demo ended before its first round")
        assert len(set(_leftovers(work)) - {proc.pid}) == 4  # coordinator + 3 participants
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert json.loads(out.strip().splitlines()[-1])["error"]["code"] == "INTERRUPTED"
    assert _leftovers(work) == []


def test_demo_refuses_bad_options_before_starting(tmp_path: Path) -> None:
    res = cli(
        "--key",
        str(tmp_path / "op.key"),
        "demo",
        "--participants",
        "2",
        "--drop",
        "2",
        "--workdir",
        str(tmp_path / "d"),
        "--json",
    )
    assert res.returncode == 2
    assert json.loads(res.stdout)["error"]["code"] == "USAGE"
    bad_spec = tmp_path / "bad.toml"
    bad_spec.write_text("rounds = 0\n")
    res = cli(
        "--key",
        str(tmp_path / "op.key"),
        "demo",
        "--spec",
        str(bad_spec),
        "--workdir",
        str(tmp_path / "d"),
        "--json",
    )
    assert res.returncode == 2
    assert json.loads(res.stdout)["error"]["code"] == "SPEC_INVALID"
    assert not (tmp_path / "d").exists()


@pytest.mark.slow  # 30 s; the secure path itself: tests/test_secure_e2e.py, the spec below
def test_secure_demo_matches_plain_demo(tmp_path: Path) -> None:
    """--secure-aggregation: same participants, same drop, accuracy within 0.01 of plain."""
    out = {}
    for mode in ("plain", "secure"):
        args = ["--participants", "5", "--rounds", "5", "--drop", "1"]
        if mode == "secure":
            args.append("--secure-aggregation")
        out[mode] = cli_json(
            "--key",
            str(tmp_path / "op.key"),
            "demo",
            *args,
            "--workdir",
            str(tmp_path / mode),
            timeout=300,
        )
    secure, plain = out["secure"], out["plain"]
    assert secure["status"] == "completed" and secure["secure_aggregation"] is True
    assert plain["secure_aggregation"] is False
    assert secure["dropped"] == 1 and secure["rounds_completed"] == 5
    assert abs(secure["final_accuracy"] - plain["final_accuracy"]) <= 0.01


def test_the_secure_demos_spec_is_secure_without_detection() -> None:
    from fedctl.demo import DemoOptions, build_spec
    from protocol import spec as specmod

    spec = build_spec(DemoOptions(participants=5, rounds=3, secure=True, drop=1))
    assert spec["aggregation"]["secure"] and spec["min_participants"] == 4
    assert specmod.detection_mode(spec) == "off"  # a secure round shows no single update
    plain = build_spec(DemoOptions(participants=10, rounds=3, strategy="krum", attackers=3,
                                   attack="sign_flip"))  # fmt: skip
    assert specmod.detection_mode(plain) == "exclude"
    # once detection quarantines the 3, the 7 honest go on: min_participants 7, Krum's f = 2
    assert plain["min_participants"] == 7 and plain["aggregation"]["num_malicious"] == 2
