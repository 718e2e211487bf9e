"""The session report renderers: figures read back from the HTML, escaping, empty sessions.

The HTML is parsed with the standard library's parser, so what is checked is what a browser
gets: the chart points' data attributes, the bars, the alert rows' classes, and that text
from other machines (names, peer IDs, messages) never becomes markup.
"""

from __future__ import annotations

import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedctl.report import NO_DATA, render_html, render_text

ACCURACIES = [0.88, 0.905, 0.921, 0.93, 0.94, 0.948, 0.955, 0.961, 0.9665, 0.97]
LOSSES = [0.412, 0.335, 0.289, 0.251, 0.224, 0.2031, 0.187, 0.1722, 0.1609, 0.1513]
PEERS = [
    "12D3KooWAbcdefghijkLMNopqrstuvWXyz1234567890abcdefAA",
    "12D3KooWBbcdefghijkLMNopqrstuvWXyz1234567890abcdefBB",
    "12D3KooWCbcdefghijkLMNopqrstuvWXyz1234567890abcdefCC",
]
SCORES = [93.4, 81.25, 64.0]
MALICIOUS = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


def sample_report(name: str = "digits-mlp") -> dict[str, Any]:
    history = [
        {"round": i + 1, "accuracy": a, "loss": lo, "duration_s": 1.8 + 0.1 * i, "participants": 3}
        for i, (a, lo) in enumerate(zip(ACCURACIES, LOSSES, strict=True))
    ]
    session = {
        "session_id": "s-7f3a9c",
        "status": "completed",
        "rounds_completed": 10,
        "participants": 3,
        "strategy": "fedavg",
        "secure_aggregation": True,
        "dropped": 1,
        "final_accuracy": ACCURACIES[-1],
        "final_loss": LOSSES[-1],
        "model_cid": "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
        "duration_s": 63.4,
        "bytes_up": 4_812_345,
        "bytes_down": 5_120_000,
        "ledger": "/home/op/.fednode/ledger.db",
        "history": history,
    }
    quality = [
        {
            "round": r,
            "health_score": 70.0 + 2.5 * r,
            "convergence_score": 100.0,
            "model_stability": 80.0 + r,
            "accuracy_improvement": 10.0 * r,
            "participant_retention": 100.0,
            "data_integrity": 100.0,
            "network_efficiency": 48.5,
            "privacy_compliance": 100.0,
            "security_score": 100.0,
            "participant_quality": 79.5,
            "convergence": 60.0 + 3 * r,
        }
        for r in range(1, 11)
    ]
    participants = [
        {
            "peer_id": pid,
            "overall_score": score,
            "performance_score": score + 1,
            "reliability_score": score - 2,
            "network_score": 88.0,
            "resource_score": None,
            "uptime": 99.5 - 10 * i,
            "latency_ms": 12.0 + 40 * i,
            "task_completion_rate": 100.0 - 15 * i,
            "error_rate": 5.0 * i,
            "training_time_ms": 1800.0 + 100 * i,
            "trend": ("improving", "stable", "declining")[i],
            "rounds_completed": 10 - 2 * i,
            "online": i != 2,
        }
        for i, (pid, score) in enumerate(zip(PEERS, SCORES, strict=True))
    ]
    alerts = [
        {
            "id": 7,
            "severity": "critical",
            "alert_type": "uptime",
            "entity_id": PEERS[2],
            "session_id": "s-7f3a9c",
            "message": "uptime 79.5 % is under 95 % (critical): the peer was offline 20 % of it",
            "status": "open",
            "created_at": 1_735_689_600.0,
        },
        {
            "id": 9,
            "severity": "medium",
            "alert_type": "latency",
            "entity_id": PEERS[2],
            "session_id": "s-7f3a9c",
            "message": 'latency 92 ms is over 50 ms "<img src=x onerror=alert(2)>"',
            "status": "acknowledged",
            "created_at": 1_735_689_700.0,
        },
    ]
    sla = {
        "max_training_time": 300000,
        "min_task_completion": 90,
        "min_uptime": 95,
        "max_latency": 500,
        "min_model_quality": 75,
        "min_data_quality": 90,
        "min_convergence_rate": 20,
        "max_error_rate": 5,
        "min_security_score": 90,
        "min_privacy_compliance": 95,
        "max_anomaly_threshold": 10,
    }
    return {
        "session": session,
        "name": name,
        "rounds": 10,
        "quality": quality,
        "participants": participants,
        "alerts": alerts,
        "sla": sla,
        "generated_at": "2025-01-01T00:05:00Z",
    }


def empty_report() -> dict[str, Any]:
    return {
        "session": {
            "session_id": "s-empty",
            "status": "created",
            "rounds_completed": 0,
            "participants": 0,
            "strategy": "fedavg",
            "secure_aggregation": False,
            "dropped": 0,
            "final_accuracy": None,
            "final_loss": None,
            "model_cid": None,
            "duration_s": 0.0,
            "bytes_up": 0,
            "bytes_down": 0,
            "ledger": "/tmp/ledger.db",
            "history": [],
        },
        "name": "fresh",
        "rounds": 5,
        "generated_at": "2025-01-01T00:00:00Z",
    }


class Page(HTMLParser):
    """Elements by id, each with the (tag, attrs) of its descendants and its text.

    It also checks that the markup nests: every end tag closes the element last opened.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.open_ids: list[tuple[str, int]] = []  # (id, depth at which it opened)
        self.by_id: dict[str, dict[str, Any]] = {}
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def _enter(self, tag: str, attrs: list[tuple[str, str | None]], closes: bool) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        for eid, _ in self.open_ids:
            self.by_id[eid]["children"].append((tag, a))
        if "id" in a:
            assert a["id"] not in self.by_id, f"duplicate id {a['id']}"
            self.by_id[a["id"]] = {"tag": tag, "attrs": a, "children": [], "text": []}
            if not closes:
                self.open_ids.append((a["id"], len(self.stack)))
        if not closes:
            self.stack.append(tag)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._enter(tag, attrs, closes=tag in VOID)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._enter(tag, attrs, closes=True)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        while self.open_ids and self.open_ids[-1][1] >= len(self.stack):
            self.open_ids.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for eid, _ in self.open_ids:
            self.by_id[eid]["text"].append(data)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert page.stack == [], f"unclosed elements {page.stack}"
    return page


def points(page: Page, chart_id: str) -> list[tuple[int, float]]:
    return [
        (int(a["data-round"]), float(a["data-value"]))
        for tag, a in page.by_id[chart_id]["children"]
        if tag == "circle"
    ]


def children(page: Page, element_id: str, tag: str) -> list[dict[str, str]]:
    return [a for t, a in page.by_id[element_id]["children"] if t == tag]


def alert_rows(page: Page) -> list[list[str]]:
    return [
        a["class"].split()
        for t, a in page.elements
        if t == "tr" and "alert" in a.get("class", "").split()
    ]


def test_line_charts_carry_every_round() -> None:
    page = parse(render_html(sample_report()))
    assert page.by_id["accuracy-chart"]["tag"] == "svg"
    acc = points(page, "accuracy-chart")
    assert [r for r, _ in acc] == list(range(1, 11))
    assert [round(v, 6) for _, v in acc] == [round(a, 6) for a in ACCURACIES]
    loss = points(page, "loss-chart")
    assert len(loss) == 10
    assert [round(v, 6) for _, v in loss] == [round(x, 6) for x in LOSSES]
    health = points(page, "health-chart")
    assert [v for _, v in health] == [70.0 + 2.5 * r for r in range(1, 11)]
    # each point says what it is when hovered, and the axes have tick labels
    titles = [t for t in page.by_id["accuracy-chart"]["text"] if t.startswith("round ")]
    assert titles[0] == "round 1: accuracy 0.8800"
    ticks = [a for tag, a in page.by_id["accuracy-chart"]["children"] if a.get("class") == "ytick"]
    assert len(ticks) >= 3


def test_scores_chart_has_one_bar_per_participant() -> None:
    page = parse(render_html(sample_report()))
    bars = {a["data-peer"]: float(a["data-value"]) for a in children(page, "scores-chart", "rect")}
    assert bars == dict(zip(PEERS, SCORES, strict=True))


def test_alert_rows_carry_their_severity() -> None:
    page = parse(render_html(sample_report()))
    assert alert_rows(page) == [["alert", "sev-critical"], ["alert", "sev-medium"]]


def test_text_from_other_machines_is_escaped() -> None:
    report = sample_report(name=MALICIOUS)
    report["participants"][0]["peer_id"] = '"><script>alert(3)</script>'
    report["alerts"][0]["severity"] = '"><b>x'
    html = render_html(report)
    assert "<script" not in html
    assert "<img" not in html
    assert "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = parse(html)
    assert MALICIOUS in "".join(page.text)  # shown to the reader, as text
    # an unknown severity sorts after the known ones and gets a neutral class
    assert alert_rows(page) == [["alert", "sev-medium"], ["alert", "sev-unknown"]]


def test_text_report_has_no_control_characters() -> None:
    report = sample_report(name="\x1b[31mred\x1b[0m")
    report["alerts"][0]["message"] = "line one\nline two\x07"
    text = render_text(report)
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "line one\ufffdline two" in text


def test_empty_session_renders() -> None:
    report = empty_report()
    html = render_html(report)
    page = parse(html)
    for chart in ("accuracy-chart", "loss-chart", "scores-chart", "health-chart"):
        assert NO_DATA in "".join(page.by_id[chart]["text"]), chart
        assert not [t for t, _ in page.by_id[chart]["children"] if t in ("circle", "rect")]
    text = render_text(report)
    assert NO_DATA in text
    assert "0/5" in text


def test_none_values_and_missing_keys_are_tolerated() -> None:
    report = sample_report()
    report["session"]["history"][3]["accuracy"] = None
    report["session"]["history"][4]["loss"] = float("nan")
    report["session"]["final_accuracy"] = None
    report["participants"][1]["overall_score"] = None
    report["participants"][1]["uptime"] = None
    report["quality"] = None
    del report["sla"]
    page = parse(render_html(report))
    assert [r for r, _ in points(page, "accuracy-chart")] == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    assert len(points(page, "loss-chart")) == 9
    assert len(children(page, "scores-chart", "rect")) == 2
    assert NO_DATA in "".join(page.by_id["health-chart"]["text"])
    render_text(report)
    # only the session, nothing else at all
    render_html({"session": {}})
    render_text({})


def test_single_round_chart() -> None:
    report = empty_report()
    report["session"]["history"] = [
        {"round": 1, "accuracy": 0.5, "loss": 1.2, "duration_s": 2.0, "participants": 2}
    ]
    page = parse(render_html(report))
    assert points(page, "accuracy-chart") == [(1, 0.5)]


def test_text_report_lists_rounds_peers_and_alerts() -> None:
    report = sample_report()
    text = render_text(report)
    lines = text.splitlines()
    round_lines = [ln.split()[0] for ln in lines if ln.strip() and ln.split()[0].isdigit()]
    for r in range(1, 11):
        assert str(r) in round_lines
    for pid in PEERS:
        assert pid in text
    for alert in report["alerts"]:
        assert alert["message"] in text
    assert "s-7f3a9c" in text
    assert "10/10" in text
    assert report["session"]["model_cid"] in text
    assert report["session"]["ledger"] in text
    assert "min_uptime" in text
    assert "\x1b" not in text


CHROMIUM = Path("/usr/bin/chromium")


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed: no browser rendering check"
)
def test_browser_renders_the_page(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    png = tmp_path / "report.png"
    page.write_text(render_html(sample_report()), encoding="utf-8")
    profile = tmp_path / "profile"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert png.exists()
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"screenshot is only {len(data)} bytes"
