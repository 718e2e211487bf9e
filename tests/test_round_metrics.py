"""The task's metrics by name, layer by layer: the ledger (schema 8: round, version and final
metrics), the round core's choice of figures, the report, the Prometheus exposition and the
dashboard's model. The regression session end to end is tests/test_round_metrics_e2e.py."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from fedctl.render import metrics_text, session_line, summary_lines
from fedctl.report import render_html, render_text
from fednode import ledger as ledger_mod
from fednode import rounds
from fednode.ledger import Ledger
from fednode.metrics import Exporter
from tests.test_report import parse, points
from tui.state import DashboardState, headline, headline_label

SPEC = {"name": "linear", "rounds": 3, "evaluation": {"on": "both"}}
REGRESSION = {"mae": 0.5, "r2": 0.9}


@pytest.fixture
def led(tmp_path: Path):
    with Ledger(tmp_path / "ledger.db") as ledger:
        ledger.create_session(
            "s1",
            name="linear",
            spec=SPEC,
            strategy="fedavg",
            secure_aggregation=False,
            rounds=3,
            created_at=100.0,
        )
        ledger.update_session("s1", status="running", started_at=100.0)
        ledger.record_model(
            "s1",
            0,
            cid="c0",
            parent_cid=None,
            accuracy=0.1,
            loss=4.0,
            size=10,
            created_at=100.0,
            metrics={"mae": 2.0, "r2": 0.1},
        )
        yield ledger


def _round(led: Ledger, n: int, **kw: Any) -> dict[str, Any]:
    led.start_round("s1", n, selected=["pA"], model_cid_in=f"c{n - 1}", started_at=100.0 + n)
    return led.complete_round(
        "s1",
        n,
        ended_at=101.0 + n,
        model_cid=f"c{n}",
        size=10,
        participants=1,
        **kw,
    )


# --- ledger -----------------------------------------------------------------------------


def test_schema_8_adds_the_metric_columns_to_a_schema_7_ledger(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    assert ledger_mod.MIGRATIONS[7] is ledger_mod._m008_round_metrics
    with pytest.MonkeyPatch.context() as mp:  # a ledger written by schema 7
        mp.setattr(ledger_mod, "MIGRATIONS", ledger_mod.MIGRATIONS[:7])
        with Ledger(path) as seven:
            seven.create_session(
                "s1", name="n", spec={}, strategy="fedavg", secure_aggregation=False, rounds=1,
                created_at=1.0,
            )  # fmt: skip
            seven.start_round("s1", 1, selected=[], model_cid_in="c0", started_at=1.0)
    raw = sqlite3.connect(path)  # the round as schema 7's code completed it
    with raw:
        raw.execute("UPDATE training_rounds SET status = 'completed', accuracy = 0.7, loss = 0.3")
        raw.execute("UPDATE sessions SET final_accuracy = 0.7, final_loss = 0.3")
    raw.close()
    with Ledger(path) as led:
        assert led.schema_version == len(ledger_mod.MIGRATIONS)  # 8 and later
        (r,) = led.rounds("s1")
        assert r["metrics"] is None and r["participant_metrics"] is None
        s = led.summary("s1")
        # a round from before metrics by name keeps its accuracy column
        assert s["final_accuracy"] == 0.7 and s["final_metrics"] == {}
        assert s["history"][0]["accuracy"] == 0.7 and s["history"][0]["metrics"] == {}


def test_a_regression_round_records_its_metrics_and_no_accuracy(led: Ledger) -> None:
    row = _round(
        led,
        1,
        accuracy=0.9,  # the score columns keep R² (rollback compares it)
        loss=0.4,
        metrics=REGRESSION,
        participant_metrics={"mae": 0.7, "r2": 0.8},
    )
    assert row["metrics"] == REGRESSION and row["participant_metrics"] == {"mae": 0.7, "r2": 0.8}
    assert row["accuracy"] == 0.9
    assert led.models("s1")[1]["metrics"] == REGRESSION
    assert led.models("s1")[0]["metrics"] == {"mae": 2.0, "r2": 0.1}
    s = led.summary("s1")
    assert s["final_metrics"] == REGRESSION
    assert s["final_accuracy"] is None  # R² is not shown as an accuracy
    assert s["history"][0]["metrics"] == REGRESSION and s["history"][0]["accuracy"] is None
    assert s["history"][0]["participant_metrics"] == {"mae": 0.7, "r2": 0.8}
    json.dumps(s)


def test_a_classification_round_keeps_its_accuracy(led: Ledger) -> None:
    _round(led, 1, accuracy=0.8, loss=0.5, metrics={"accuracy": 0.8})
    s = led.summary("s1")
    assert s["final_accuracy"] == 0.8 and s["history"][0]["accuracy"] == 0.8


def test_lagged_figures_go_to_the_version_they_measured(led: Ledger) -> None:
    _round(led, 1, accuracy=0.1, loss=4.0, metrics={"mae": 2.0, "r2": 0.1}, evaluated_cid="c0")
    models = led.models("s1")
    assert models[1]["metrics"] is None  # the new version is measured by the next round
    _round(led, 2, accuracy=0.6, loss=1.0, metrics={"mae": 1.0, "r2": 0.6}, evaluated_cid="c1")
    assert led.models("s1")[1]["metrics"] == {"mae": 1.0, "r2": 0.6}


def test_rollback_restores_the_target_versions_metrics(led: Ledger) -> None:
    _round(led, 1, accuracy=0.9, loss=0.4, metrics=REGRESSION)
    _round(led, 2, accuracy=0.2, loss=3.0, metrics={"mae": 1.9, "r2": 0.2})
    led.rollback_models("s1", 1, now=200.0, data={"reason": "test"})
    assert led.summary("s1")["final_metrics"] == REGRESSION


@pytest.mark.parametrize(
    "bad",
    [
        {"f1": 0.5},  # not an EVAL_METRICS name
        {"r2": math.nan},
        {"mae": math.inf},
        {"r2": 1.5},  # R² is at most 1
        {"accuracy": -0.1},
        {"mae": "0.5"},
        [("r2", 0.5)],
    ],
)
def test_the_ledger_refuses_metrics_outside_eval_metrics(led: Ledger, bad: Any) -> None:
    with pytest.raises(ValueError):
        _round(led, 1, accuracy=0.5, loss=0.5, metrics=bad)
    with pytest.raises(ValueError):
        led.complete_round(
            "s1", 1, ended_at=2.0, model_cid="c1", accuracy=0.5, loss=0.5, size=1,
            participants=1, participant_metrics=bad,
        )  # fmt: skip
    assert led.rounds("s1")[0]["status"] == "running"  # nothing was written


# --- the round core ---------------------------------------------------------------------


def test_the_round_takes_its_metrics_where_it_takes_its_accuracy() -> None:
    theirs = rounds.EvalFigures(10, 0.9, {"mae": 0.8, "r2": 0.6}, 2)
    own = {"loss": 0.4, "mae": 0.5, "r2": 0.9}
    assert rounds.round_metrics("both", own, theirs) == REGRESSION
    assert rounds.round_metrics("coordinator", own, None) == REGRESSION
    assert rounds.round_metrics("participants", None, theirs) == {"mae": 0.8, "r2": 0.6}
    assert rounds.round_metrics("participants", None, None) is None
    assert rounds.score({"mae": 0.5, "r2": 0.9}) == 0.9
    assert rounds.score({"accuracy": 0.7, "roc_auc": 0.8}) == 0.7


def test_the_coordinators_own_figures_are_bounded() -> None:
    figures = {"loss": 1e30, "mae": 1e30, "r2": -math.inf, "accuracy": math.nan}
    assert rounds.bounded_metrics(figures) == {"mae": 1e12}
    assert rounds.bounded_metrics({"r2": -5e12, "roc_auc": 0.7}) == {"roc_auc": 0.7, "r2": -1e12}


# --- the report ---------------------------------------------------------------------------


def _report(history: list[dict[str, Any]], final: dict[str, float]) -> dict[str, Any]:
    return {
        "session": {
            "session_id": "s1",
            "status": "completed",
            "rounds_completed": len(history),
            "final_accuracy": None,
            "final_loss": 0.4,
            "final_metrics": final,
            "history": history,
        },
        "name": "linear",
        "rounds": len(history),
    }


def _history(rows: list[dict[str, float]]) -> list[dict[str, Any]]:
    return [
        {"round": k + 1, "accuracy": None, "loss": 1.0 / (k + 1), "metrics": m}
        for k, m in enumerate(rows)
    ]


def test_report_shows_a_regressions_mae_and_r2() -> None:
    rows = [{"mae": 1.5, "r2": 0.3}, {"mae": 0.9, "r2": 0.7}, REGRESSION]
    report = _report(_history(rows), REGRESSION)
    text = render_text(report)
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("round "))
    words = ["round", "MAE", "R²", "loss", "seconds", "participants", "health", "up", "×"]
    assert header.split() == words
    third = next(ln for ln in lines if ln.split()[:1] == ["3"])
    assert third.split()[1:3] == ["0.5000", "0.9000"]
    assert any(ln.split() == ["final", "R²", "0.9000"] for ln in lines)
    assert "final accuracy" not in text
    page = parse(render_html(report))
    assert points(page, "r2-chart") == [(1, 0.3), (2, 0.7), (3, 0.9)]
    assert "accuracy-chart" not in page.by_id


def test_report_of_a_binary_task_has_both_columns_and_keeps_accuracy_first() -> None:
    rows = [{"accuracy": 0.8, "roc_auc": 0.85}, {"accuracy": 0.9, "roc_auc": 0.95}]
    report = _report(_history(rows), rows[-1])
    header = next(ln for ln in render_text(report).splitlines() if ln.startswith("round "))
    assert header.split()[:5] == ["round", "accuracy", "ROC", "AUC", "loss"]
    assert points(parse(render_html(report)), "accuracy-chart") == [(1, 0.8), (2, 0.9)]


def test_report_from_before_metrics_by_name_keeps_the_accuracy_column() -> None:
    history = [{"round": 1, "accuracy": 0.8, "loss": 0.5}]
    report = _report(history, {})
    report["session"]["final_accuracy"] = 0.8
    report["session"].pop("final_metrics")
    text = render_text(report)
    assert any(
        ln.split()[:2] == ["final", "accuracy"] and "0.8000" in ln for ln in text.splitlines()
    )
    assert points(parse(render_html(report)), "accuracy-chart") == [(1, 0.8)]


def test_report_drops_metric_names_a_peer_made_up() -> None:
    report = _report(_history([{"r2": 0.5, "\x1b[31mevil": 1.0}]), {})
    text = render_text(report)
    assert "evil" not in text and "\x1b" not in text


# --- Prometheus -----------------------------------------------------------------------------


def test_round_metrics_are_exported_by_name_with_bounded_labels() -> None:
    exporter = Exporter("127.0.0.1", 0)
    try:
        exporter.round("s1", {"mae": 0.5, "r2": 0.9, "made_up": 3.0}, 0.4)
        text = generate_latest(exporter.registry).decode()
        assert 'fednode_round_metric{metric="r2",session="s1"} 0.9' in text
        assert 'fednode_round_metric{metric="mae",session="s1"} 0.5' in text
        assert 'fednode_round_metric{metric="loss",session="s1"} 0.4' in text
        assert "made_up" not in text
        exporter.round("s1", {"mae": 0.25, "r2": 0.95}, None)  # the next round replaces it
        text = generate_latest(exporter.registry).decode()
        assert 'fednode_round_metric{metric="r2",session="s1"} 0.95' in text
    finally:
        exporter.close()


# --- the dashboard's model ------------------------------------------------------------------


def test_the_dashboard_follows_a_regressions_r2() -> None:
    s = DashboardState()
    s.apply_snapshot({"sessions": [], "participants": []})
    summary = {
        "session_id": "s1",
        "status": "running",
        "rounds_completed": 1,
        "final_accuracy": None,
        "final_metrics": {"mae": 1.5, "r2": 0.3},
        "history": [
            {"round": 1, "accuracy": None, "loss": 2.0, "metrics": {"mae": 1.5, "r2": 0.3}}
        ],
    }
    s.apply_status(summary)
    # the event's accuracy is the round's score (R² for a regression), its metrics by name
    done = {"round": 2, "accuracy": 0.7, "loss": 1.0, "metrics": {"mae": 0.9, "r2": 0.7, "x": 1}}
    change = s.apply_event("round_completed", "s1", 1.0, done)
    pts = s.details["s1"].points()
    assert [p.value("r2") for p in pts] == [0.3, 0.7]
    assert [p.accuracy for p in pts] == [None, None]
    assert pts[-1].metrics == {"mae": 0.9, "r2": 0.7}  # a made-up name is dropped
    assert headline(pts) == "r2" and headline_label(pts) == "R²"
    assert "R² 0.7000" in change.events[0].text


def test_the_dashboard_follows_accuracy_from_an_older_node() -> None:
    s = DashboardState()
    s.apply_snapshot({"sessions": [], "participants": []})
    s.apply_event("round_completed", "s1", 1.0, {"round": 1, "accuracy": 0.8, "loss": 0.5})
    pts = s.details["s1"].points()
    assert headline(pts) == "accuracy" and pts[0].value("accuracy") == 0.8


def _lines_text(s: dict[str, Any]) -> str:
    from rich.console import Console

    console = Console(width=200, record=True)
    for r in summary_lines(s):
        console.print(r)
    return console.export_text()


def test_session_status_shows_the_tasks_metrics_by_name() -> None:
    rows = [{"mae": 1.5, "r2": 0.3}, REGRESSION]
    status = _report(_history(rows), REGRESSION)["session"]
    for h in status["history"]:
        h.update(participants=2, duration_s=1.0)
    status.update(
        session_id="s-1", status="completed", participants=2, strategy="fedavg",
        secure_aggregation=False, dropped=0, duration_s=1.0, bytes_up=1, bytes_down=1,
        model_cid=None, ledger="x",
    )  # fmt: skip
    text = _lines_text(status)
    header = next(ln for ln in text.splitlines() if "round" in ln and "loss" in ln)
    assert [w for w in header.replace("┃", " ").split()][:4] == ["round", "MAE", "R²", "loss"]
    assert "final MAE 0.5000  R² 0.9000" in text and "accuracy" not in text
    # a session from before metrics by name still shows its accuracy column
    old = dict(status, final_metrics=None, final_accuracy=0.8)
    old["history"] = [{"round": 1, "accuracy": 0.8, "loss": 0.5, "participants": 2,
                       "duration_s": 1.0}]  # fmt: skip
    assert "final accuracy 0.8000" in _lines_text(old)
    assert metrics_text({"accuracy": 0.9, "roc_auc": 0.95}) == "accuracy 0.9000  ROC AUC 0.9500"
    assert metrics_text({}, None) == "" and metrics_text(None, 0.5) == "accuracy 0.5000"


def test_the_watch_line_of_a_round_names_its_metrics() -> None:
    data = {"round": 2, "accuracy": 0.9, "loss": 1.0, "metrics": REGRESSION}
    text = session_line("round_completed", data, 5).plain
    assert "round 2/5 MAE 0.5000  R² 0.9000 loss 1.0000" in text and "accuracy" not in text
    older = session_line("round_completed", {"round": 1, "accuracy": 0.8}, 5).plain
    assert "accuracy 0.8000" in older
    odd = {"round": 1, "metrics": {"r2": "lots"}}  # a misbehaving coordinator's figure
    assert session_line("round_completed", odd, 5) is not None
