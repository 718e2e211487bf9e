"""Fixtures that start real nodes as real processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedctl.demo import Processes
from fednode.home import NodeHome
from protocol.identity import Identity


def cli(
    *args: str,
    key: Path | None = None,
    timeout: float = 120,
    check: bool = False,
    target: Cluster | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `fedctl` (or `fednode` when args start with 'fednode') as a user would."""
    if args and args[0] == "fednode":
        cmd = [sys.executable, "-m", "fednode", *args[1:]]
    else:
        globals_: list[str] = []
        if target is not None:
            globals_ += [
                "--coordinator",
                target.url,
                "--coordinator-id",
                target.peer_id,
                "--key",
                str(target.operator_key),
            ]
        elif key is not None:
            globals_ += ["--key", str(key)]
        cmd = [sys.executable, "-m", "fedctl", *globals_, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str, **kw: Any) -> dict[str, Any]:
    proc = cli(*args, "--json", **kw)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line, got {proc.stdout!r} / {proc.stderr}"
    return json.loads(lines[0])


@dataclass
class Cluster:
    root: Path
    url: str
    peer_id: str
    operator_key: Path
    procs: Processes
    participant_homes: list[NodeHome]
    ready: dict[str, Any] = field(default_factory=dict)  # the coordinator's ready line
    coordinator_dir: Path | None = None  # where the coordinator's data dir is, if not root

    @property
    def peer_ids(self) -> list[str]:
        return [home.identity().peer_id for home in self.participant_homes]

    @property
    def coordinator_home(self) -> NodeHome:
        return NodeHome(self.coordinator_dir or self.root / "coordinator")

    def start_participant(self, k: int, n: int, *extra: str) -> NodeHome:
        home = NodeHome(self.root / f"participant-{k}")
        home.init()
        ready = {"url": self.url, "peer_id": self.peer_id}
        self.procs.start_participant(f"participant-{k}", home, ready, f"digits:{k}/{n}", *extra)
        self.participant_homes.append(home)
        return home


def start_cluster(
    root: Path, participants: int, *coordinator_args: str, coordinator_dir: Path | None = None
) -> Cluster:
    (root / "logs").mkdir(parents=True)
    key = root / "operator.key"
    operator = Identity.generate()
    operator.save(key)
    procs = Processes(root / "logs")
    home = NodeHome(coordinator_dir or root / "coordinator")
    ident, _ = home.init()
    ready = procs.start_coordinator(home, operator.peer_id, *coordinator_args)
    cluster = Cluster(root, ready["url"], ident.peer_id, key, procs, [], ready, coordinator_dir)
    for k in range(participants):
        cluster.start_participant(k, participants)
    return cluster


class Charts(HTMLParser):
    """The data points (``data-value``) of each chart (``id=...-chart``) of an HTML report."""

    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, list[float]] = {}
        self._chart: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id", "").endswith("-chart"):
            self._chart.append(a["id"] or "")
            self.points.setdefault(a["id"] or "", [])
        if self._chart and a.get("data-value") is not None:
            self.points[self._chart[-1]].append(float(a["data-value"] or "nan"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg" and self._chart:
            self._chart.pop()


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator and three participants, shared by a module's tests (starting four
    torch processes costs seconds on two cores). The coordinator takes one upload at a
    time (``--max-uploads 1``), so every round of these tests goes through backpressure, and
    holds its rounds' updates on disk (``--round-ram-mib 0``), so their judging and
    aggregation read the spill file (the other clusters hold them in memory)."""
    c = start_cluster(
        tmp_path_factory.mktemp("fed"), 3, "--max-uploads", "1", "--round-ram-mib", "0"
    )
    try:
        yield c
    finally:
        c.procs.stop_all()
