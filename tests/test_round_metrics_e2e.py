"""A regression session's metrics by name, end to end: real processes on 127.0.0.1, two
participants on CSV tables of a noisy linear target, the coordinator evaluating on its own
table and the participants on their held-out rows (evaluation.on = "both").

What must hold: every completed round of `session status` carries the task's metrics (MAE and
R², no accuracy) from the coordinator's evaluation and the participants' mean beside them;
the summary's final figures are the last round's, with no accuracy for a regression;
`fedctl report` shows MAE and R² columns; the /metrics endpoint exports the last round's
figures by name; and R² improves over the session.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fednode.home import NodeHome
from tests.conftest import cli, cli_json, start_cluster
from tests.test_quality_e2e import create, future_ids, online, until

pytestmark = pytest.mark.timeout(120)

ROUNDS = 3
COLUMNS = ["a", "b", "c", "d"]


def write_table(path: Path, seed: int, n: int) -> None:
    """y = x·w + noise on four standard-normal features (R² of the truth: about 0.99)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = x @ np.array([1.5, -2.0, 0.5, 1.0]) + rng.normal(scale=0.2, size=n)
    frame = pd.DataFrame(x.round(4), columns=COLUMNS)
    frame["y"] = y.round(4)
    frame.to_csv(path, index=False)


async def test_a_regression_session_reports_mae_and_r2_everywhere(tmp_path: Path) -> None:
    c = start_cluster(tmp_path / "fed", 0, "--metrics", "127.0.0.1:0")
    try:
        for k in range(2):
            write_table(tmp_path / f"p{k}.csv", seed=k, n=200)
        write_table(tmp_path / "eval.csv", seed=9, n=100)
        ids = future_ids(c, 2)
        spec = tmp_path / "linear.json"
        spec.write_text(
            json.dumps(
                {
                    "name": "linear",
                    "rounds": ROUNDS,
                    "participants": ids,
                    "min_participants": 2,
                    "data": {
                        "dataset": f"csv:{tmp_path / 'eval.csv'}",
                        "label": "y",
                        "columns": COLUMNS,
                    },
                    "model": {"task": "regression", "inputs": 4, "classes": 1, "hidden": [16]},
                    "training": {"lr": 0.02, "local_epochs": 1},
                    "evaluation": {"on": "both"},
                    "rollback": {"enabled": False},  # the figures are checked, not rollback
                }
            )
        )
        sid = create(c, spec)
        ready = {"url": c.url, "peer_id": c.peer_id}
        for k in range(2):
            home = NodeHome(c.root / f"participant-{k}")
            c.procs.start_participant(
                f"participant-{k}", home, ready, f"csv:{tmp_path / f'p{k}.csv'}"
            )
            c.participant_homes.append(home)
        await until(c, online(2))
        assert cli_json("session", "start", sid, target=c)["status"] == "running"
        cli("session", "watch", sid, "--json", check=True, target=c, timeout=90)

        status = cli_json("session", "status", sid, target=c)
        assert status["status"] == "completed" and status["rounds_completed"] == ROUNDS, status
        history = status["history"]
        assert [set(h["metrics"]) for h in history] == [{"mae", "r2"}] * ROUNDS, history
        assert [set(h["participant_metrics"]) for h in history] == [{"mae", "r2"}] * ROUNDS
        assert [h["accuracy"] for h in history] == [None] * ROUNDS  # R² is no accuracy
        r2 = [h["metrics"]["r2"] for h in history]
        assert r2[-1] > r2[0] and r2[-1] > 0.5, r2
        assert history[-1]["metrics"]["mae"] < history[0]["metrics"]["mae"], history
        assert status["final_metrics"] == history[-1]["metrics"]
        assert status["final_accuracy"] is None
        # the initial model (version 0) was measured by name too, and is worse
        models = cli_json("model", "list", sid, target=c)["models"]
        assert models[0]["round"] == 0 and models[0]["metrics"]["r2"] < r2[0], models[0]
        assert [m["accuracy"] for m in models] == [None] * len(models)  # nor in model list
        listed = next(
            s for s in cli_json("session", "list", target=c)["sessions"] if s["session_id"] == sid
        )
        assert listed["accuracy"] is None and listed["metrics"] == status["final_metrics"]

        rep = cli_json("report", sid, target=c)
        rounds_json = rep["report"]["session"]["history"]
        assert [h["metrics"] for h in rounds_json] == [h["metrics"] for h in history]
        header = next(ln for ln in rep["text"].splitlines() if ln.startswith("round "))
        assert header.split()[:4] == ["round", "MAE", "R²", "loss"], header
        assert "final R²" in rep["text"] and "final accuracy" not in rep["text"]

        scrape = urllib.request.urlopen(c.ready["metrics"], timeout=10).read().decode()
        exported = {
            s.labels["metric"]: s.value
            for family in text_string_to_metric_families(scrape)
            if family.name == "fednode_round_metric"
            for s in family.samples
            if s.labels.get("session") == sid
        }
        assert set(exported) == {"mae", "r2", "loss"}, exported
        assert exported["r2"] == pytest.approx(r2[-1])
        assert exported["mae"] == pytest.approx(history[-1]["metrics"]["mae"])
    finally:
        c.procs.stop_all()
