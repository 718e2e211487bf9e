"""The session report of `fedctl report ID` as plain text or one self-contained HTML page.

Input is the dict the coordinator's admin op ``report`` returns (brief "quality interfaces"):
``session`` (the session summary of docs/cli.md, with ``history``), ``name``, ``rounds``,
and the optional ``quality``, ``participants``, ``alerts``, ``sla`` and ``generated_at``.
Both renderers are pure (no network, no files) so the CLI decides where the text goes and
tests can read it back.

Why so defensive: peer IDs, alert messages and session names originate on other machines
that need not be trusted. Every string is stripped of control characters (a terminal report
must not carry ANSI escapes planted by a peer) and, in HTML, escaped; every figure is checked
to be a finite number before it is formatted or plotted, and anything else shows as "–".
The HTML page has no script and forbids loading anything through its Content-Security-Policy,
so even a rendering slip could not make the page run or fetch something.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any

from protocol.alerts import SEVERITIES
from protocol.lifecycle import SessionState
from protocol.messages import EVAL_METRICS, METRIC_LABELS, headline_metric
from protocol.text import clean

DASH = "–"
NO_DATA = "no data yet"

_SEVERITY_RANK = {s.value: i for i, s in enumerate(SEVERITIES)}

# unit of each SLA key (brief, SLA_FIELDS); unknown keys are shown without a unit
SLA_UNITS = {
    "max_training_time": "ms",
    "min_task_completion": "%",
    "min_uptime": "%",
    "max_latency": "ms",
    "min_model_quality": "/100",
    "min_data_quality": "/100",
    "min_convergence_rate": "rounds",
    "max_error_rate": "%",
    "min_security_score": "/100",
    "min_privacy_compliance": "%",
    "max_anomaly_threshold": "%",
}

# the parts of the session health score, in the order a reader weighs them
HEALTH_PARTS = (
    ("health_score", "health"),
    ("convergence", "convergence"),
    ("participant_quality", "participant quality"),
    ("data_integrity", "data integrity"),
    ("network_efficiency", "network efficiency"),
    ("security_score", "security"),
    ("privacy_compliance", "privacy compliance"),
    ("participant_retention", "retention"),
    ("convergence_score", "convergence speed"),
    ("model_stability", "model stability"),
    ("accuracy_improvement", "accuracy improvement"),
)


# --- coercion: figures and strings from other machines ----------------------------------


def _num(v: Any) -> float | None:
    """A finite float, or None for anything else (None, bools, strings, NaN, inf)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None or f != int(f) else int(f)


def _s(v: Any) -> str:
    """Printable text: control and format characters (ESC, newlines, NUL, bidi overrides)
    become U+FFFD, so the reader sees that something was there (protocol.text.clean)."""
    if v is None:
        return ""
    return clean(str(v), None, replacement="\ufffd")


def _fmt(v: Any, pattern: str = "{:.4f}") -> str:
    f = _num(v)
    return DASH if f is None else pattern.format(f)


def _pct(v: Any) -> str:
    return _fmt(v, "{:.1f} %")


def _ms(v: Any) -> str:
    return _fmt(v, "{:.0f} ms")


def _data_value(v: float) -> str:
    """The machine-readable figure of a chart point: 6 significant digits."""
    return f"{v:.6g}"


def _duration(v: Any) -> str:
    s = _num(v)
    if s is None:
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, rest = divmod(round(s), 3600)
    return f"{h} h {rest // 60:02d} min"


def _bytes(v: Any) -> str:
    n = _int(v)
    if n is None:
        return DASH
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            human = f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            break
        size /= 1000
    return f"{n:,} B" if n < 1000 else f"{n:,} B ({human})"


def _onoff(v: Any) -> str:
    if v is None:
        return DASH
    return "on" if v else "off"


def _when(v: Any) -> str:
    """ISO-8601 UTC for epoch seconds; strings (already ISO) as they are."""
    f = _num(v)
    if f is not None:
        try:
            return datetime.fromtimestamp(f, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OverflowError, OSError, ValueError):
            return DASH
    return _s(v) or DASH


def _dicts(v: Any) -> list[dict[str, Any]]:
    """The rows of an optional list key: missing, None or non-dict entries are dropped."""
    if not isinstance(v, list | tuple):
        return []
    return [row for row in v if isinstance(row, dict)]


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


# --- the view both renderers draw -------------------------------------------------------


# the report's traffic table: per participant, its updates' and downloads' bytes
TRAFFIC_HEADERS = ("participant", "updates", "up", "up raw", "up ×", "down", "down ×")


REPORT_PEERS = 40  # participant rows a report shows before it keeps to the weakest


class _View:
    """The report dict normalised once: what both renderers need, missing keys filled."""

    def __init__(self, report: dict[str, Any]) -> None:
        report = _dict(report)
        self.s = _dict(report.get("session"))
        self.name = _s(report.get("name"))
        self.session_id = _s(self.s.get("session_id"))
        self.status = _s(self.s.get("status")) or DASH
        self.rounds_total = _int(report.get("rounds"))
        self.rounds_done = _int(self.s.get("rounds_completed"))
        self.generated_at = _when(report.get("generated_at"))
        history = [h for h in _dicts(self.s.get("history")) if _int(h.get("round")) is not None]
        self.history = sorted(history, key=lambda h: _int(h["round"]) or 0)
        quality = [q for q in _dicts(report.get("quality")) if _int(q.get("round")) is not None]
        self.quality = sorted(quality, key=lambda q: _int(q["round"]) or 0)
        self.health_by_round = {_int(q["round"]): _num(q.get("health_score")) for q in self.quality}
        self.participants = _dicts(report.get("participants"))
        # a federation of hundreds: the weakest REPORT_PEERS by overall score (unscored
        # last), the ones an operator acts on; `fedctl participants list` pages the rest
        self.shown = self.participants
        if len(self.participants) > REPORT_PEERS:
            ranked = sorted(
                self.participants,
                key=lambda p: (_num(p.get("overall_score")) is None, _num(p.get("overall_score"))),
            )
            self.shown = ranked[:REPORT_PEERS]
        n = len(self.participants)
        self.peers_title = (
            f"Participants ({n})"
            if self.shown is self.participants
            else f"Participants (the {len(self.shown)} lowest scores of {n:,}; "
            "`fedctl participants list --sort score` lists every one)"
        )
        alerts = [a for a in _dicts(report.get("alerts")) if a.get("status") != "resolved"]
        self.alerts = sorted(alerts, key=lambda a: _SEVERITY_RANK.get(_s(a.get("severity")), 99))
        self.sla = _dict(report.get("sla"))
        self.audit = _dict(report.get("privacy_audit"))  # {}: no audit was run
        self.final_metrics = _dict(self.s.get("final_metrics"))
        self.traffic = _dicts(self.s.get("traffic_by_participant"))
        # the task's metrics the rounds carry (EVAL_METRICS order; a name a peer made up is
        # not one); a report from before metrics by name has accuracy alone
        have = {m for h in self.history for m in _dict(h.get("metrics"))} | set(self.final_metrics)
        self.metric_names = [m for m in EVAL_METRICS if m in have] or ["accuracy"]
        self.headline = headline_metric(self.metric_names) or "accuracy"

    def metric(self, h: dict[str, Any], name: str) -> float | None:
        """One round's figure: from its metrics by name, or its accuracy column (older)."""
        metrics = _dict(h.get("metrics"))
        if not metrics and name == "accuracy":
            return _num(h.get("accuracy"))
        return _num(metrics.get(name))

    def final(self, name: str) -> float | None:
        if not self.final_metrics and name == "accuracy":
            return _num(self.s.get("final_accuracy"))
        return _num(self.final_metrics.get(name))

    @property
    def round_headers(self) -> list[str]:
        names = [METRIC_LABELS[m] for m in self.metric_names]
        return ["round", *names, "loss", "seconds", "participants", "health", "up ×"]

    def traffic_cells(self) -> list[list[str]]:
        """Per participant: updates, bytes up on the wire and raw, ×, bytes down, ×."""
        return [
            [
                _s(t.get("participant")),
                _fmt(t.get("updates"), "{:.0f}"),
                _bytes(t.get("up_bytes")),
                _bytes(t.get("up_raw")),
                _fmt(t.get("up_ratio"), "{:.1f}x"),
                _bytes(t.get("down_bytes")),
                _fmt(t.get("down_ratio"), "{:.1f}x"),
            ]
            for t in self.traffic
        ]

    @property
    def traffic_rows(self) -> list[tuple[str, str]]:
        """The codec, and the session's bytes up and down, on the wire against raw."""
        comp = _dict(self.s.get("compression"))
        if not comp:
            return []

        def one(wire: str, raw: str, ratio: str) -> str:
            r = _num(comp.get(ratio))
            fewer = f" ({r:.1f}x fewer)" if r is not None else ""
            return f"{_bytes(comp.get(wire))} of {_bytes(comp.get(raw))} raw{fewer}"

        return [
            ("codec", _s(comp.get("codec")) or DASH),
            ("uplink", one("up_bytes", "up_raw", "up_ratio")),
            (
                f"downlink ({_s(comp.get('downlink')) or DASH})",
                one("down_bytes", "down_raw", "down_ratio"),
            ),
        ]

    @property
    def final_rows(self) -> list[tuple[str, str]]:
        return [(f"final {METRIC_LABELS[m]}", _fmt(self.final(m))) for m in self.metric_names]

    @property
    def rounds_label(self) -> str:
        done = DASH if self.rounds_done is None else str(self.rounds_done)
        total = DASH if self.rounds_total is None else str(self.rounds_total)
        return f"{done}/{total}"

    @property
    def latest_quality(self) -> dict[str, Any]:
        return self.quality[-1] if self.quality else {}

    def series(self, key: str) -> list[tuple[int, float | None]]:
        if key in EVAL_METRICS:
            return [(_int(h["round"]) or 0, self.metric(h, key)) for h in self.history]
        return [(_int(h["round"]) or 0, _num(h.get(key))) for h in self.history]

    def health_series(self) -> list[tuple[int, float | None]]:
        return [(_int(q["round"]) or 0, _num(q.get("health_score"))) for q in self.quality]

    def round_rows(self) -> list[list[str]]:
        """round, the task's metrics, loss, seconds, participants, health, how many times
        fewer bytes its uplink carried than float32 (— when not computed)."""
        return [
            [
                str(_int(h["round"])),
                *(_fmt(self.metric(h, m)) for m in self.metric_names),
                _fmt(h.get("loss")),
                _fmt(h.get("duration_s"), "{:.2f}"),
                _fmt(h.get("participants"), "{:.0f}"),
                _fmt(self.health_by_round.get(_int(h["round"])), "{:.1f}"),
                _fmt(h.get("up_ratio"), "{:.1f}x"),
            ]
            for h in self.history
        ]


# --- plain text ---------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """Columns padded to fit; `align` has one "l" or "r" a column (missing: right, for figures)."""
    rows = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if align[i : i + 1] == "l" else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _participant_cells(p: dict[str, Any]) -> list[str]:
    return [
        _s(p.get("peer_id")) or DASH,
        _fmt(p.get("overall_score"), "{:.1f}"),
        _fmt(p.get("performance_score"), "{:.1f}"),
        _fmt(p.get("reliability_score"), "{:.1f}"),
        _fmt(p.get("network_score"), "{:.1f}"),
        _fmt(p.get("resource_score"), "{:.1f}"),
        _pct(p.get("uptime")),
        _ms(p.get("latency_ms")),
        _pct(p.get("task_completion_rate")),
        _s(p.get("trend")) or DASH,
    ]


_AUDIT_FIGURES = ("auc", "accuracy", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr")
_AUDIT_HEADERS = ["attack", "AUC", "accuracy", "TPR @ 0.1 % FPR", "TPR @ 1 % FPR"]


def _audit_summary(a: dict[str, Any]) -> str:
    """One line on what a privacy audit attacked (fedctl audit privacy)."""
    return (
        f"model {_s(a.get('model_cid')) or DASH}, {_s(a.get('members'))} members "
        f"({_s(a.get('members_data'))}) against {_s(a.get('nonmembers'))} non-members "
        f"({_s(a.get('nonmembers_data'))}), {_s(a.get('shadow_models'))} shadow models; "
        f"run {_when(a.get('ts'))} by {_s(a.get('by')) or DASH}"
    )


def _audit_rows(a: dict[str, Any]) -> list[list[str]]:
    return [
        [_s(name), *(_fmt(_dict(figures).get(f), "{:.3f}") for f in _AUDIT_FIGURES)]
        for name, figures in _dict(a.get("attacks")).items()
    ]


def render_text(report: dict[str, Any]) -> str:
    """The report for a terminal or a text file: plain lines, no ANSI codes, full peer IDs."""
    v = _View(report)
    s = v.s
    title = f"fednode session report: {v.name}" if v.name else "fednode session report"
    out = [title, "=" * len(title), f"generated {v.generated_at}", ""]
    summary = [
        ("session", v.session_id or DASH),
        ("name", v.name or DASH),
        ("status", v.status),
        ("rounds", v.rounds_label),
        ("participants", _fmt(s.get("participants"), "{:.0f}")),
        ("strategy", _s(s.get("strategy")) or DASH),
        ("secure aggregation", _onoff(s.get("secure_aggregation"))),
        ("dropped", _fmt(s.get("dropped"), "{:.0f}")),
        *v.final_rows,
        ("final loss", _fmt(s.get("final_loss"))),
        ("health", _fmt(v.latest_quality.get("health_score"), "{:.1f} / 100")),
        ("duration", _duration(s.get("duration_s"))),
        ("bytes up", _bytes(s.get("bytes_up"))),
        ("bytes down", _bytes(s.get("bytes_down"))),
        *v.traffic_rows,
        ("model CID", _s(s.get("model_cid")) or DASH),
        ("ledger", _s(s.get("ledger")) or DASH),
    ]
    width = max(len(k) for k, _ in summary)
    out += [f"{k.ljust(width)}  {val}" for k, val in summary]

    out += ["", "Rounds"]
    if v.history:
        out += _table(v.round_headers, v.round_rows())
    else:
        out.append(f"  {NO_DATA}")

    if v.quality:
        latest = v.latest_quality
        parts = [
            f"{label} {_fmt(latest.get(key), '{:.1f}')}"
            for key, label in HEALTH_PARTS
            if key != "health_score"
        ]
        out += ["", f"Health parts (round {_int(latest['round'])})"]
        out += textwrap.wrap(", ".join(parts), 96, initial_indent="  ", subsequent_indent="  ")

    if v.traffic:
        out += ["", "Traffic (bytes of each participant's updates and downloads)"]
        out += _table(TRAFFIC_HEADERS, v.traffic_cells(), "l" + "r" * 6)

    out += ["", v.peers_title]
    if v.shown:
        headers = [
            "peer",
            "overall",
            "perf",
            "reliab",
            "network",
            "resource",
            "uptime",
            "latency",
            "completion",
            "trend",
        ]
        cells = (_participant_cells(p) for p in v.shown)
        out += _table(headers, cells, "l" + "r" * 8 + "l")
    else:
        out.append(f"  {NO_DATA}")

    out += ["", f"Active alerts ({len(v.alerts)})"]
    if v.alerts:
        rows = [
            [
                _s(a.get("severity")) or DASH,
                _s(a.get("alert_type")) or DASH,
                _s(a.get("status")) or DASH,
                _s(a.get("entity_id")) or DASH,
                _s(a.get("message")),
            ]
            for a in v.alerts
        ]
        out += _table(["severity", "type", "status", "entity", "message"], rows, "lllll")
    else:
        out.append("  none")

    if v.audit:
        out += ["", "Privacy audit (membership inference)", f"  {_audit_summary(v.audit)}"]
        out += _table(_AUDIT_HEADERS, _audit_rows(v.audit), "lrrrr")

    out += ["", "SLA in force"]
    if v.sla:
        width = max(len(_s(k)) for k in v.sla)
        for key, value in v.sla.items():
            unit = SLA_UNITS.get(key, "")
            shown = _fmt(value, "{:g}") if _num(value) is not None else _s(value) or DASH
            out.append(f"  {_s(key).ljust(width)}  {shown} {unit}".rstrip())
    else:
        out.append(f"  {NO_DATA}")
    return "\n".join(out) + "\n"


# --- SVG charts -------------------------------------------------------------------------

_W, _H = 560, 260
_ML, _MR, _MT, _MB = 60, 18, 14, 44  # margins: left (tick labels), right, top, bottom
_PLOTTABLE = 1e12
_PAD = 10  # inner padding so the first and last points do not sit on the axes


def _e(v: Any) -> str:
    """HTML text or attribute value: control characters removed, then escaped."""
    return escape(_s(v), quote=True)


def _decimals(step: float) -> int:
    for d in range(10):
        if abs(round(step, d) - step) <= abs(step) * 1e-6:
            return d
    return 10


def _nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[list[float], int]:
    """Round tick values covering [lo, hi] (steps 1, 2, 2.5, 5 x 10^k) and their decimals."""
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag * (1 + 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    n = round((end - start) / step)
    d = _decimals(step)
    return [round(start + i * step, d + 2) for i in range(n + 1)], d


def _round_ticks(x0: int, x1: int) -> list[int]:
    """Integer round ticks, at most about 10 labels whatever the number of rounds."""
    span = x1 - x0
    step = 1
    if span > 10:
        mag = 10 ** (len(str(span)) - 2)  # span / 10 rounded down to a power of ten
        step = next(m * mag for m in (1, 2, 5, 10, 20, 50) if span <= 10 * m * mag)
    first = -(-x0 // step) * step
    return list(range(first, x1 + 1, step))


def _no_data(chart_id: str, label: str) -> str:
    return (
        f'<div class="chart no-data" id="{chart_id}" role="img" '
        f'aria-label="{_e(label)}: {NO_DATA}">{NO_DATA}</div>'
    )


def _line_chart(
    chart_id: str,
    label: str,
    series: list[tuple[int, float | None]],
    *,
    fmt: Callable[[float], str],
    color: str,
    domain: tuple[float, float] | None = None,
    clamp: tuple[float, float] | None = None,
    include_zero: bool = False,
) -> str:
    """An SVG line chart of one value per round: axes, ticks, a polyline and one point each.

    The y scale fits the data (with a little air, kept inside ``clamp``), or is ``domain``
    when given. Rounds without a value (None) leave a gap in the line and get no point.
    Every point is a <circle> with ``data-round``/``data-value`` and a <title>, so a reader
    can hover for the figure and a test can read the figures back.
    """
    # figures past 1e12 are no accuracy, loss or score: they stay in the tables, not the plot
    series = [(r, None if val is None or abs(val) > _PLOTTABLE else val) for r, val in series]
    pts = sorted((r, val) for r, val in series if val is not None)
    if not pts:
        return _no_data(chart_id, label)
    values = [val for _, val in pts]
    lo, hi = min(values), max(values)
    if domain is None:  # a little air so the extreme points do not sit on the axes
        air = (hi - lo) * 0.04 or abs(lo) * 0.05 or 0.5
        lo, hi = lo - air, hi + air
        if clamp is not None:  # e.g. accuracy: never an axis past 1
            lo, hi = max(lo, min(clamp[0], *values)), min(hi, max(clamp[1], *values))
    else:  # a fixed scale (0..100), widened only for figures outside it
        lo, hi = min(lo, domain[0]), max(hi, domain[1])
    if include_zero:
        lo = min(lo, 0.0)
    yticks, yd = _nice_ticks(lo, hi)
    y0, y1 = yticks[0], yticks[-1]
    x0, x1 = pts[0][0], pts[-1][0]
    pw, ph = _W - _ML - _MR, _H - _MT - _MB

    def sx(r: float) -> float:
        if x1 == x0:
            return _ML + pw / 2
        return _ML + _PAD + (r - x0) / (x1 - x0) * (pw - 2 * _PAD)

    def sy(val: float) -> float:
        return _MT + ph - (val - y0) / (y1 - y0) * ph

    el = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{_e(label)}</title>",
        '<g class="grid">',
    ]
    for t in yticks:
        y = sy(t)
        el.append(f'<line x1="{_ML}" y1="{y:.1f}" x2="{_W - _MR}" y2="{y:.1f}"/>')
    el.append("</g>")
    el.append('<g class="axis">')
    el.append(f'<line x1="{_ML}" y1="{_MT}" x2="{_ML}" y2="{_MT + ph}"/>')
    el.append(f'<line x1="{_ML}" y1="{_MT + ph}" x2="{_W - _MR}" y2="{_MT + ph}"/>')
    for t in yticks:
        y = sy(t)
        el.append(f'<line x1="{_ML - 4}" y1="{y:.1f}" x2="{_ML}" y2="{y:.1f}"/>')
        el.append(
            f'<text class="ytick" x="{_ML - 7}" y="{y + 4:.1f}" text-anchor="end">{t:.{yd}f}</text>'
        )
    for r in _round_ticks(x0, x1):
        x = sx(r)
        el.append(f'<line x1="{x:.1f}" y1="{_MT + ph}" x2="{x:.1f}" y2="{_MT + ph + 4}"/>')
        el.append(
            f'<text class="xtick" x="{x:.1f}" y="{_MT + ph + 17}" text-anchor="middle">{r}</text>'
        )
    el.append(
        f'<text class="axis-label" x="{_ML + pw / 2:.1f}" y="{_H - 6}" '
        f'text-anchor="middle">round</text>'
    )
    el.append(
        f'<text class="axis-label" x="14" y="{_MT + ph / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {_MT + ph / 2:.1f})">{_e(label.split(" per ")[0])}</text>'
    )
    el.append("</g>")
    # the line, broken where a round has no value
    segment: list[str] = []
    segments: list[list[str]] = []
    for r, val in sorted(series, key=lambda point: point[0]):
        if val is None:
            if segment:
                segments.append(segment)
            segment = []
        else:
            segment.append(f"{sx(r):.1f},{sy(val):.1f}")
    if segment:
        segments.append(segment)
    for seg in segments:
        el.append(f'<polyline class="line" stroke="{color}" points="{" ".join(seg)}"/>')
    radius = 4 if len(pts) <= 40 else 2.5 if len(pts) <= 120 else 1.5
    name = label.split(" per ")[0]
    el.append(f'<g class="points" fill="{color}">')
    for r, val in pts:
        el.append(
            f'<circle class="point" cx="{sx(r):.1f}" cy="{sy(val):.1f}" r="{radius}" '
            f'data-round="{r}" data-value="{_data_value(val)}">'
            f"<title>round {r}: {_e(name)} {fmt(val)}</title></circle>"
        )
    el.append("</g></svg>")
    return "\n".join(el)


def _score_color(v: float) -> str:
    """Green at 90 and over, amber from the alert line (70) to 90, red under it."""
    if v >= 90:
        return "#2e7d32"
    if v >= 70:
        return "#f9a825"
    return "#c62828"


def _scores_chart(participants: list[dict[str, Any]]) -> str:
    """Horizontal bars of overall scores (0..100), best first, with the 70 alert line."""
    rows = [(_s(p.get("peer_id")), _num(p.get("overall_score"))) for p in participants]
    scored = sorted(((pid, val) for pid, val in rows if val is not None), key=lambda x: -x[1])
    label = "Participants' overall quality score"
    if not scored:
        return _no_data("scores-chart", label)
    ml, mr, mt, mb = 110, 56, 10, 40
    # as tall as the line chart beside it for a few peers, growing 30 px a peer beyond that
    row = max(30.0, (_H - mt - mb) / len(scored))
    bar = min(28.0, row * 0.6)
    gap = row - bar
    height = round(mt + len(scored) * row + mb)
    pw = _W - ml - mr
    plot_bottom = mt + len(scored) * row

    def sx(val: float) -> float:
        return ml + max(0.0, min(100.0, val)) / 100 * pw

    el = [
        f'<svg id="scores-chart" class="chart" viewBox="0 0 {_W} {height}" role="img" '
        f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{_e(label)}</title>",
        '<g class="grid">',
    ]
    for t in range(0, 101, 20):
        el.append(f'<line x1="{sx(t):.1f}" y1="{mt}" x2="{sx(t):.1f}" y2="{plot_bottom:.1f}"/>')
    el.append("</g>")
    el.append('<g class="axis">')
    el.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{plot_bottom:.1f}"/>')
    el.append(f'<line x1="{ml}" y1="{plot_bottom:.1f}" x2="{ml + pw}" y2="{plot_bottom:.1f}"/>')
    for t in range(0, 101, 20):
        x = sx(t)
        el.append(
            f'<line x1="{x:.1f}" y1="{plot_bottom:.1f}" x2="{x:.1f}" y2="{plot_bottom + 4:.1f}"/>'
        )
        el.append(
            f'<text class="xtick" x="{x:.1f}" y="{plot_bottom + 17:.1f}" '
            f'text-anchor="middle">{t}</text>'
        )
    el.append(
        f'<text class="axis-label" x="{ml + pw / 2:.1f}" y="{height - 6}" '
        f'text-anchor="middle">overall score</text>'
    )
    el.append("</g>")
    el.append('<g class="bars">')
    for i, (pid, val) in enumerate(scored):
        y = mt + gap / 2 + i * (bar + gap)
        short = "…" + pid[-8:] if len(pid) > 9 else pid
        el.append(
            f'<text class="bar-label" x="{ml - 8}" y="{y + bar / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(short)}<title>{_e(pid)}</title></text>'
        )
        el.append(
            f'<rect class="bar" x="{ml}" y="{y:.1f}" width="{sx(val) - ml:.1f}" height="{bar:.1f}" '
            f'fill="{_score_color(val)}" data-peer="{_e(pid)}" data-value="{_data_value(val)}">'
            f"<title>{_e(pid)}: overall {val:.1f}</title></rect>"
        )
        el.append(
            f'<text class="bar-value" x="{sx(val) + 6:.1f}" y="{y + bar / 2 + 4:.1f}">'
            f"{val:.1f}</text>"
        )
    el.append("</g>")
    x70 = sx(70)
    el.append(
        f'<line class="threshold" x1="{x70:.1f}" y1="{mt}" x2="{x70:.1f}" y2="{plot_bottom:.1f}">'
        "<title>quality_score alert under 70</title></line>"
    )
    el.append("</svg>")
    return "\n".join(el)


# --- HTML -------------------------------------------------------------------------------

_CSS = """
:root { --fg: #1d232b; --muted: #5f6b7a; --line: #d9dee5; --bg: #f6f7f9; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 22px; margin: 0 0 2px; overflow-wrap: anywhere; }
h2 { font-size: 16px; margin: 28px 0 10px; }
.sub { color: var(--muted); margin: 0 0 18px; }
.mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: 12.5px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; }
.card .k { color: var(--muted); font-size: 12px; }
.card .v { font-size: 18px; font-weight: 600; }
dl.ids { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 14px 0 0;
  background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; }
dl.ids dt { color: var(--muted); }
dl.ids dd { margin: 0; }
.status { display: inline-block; padding: 1px 8px; border-radius: 10px; color: #fff;
  background: #607d8b; font-size: 13px; vertical-align: middle; }
.status-completed { background: #2e7d32; } .status-running { background: #0277bd; }
.status-paused { background: #f9a825; color: #1d232b; } .status-failed { background: #c62828; }
.status-stopped { background: #8e24aa; } .status-created { background: #78909c; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 14px; }
figure { margin: 0; background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px 6px; }
figcaption { font-weight: 600; margin-bottom: 4px; }
svg.chart { width: 100%; height: auto; display: block; }
svg .grid line { stroke: #eceff3; }
svg .axis line { stroke: #8a94a3; }
svg text { fill: var(--muted); font-size: 11.5px; }
svg .axis-label { fill: var(--fg); font-size: 12px; }
svg .line { fill: none; stroke-width: 2; stroke-linejoin: round; }
svg .point { stroke: #fff; stroke-width: 1.5; }
svg .bar-label { fill: var(--fg); font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
svg .bar-value { fill: var(--fg); font-weight: 600; }
svg .threshold { stroke: #c62828; stroke-dasharray: 4 3; stroke-width: 1.2; }
.no-data { display: flex; align-items: center; justify-content: center; min-height: 120px;
  color: var(--muted); font-style: italic; background: repeating-linear-gradient(
  -45deg, #fafbfc, #fafbfc 8px, #f3f5f7 8px, #f3f5f7 16px); border-radius: 6px; }
.tablewrap { overflow-x: auto; background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: 6px 9px; border-bottom: 1px solid var(--line); text-align: right;
  vertical-align: top; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; font-size: 12.5px; }
tr:last-child td { border-bottom: 0; }
td.l, th.l { text-align: left; }
td.msg { white-space: normal; text-align: left; min-width: 260px; }
.pid { display: block; width: 26.5ch; white-space: normal; word-break: break-all; }
.state { display: block; font-family: system-ui, sans-serif; font-size: 12px; }
.tablewrap.narrow { max-width: 760px; }
.cards.parts { grid-template-columns: repeat(auto-fill, minmax(130px, 1fr)); }
.cards.parts .v { font-size: 16px; }
td.empty { text-align: center; color: var(--muted); font-style: italic; }
tr.sev-critical td { background: #fdecea; } tr.sev-critical td:first-child {
  box-shadow: inset 4px 0 #c62828; }
tr.sev-high td { background: #fff1e0; } tr.sev-high td:first-child {
  box-shadow: inset 4px 0 #ef6c00; }
tr.sev-medium td { background: #fffbe0; } tr.sev-medium td:first-child {
  box-shadow: inset 4px 0 #f9a825; }
tr.sev-low td { background: #f3f4f6; } tr.sev-low td:first-child {
  box-shadow: inset 4px 0 #9e9e9e; }
.badge { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px;
  font-weight: 600; color: #fff; background: #9e9e9e; }
.badge.critical { background: #c62828; } .badge.high { background: #ef6c00; }
.badge.medium { background: #f9a825; color: #1d232b; } .badge.low { background: #9e9e9e; }
.trend-improving { color: #2e7d32; } .trend-declining { color: #c62828; }
.online { color: #2e7d32; } .offline { color: var(--muted); }
footer { color: var(--muted); margin-top: 28px; font-size: 12px; }
@media print { body { background: #fff; }
  .card, figure, .tablewrap, dl.ids { break-inside: avoid; } }
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _html_table(
    headers: Sequence[tuple[str, str]],
    rows: Sequence[tuple[str, Sequence[tuple[str, str]]]],
    empty: str,
    wrap_class: str = "",
) -> str:
    """headers: (text, css class); rows: (tr class, [(escaped cell html, td class)])."""
    head = "".join(
        f'<th class="{cls}" scope="col">{_e(h)}</th>' if cls else f'<th scope="col">{_e(h)}</th>'
        for h, cls in headers
    )
    body = []
    for tr_cls, cells in rows:
        tds = "".join(f'<td class="{cls}">{c}</td>' if cls else f"<td>{c}</td>" for c, cls in cells)
        body.append(f'<tr class="{tr_cls}">{tds}</tr>' if tr_cls else f"<tr>{tds}</tr>")
    if not rows:
        body.append(f'<tr><td class="empty" colspan="{len(headers)}">{_e(empty)}</td></tr>')
    return (
        f'<div class="tablewrap {wrap_class}"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _figure(caption: str, chart: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{chart}</figure>"


def _severity(v: Any) -> str:
    """A known severity for CSS classes; anything else (from a peer) is 'unknown'."""
    v = _s(v)
    return v if v in _SEVERITY_RANK else "unknown"


def render_html(report: dict[str, Any]) -> str:
    """One HTML5 page with inline CSS and SVG: no script, no external assets, all escaped."""
    v = _View(report)
    s = v.s
    status = _s(s.get("status"))
    status_cls = status if status in _STATUS_CLASSES else "other"
    title = f"Session report: {v.name or v.session_id or 'unnamed session'}"

    cards = [
        ("rounds", v.rounds_label),
        ("participants", _fmt(s.get("participants"), "{:.0f}")),
        *v.final_rows,
        ("final loss", _fmt(s.get("final_loss"))),
        ("health", _fmt(v.latest_quality.get("health_score"), "{:.1f}")),
        ("duration", _duration(s.get("duration_s"))),
        ("strategy", _s(s.get("strategy")) or DASH),
        ("secure aggregation", _onoff(s.get("secure_aggregation"))),
        ("dropped", _fmt(s.get("dropped"), "{:.0f}")),
        ("active alerts", str(len(v.alerts))),
    ]
    cards_html = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(val)}</div></div>'
        for k, val in cards
    )
    ids = [
        ("session", v.session_id or DASH),
        ("model CID", _s(s.get("model_cid")) or DASH),
        ("ledger", _s(s.get("ledger")) or DASH),
        ("bytes up", _bytes(s.get("bytes_up"))),
        ("bytes down", _bytes(s.get("bytes_down"))),
        *v.traffic_rows,
    ]
    ids_html = "".join(f'<dt>{_e(k)}</dt><dd class="mono">{_e(val)}</dd>' for k, val in ids)

    acc = _line_chart(  # the task's headline metric: accuracy, else R², else MAE
        f"{v.headline}-chart",
        f"{METRIC_LABELS[v.headline]} per round",
        v.series(v.headline),
        fmt=lambda x: f"{x:.4f}",
        color="#1565c0",
        clamp=EVAL_METRICS[v.headline],  # e.g. accuracy never on an axis past 1
    )
    loss = _line_chart(
        "loss-chart",
        "loss per round",
        v.series("loss"),
        fmt=lambda x: f"{x:.4f}",
        color="#d84315",
        clamp=(0.0, math.inf),
        include_zero=True,
    )
    health = _line_chart(
        "health-chart",
        "health score per round",
        v.health_series(),
        fmt=lambda x: f"{x:.1f}",
        color="#2e7d32",
        domain=(0.0, 100.0),
    )
    scores = _scores_chart(v.shown)

    round_rows = [("", [(_e(c), "") for c in row]) for row in v.round_rows()]
    rounds_table = _html_table(
        [(h, "") for h in v.round_headers],
        round_rows,
        NO_DATA,
        "narrow",
    )

    health_html = ""
    if v.quality:
        latest = v.latest_quality
        health_html = (
            f'<h2>Health parts <span class="sub">(round {_int(latest["round"])})</span></h2>'
            + '<div class="cards parts">'
            + "".join(
                f'<div class="card"><div class="k">{_e(label)}</div>'
                f'<div class="v">{_e(_fmt(latest.get(k), "{:.1f}"))}</div></div>'
                for k, label in HEALTH_PARTS
            )
            + "</div>"
        )

    p_rows = []
    for p in v.shown:
        trend = _s(p.get("trend")) or DASH
        online = p.get("online")
        state = (
            ""
            if online is None
            else '<span class="state online">● online</span>'
            if online
            else '<span class="state offline">○ offline</span>'
        )
        cells = [
            (f'<span class="pid">{_e(p.get("peer_id") or DASH)}</span>{state}', "l mono"),
            (_e(_fmt(p.get("overall_score"), "{:.1f}")), ""),
            (_e(_fmt(p.get("performance_score"), "{:.1f}")), ""),
            (_e(_fmt(p.get("reliability_score"), "{:.1f}")), ""),
            (_e(_fmt(p.get("network_score"), "{:.1f}")), ""),
            (_e(_fmt(p.get("resource_score"), "{:.1f}")), ""),
            (_e(_pct(p.get("uptime"))), ""),
            (_e(_ms(p.get("latency_ms"))), ""),
            (_e(_pct(p.get("task_completion_rate"))), ""),
            (_e(_pct(p.get("error_rate"))), ""),
            (_e(_ms(p.get("training_time_ms"))), ""),
            (_e(_fmt(p.get("rounds_completed"), "{:.0f}")), ""),
            (_e(trend), f"l trend-{_e(trend)}" if trend in _TRENDS else "l"),
        ]
        p_rows.append(("", cells))
    p_headers = [
        ("peer ID", "l"),
        ("overall", ""),
        ("perf", ""),
        ("reliab", ""),
        ("network", ""),
        ("resource", ""),
        ("uptime", ""),
        ("latency", ""),
        ("completion", ""),
        ("errors", ""),
        ("train time", ""),
        ("rounds", ""),
        ("trend", "l"),
    ]
    participants_table = _html_table(p_headers, p_rows, NO_DATA)
    traffic_html = ""
    if v.traffic:
        t_rows = [
            ("", [(_e(c), "l mono" if i == 0 else "") for i, c in enumerate(row)])
            for row in v.traffic_cells()
        ]
        t_headers = [(h, "l" if i == 0 else "") for i, h in enumerate(TRAFFIC_HEADERS)]
        traffic_html = f"<h2>Traffic</h2>\n{_html_table(t_headers, t_rows, NO_DATA)}\n"

    a_rows = []
    for a in v.alerts:
        sev = _severity(a.get("severity"))
        cells = [
            (f'<span class="badge {sev}">{_e(a.get("severity") or DASH)}</span>', "l"),
            (_e(a.get("alert_type") or DASH), "l"),
            (_e(a.get("status") or DASH), "l"),
            (f'<span class="pid">{_e(a.get("entity_id") or DASH)}</span>', "l mono"),
            (_e(a.get("message")), "msg"),
            (_e(_when(a.get("created_at"))), "l"),
        ]
        a_rows.append((f"alert sev-{sev}", cells))
    alerts_table = _html_table(
        [(h, "l") for h in ("severity", "type", "status", "entity", "message", "raised")],
        a_rows,
        "no active alerts",
    )

    sla_rows = []
    for key, value in v.sla.items():
        shown = _fmt(value, "{:g}") if _num(value) is not None else _s(value) or DASH
        sla_rows.append(
            ("", [(_e(key), "l mono"), (_e(shown), ""), (_e(SLA_UNITS.get(key, "")), "l")])
        )
    sla_table = _html_table(
        [("key", "l"), ("value", ""), ("unit", "l")], sla_rows, NO_DATA, "narrow"
    )

    audit_html = ""
    if v.audit:
        audit_table = _html_table(
            [(h, "l" if i == 0 else "") for i, h in enumerate(_AUDIT_HEADERS)],
            [
                ("", [(_e(c), "l" if i == 0 else "") for i, c in enumerate(row)])
                for row in _audit_rows(v.audit)
            ],
            NO_DATA,
        )
        audit_html = (
            "<h2>Privacy audit (membership inference)</h2>\n"
            f'<p class="sub">{_e(_audit_summary(v.audit))}</p>\n{audit_table}\n'
        )

    name_html = _e(v.name) if v.name else "unnamed session"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>{name_html} <span class="status status-{status_cls}">{_e(status or DASH)}</span></h1>
<p class="sub">fednode session report, generated {_e(v.generated_at)}</p>
<section id="summary">
<div class="cards">{cards_html}</div>
<dl class="ids">{ids_html}</dl>
</section>
<h2>Training</h2>
<div class="charts">
{_figure("Accuracy per round", acc)}
{_figure("Loss per round", loss)}
</div>
<h2>Quality</h2>
<div class="charts">
{_figure("Participants' overall score (0–100)", scores)}
{_figure("Session health score per round (0–100)", health)}
</div>
<h2>Rounds</h2>
{rounds_table}
{health_html}
{traffic_html}<h2>{_e(v.peers_title)}</h2>
{participants_table}
<h2>Active alerts ({len(v.alerts)})</h2>
{alerts_table}
{audit_html}<h2>SLA in force</h2>
{sla_table}
<footer>fednode · figures from the coordinator's ledger · peer IDs and messages are shown as
received</footer>
</main>
</body>
</html>
"""


_STATUS_CLASSES = frozenset(s.value for s in SessionState)
_TRENDS = {"improving", "stable", "declining"}
