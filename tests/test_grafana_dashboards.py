"""The Grafana dashboards of deploy/grafana/: each one's structure, and every query against
the metrics a coordinator really exposes.

The metric names come from fednode.metrics.Exporter's own registry (started on a free port
and closed), not from a list kept here: a metric renamed in fednode/metrics.py breaks the
panel that still asks for the old name, here rather than as an empty graph in production.
When Prometheus's `promtool` is installed, every query is also parsed by it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fednode.metrics import Exporter

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
BOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\bfednode_[a-zA-Z0-9_]+")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms"}


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every series name a scrape of the coordinator can hold."""
    exporter = Exporter("127.0.0.1", 0)
    try:
        names: set[str] = set()
        for family in exporter.registry.collect():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type in ("histogram", "summary"):
                names.update(f"{family.name}{s}" for s in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
        return names
    finally:
        exporter.close()


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} {panel['title']!r}", target["expr"]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            yield f"variable {var['name']}", var["query"]["query"]


def test_the_five_dashboards_are_there() -> None:
    titles = {load(p)["title"] for p in BOARDS}
    assert titles == {
        "fednode · Training overview",
        "fednode · Communication efficiency",
        "fednode · Byzantine detection",
        "fednode · Quality",
        "fednode · Alerts",
    }
    assert len({load(p)["uid"] for p in BOARDS}) == len(BOARDS)  # uids are unique


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_a_dashboards_structure(path: Path) -> None:
    board = load(path)
    assert board["schemaVersion"] >= 39 and board["id"] is None and "fednode" in board["tags"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    cells: set[tuple[int, int]] = set()
    for panel in panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{path.name}: panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for where, expr in queries(board):
        for named, plain in VARIABLE.findall(expr):
            name = named or plain
            assert name in variables or name in GRAFANA_BUILTINS, f"{where}: ${name} undefined"


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_every_query_asks_for_metrics_the_coordinator_exposes(
    path: Path, exposed: set[str]
) -> None:
    assert {"fednode_alerts_open", "fednode_session_rounds_total"} <= exposed  # the walk works
    board = load(path)
    asked = 0
    for where, expr in queries(board):
        for name in METRIC.findall(expr):
            assert name in exposed, f"{path.name}, {where}: {name} is not a fednode metric"
            asked += 1
    assert asked > 0


def test_every_query_parses_in_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed: apt-get install prometheus")
    rules = []
    for path in BOARDS:
        for k, (_, expr) in enumerate(queries(load(path))):
            if expr.startswith("label_values("):  # Grafana's, not PromQL
                continue
            concrete = expr.replace("$__rate_interval", "5m")
            concrete = VARIABLE.sub(".*", concrete)
            rules.append({"record": f"fednode:{path.stem.replace('-', '_')}:{k}", "expr": concrete})
    file = tmp_path / "rules.json"  # YAML is a superset of JSON: promtool reads it
    file.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))
    done = subprocess.run(
        [promtool, "check", "rules", str(file)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_provisioning_points_grafana_at_the_dashboards() -> None:
    provider = (GRAFANA / "provisioning" / "dashboards" / "fednode.yaml").read_text()
    assert "type: file" in provider and "path: /var/lib/grafana/dashboards/fednode" in provider
    source = (GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    assert "type: prometheus" in source
