"""Quality scores, service levels (SLA) and alert rules: the math, with no I/O.

The coordinator measures raw figures (``ParticipantObservation``, ``SessionObservation``);
this module turns them into 0..100 scores and into the alert conditions that hold right now.
Keeping it pure means every formula is tested with hand-computed numbers and the monitor
(``fednode.monitor``) only observes and persists. docs/quality.md explains each figure to an
operator.

Three rules hold everywhere, because a score is compared, averaged and stored as JSON:

* every score is clamped to 0..100 and is finite: nothing NaN or infinite leaves this module;
* a figure that was not measured is ``None`` (a non-finite input counts as not measured) and
  is left out of every mean, never counted as 0; weights are renormalised over what exists;
* a figure that is ``None`` raises no alert.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from protocol.alerts import ALERT_SEVERITY
from protocol.errors import ValidationError
from protocol.messages import MAX_LABEL_CHARS, MAX_LABELS

# --- severities and alert types -------------------------------------------------------------

# The words (severities, every alert type with its severity) are protocol.alerts'; the rules
# that raise rule alerts are below.

# Fixed thresholds of the participant rules (the others come from the SLA).
TASK_COMPLETION_MIN = 80.0
UPTIME_MIN = 90.0
QUALITY_SCORE_MIN = 70.0
ERROR_RATE_MAX = 10.0
HEARTBEAT_MIN = 80.0
RESOURCE_MIN = 60.0
CONNECTION_STABILITY_MIN = 80.0

# --- the SLA ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Limit:
    """How one SLA key is checked and explained."""

    kind: str  # "float" | "int"
    lo: float
    hi: float
    lo_open: bool  # True: the value must be > lo (a limit of 0 would reject everything)
    unit: str
    doc: str

    def accepted(self) -> str:
        what = "an integer" if self.kind == "int" else "a number"
        low = f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}"
        return f"{what} {low} and <= {_num(self.hi)} ({self.unit})"


_PCT = (0.0, 100.0, False)
_LIMITS: dict[str, _Limit] = {
    "max_training_time": _Limit(
        "float", 0.0, 86_400_000.0, True, "ms", "median training time a participant may take"
    ),
    "min_task_completion": _Limit(
        "float", *_PCT, "%", "share of selected tasks a participant should complete"
    ),
    "min_uptime": _Limit("float", *_PCT, "%", "share of the window a participant should be up"),
    "max_latency": _Limit("float", 0.0, 600_000.0, True, "ms", "median ping round trip"),
    "min_model_quality": _Limit(
        "float", *_PCT, "score 0..100", "model quality under which a participant is alerted"
    ),
    "min_data_quality": _Limit(
        "float", *_PCT, "score 0..100", "data quality under which a participant is alerted"
    ),
    "min_convergence_rate": _Limit(
        "int", 1.0, 100_000.0, False, "rounds", "rounds within which a session should converge"
    ),
    "max_error_rate": _Limit("float", *_PCT, "%", "share of selected tasks a participant may fail"),
    "min_security_score": _Limit(
        "float", *_PCT, "score 0..100", "session security score under which it is alerted"
    ),
    "min_privacy_compliance": _Limit(
        "float", *_PCT, "%", "share of rounds that must run with the privacy the spec asks for"
    ),
    "max_anomaly_threshold": _Limit(
        "float", *_PCT, "%", "share of anomalous updates in a round before an alert"
    ),
}

#: The SLA file's keys with their defaults (units in docs/quality.md).
SLA_FIELDS: dict[str, float | int] = {
    "max_training_time": 300_000,
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

_SLA_HINT = "fix the key in the SLA file; docs/quality.md lists every key with its default"


def _num(v: float) -> str:
    """A number as a person writes it: 300000, not 300000.0."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _show(value: object) -> str:
    """A value as it appears in a JSON file, so the error matches what the operator wrote."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_sla_value(key: str, value: object) -> float | int:
    """The value of one SLA key, converted, or a ValidationError naming key, value and range."""
    lim = _LIMITS[key]

    def bad() -> ValidationError:
        return ValidationError(
            f"SLA key {key!r} = {_show(value)} is not accepted: expected {lim.accepted()}",
            hint=f"{key}: {lim.doc}; {_SLA_HINT}",
            code="SLA_INVALID",
        )

    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad()
    if lim.kind == "int" and not isinstance(value, int):
        raise bad()
    try:
        v = float(value)
    except OverflowError:  # an integer too large for a float: out of range anyway
        raise bad() from None
    if not math.isfinite(v):
        raise bad()
    too_low = v <= lim.lo if lim.lo_open else v < lim.lo
    if too_low or v > lim.hi:
        raise bad()
    return int(value) if lim.kind == "int" else v


@dataclass(frozen=True)
class SLA:
    """The service levels a coordinator holds its participants and sessions to.

    Built directly or from a file, every value is checked (``__post_init__``), so an SLA
    that exists is a valid one and no formula has to guard against a zero limit.
    """

    max_training_time: float = 300_000.0
    min_task_completion: float = 90.0
    min_uptime: float = 95.0
    max_latency: float = 500.0
    min_model_quality: float = 75.0
    min_data_quality: float = 90.0
    min_convergence_rate: int = 20
    max_error_rate: float = 5.0
    min_security_score: float = 90.0
    min_privacy_compliance: float = 95.0
    max_anomaly_threshold: float = 10.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _check_sla_value(f.name, getattr(self, f.name)))

    def to_dict(self) -> dict[str, float | int]:
        """The SLA as its JSON keys, for the report and the ledger."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def sla_from_dict(d: Mapping[str, Any]) -> SLA:
    """An SLA from a parsed JSON object; missing keys take their defaults.

    An unknown key is refused rather than ignored: a misspelt ``max_latancy`` would otherwise
    silently leave the default in force.
    """
    if not isinstance(d, Mapping):
        raise ValidationError(
            f"an SLA must be a JSON object of keys, got {type(d).__name__}; "
            f"known keys: {', '.join(SLA_FIELDS)}",
            hint=_SLA_HINT,
            code="SLA_INVALID",
        )
    unknown = [k for k in d if k not in SLA_FIELDS]
    if unknown:
        raise ValidationError(
            f"unknown SLA key {unknown[0]!r}; known keys: {', '.join(SLA_FIELDS)}",
            hint=_SLA_HINT,
            code="SLA_INVALID",
        )
    return SLA(**{k: d[k] for k in SLA_FIELDS if k in d})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a key written twice is an error, not "the last one wins"."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValidationError(
                f"SLA key {k!r} appears twice", hint=_SLA_HINT, code="SLA_INVALID"
            )
        out[k] = v
    return out


def load_sla(path: str | Path) -> SLA:
    """The SLA in a JSON file (the only I/O in this module); every error says which file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValidationError(
            f"cannot read SLA file {p}: {exc.strerror or exc}",
            hint="check the path given for the SLA file",
            code="SLA_INVALID",
        ) from None
    except UnicodeDecodeError as exc:
        raise ValidationError(
            f"SLA file {p} is not UTF-8 text: {exc.reason}", hint=_SLA_HINT, code="SLA_INVALID"
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"SLA file {p} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            hint=_SLA_HINT,
            code="SLA_INVALID",
        ) from None
    except ValidationError as exc:
        raise ValidationError(f"{p}: {exc.message}", hint=exc.hint, code=exc.code) from None
    try:
        return sla_from_dict(data)
    except ValidationError as exc:
        raise ValidationError(f"{p}: {exc.message}", hint=exc.hint, code=exc.code) from None


def sla_template() -> str:
    """JSON text with every SLA key at its default: a file to copy and edit."""
    return json.dumps(dict(SLA_FIELDS), indent=2) + "\n"


# --- small numeric helpers --------------------------------------------------------------------


def _finite(v: object) -> float | None:
    """A measured figure as a float, or None when it was not measured (None, NaN, inf, junk)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return f if math.isfinite(f) else None


def _clamp(v: float, lo: float = 0.0, hi: float = 100.0) -> float:
    """v within [lo, hi]; a NaN (which callers avoid) becomes lo rather than leak out."""
    if v != v:
        return lo
    return min(hi, max(lo, v))


def _pct(v: object) -> float | None:
    """A measured percentage or score, clamped to 0..100 (100.0000001 from float noise is 100)."""
    f = _finite(v)
    return None if f is None else _clamp(f)


def _ratio_pct(num: int, den: int) -> float | None:
    """100 * num / den, or None when there is nothing to divide by (nothing was asked)."""
    if den <= 0:
        return None
    return _clamp(100.0 * (min(max(0, num), den) / den))  # int / int: no float overflow


def _limit_score(value: object, limit: float) -> float | None:
    """A "max" figure: 100 at or under the limit, 100 * limit / value above it.

    A negative time is a measuring bug, not a fast peer: not measured.
    """
    f = _finite(value)
    if f is None or f < 0:
        return None
    if f <= limit:
        return 100.0
    return _clamp(100.0 * limit / f)


def _mean(values: Iterable[float | None]) -> float | None:
    """Mean of the measured values; None when none was measured (not 0: absent is not bad)."""
    vals = [v for v in values if v is not None]
    return _clamp(math.fsum(vals) / len(vals)) if vals else None


def _weighted(parts: Iterable[tuple[float | None, float]]) -> float | None:
    """Weighted mean over the parts that have a value; the weights of the others are spread
    proportionally over them (renormalised). None when no part has a value."""
    have = [(v, w) for v, w in parts if v is not None]
    total = math.fsum(w for _, w in have)
    if not have or total <= 0:
        return None
    return _clamp(math.fsum(v * w for v, w in have) / total)


# --- participants ----------------------------------------------------------------------------


@dataclass
class ParticipantObservation:
    """Raw figures the coordinator measured of one participant; None = not measured."""

    peer_id: str
    training_time_ms: float | None = None  # median of this peer's recent training times
    tasks_selected: int = 0  # rounds it was selected for (finished rounds)
    tasks_completed: int = 0  # accepted updates / masked inputs in the sum
    tasks_failed: int = 0  # task_error, rejected update, timeout, left mid-round
    model_quality: float | None = None  # 0..100 (model_quality_score)
    data_quality: float | None = None  # 0..100 (data_quality_score)
    uptime_pct: float | None = None  # 0..100
    heartbeat_consistency_pct: float | None = None
    latency_ms: float | None = None  # median ping RTT
    bandwidth_mbps: float | None = None  # megabits per second
    disconnects: int = 0  # in the observation window
    cpu_efficiency_pct: float | None = None
    memory_efficiency_pct: float | None = None
    security_violations: int = 0


@dataclass
class ParticipantScores:
    """A participant's scores, each 0..100 or None when none of its inputs was measured.

    ``overall`` is always a number; it is 0.0 when no part had any input (see
    ``participant_scores``), which ``has_input`` tells apart from a measured 0.
    """

    task_completion_rate: float | None = None
    error_rate: float | None = None  # percent of selected tasks that failed
    connection_stability: float | None = None
    training_time_score: float | None = None
    latency_score: float | None = None
    bandwidth_score: float | None = None
    performance: float | None = None
    reliability: float | None = None
    network: float | None = None
    resource: float | None = None
    overall: float = 0.0
    trend: str = "stable"  # "improving" | "stable" | "declining"

    @property
    def has_input(self) -> bool:
        """Whether any part was measured, i.e. whether ``overall`` means anything."""
        return any(
            p is not None for p in (self.performance, self.reliability, self.network, self.resource)
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PARTICIPANT_WEIGHTS = {"performance": 0.3, "reliability": 0.3, "network": 0.2, "resource": 0.2}


def _connection_stability(obs: ParticipantObservation) -> float | None:
    """100 - 20 per disconnect in the window, floored at 0.

    Zero disconnects count as a measurement only when there was a window to watch (uptime
    was measured); otherwise a peer never seen would score a perfect 100 here.
    """
    disconnects = max(0, int(obs.disconnects))
    if disconnects == 0 and _finite(obs.uptime_pct) is None:
        return None
    return _clamp(100.0 - 20.0 * min(disconnects, 5))


def _bandwidth_score(mbps: object) -> float | None:
    """100 at 100 Mbit/s or more, proportionally less under it."""
    f = _finite(mbps)
    if f is None or f < 0:
        return None
    return _clamp(100.0 * min(1.0, f / 100.0))


def participant_scores(
    obs: ParticipantObservation, sla: SLA, history: Sequence[float] = ()
) -> ParticipantScores:
    """Score one participant from what was measured of it.

    performance = mean(training_time_score, task_completion_rate, model_quality, data_quality)
    reliability = mean(uptime, heartbeat consistency, 100 - error_rate, connection_stability)
    network     = mean(latency_score, bandwidth_score)
    resource    = mean(cpu_efficiency, memory_efficiency)
    overall     = 0.3 performance + 0.3 reliability + 0.2 network + 0.2 resource

    Each mean is over the measured inputs only, and a part with no input at all gives its
    weight to the others (renormalised); so a peer is judged on what is known of it. If no
    part has any input, ``overall`` is 0.0 (``has_input`` is False): there is nothing to rank
    it by, and it raises no quality_score alert. ``history`` is the peer's previous overall
    scores, oldest first; the trend is computed over them and this one.
    """
    s = ParticipantScores()
    selected = int(obs.tasks_selected)
    s.task_completion_rate = _ratio_pct(int(obs.tasks_completed), selected)
    s.error_rate = _ratio_pct(int(obs.tasks_failed), selected)
    s.connection_stability = _connection_stability(obs)
    s.training_time_score = _limit_score(obs.training_time_ms, sla.max_training_time)
    s.latency_score = _limit_score(obs.latency_ms, sla.max_latency)
    s.bandwidth_score = _bandwidth_score(obs.bandwidth_mbps)
    s.performance = _mean(
        [
            s.training_time_score,
            s.task_completion_rate,
            _pct(obs.model_quality),
            _pct(obs.data_quality),
        ]
    )
    s.reliability = _mean(
        [
            _pct(obs.uptime_pct),
            _pct(obs.heartbeat_consistency_pct),
            None if s.error_rate is None else 100.0 - s.error_rate,
            s.connection_stability,
        ]
    )
    s.network = _mean([s.latency_score, s.bandwidth_score])
    s.resource = _mean([_pct(obs.cpu_efficiency_pct), _pct(obs.memory_efficiency_pct)])
    overall = _weighted((getattr(s, part), w) for part, w in PARTICIPANT_WEIGHTS.items())
    s.overall = 0.0 if overall is None else overall
    past = [f for f in (_finite(h) for h in history) if f is not None]
    s.trend = trend([*past, s.overall] if overall is not None else past)
    return s


def trend(scores: Sequence[float]) -> str:
    """The direction of a score: the least-squares slope of its last 5 values.

    A slope over 2 points per record (up or down) is "improving" or "declining"; less is
    noise: "stable". Fewer than two finite values say nothing: "stable". Values are scores,
    so they are clamped to 0..100 first (which also keeps the sums from overflowing).
    """
    ys = [_clamp(f) for f in (_finite(v) for v in scores) if f is not None][-5:]
    if len(ys) < 2:
        return "stable"
    n = len(ys)
    x_mean = (n - 1) / 2.0
    y_mean = math.fsum(ys) / n
    num = math.fsum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys))
    den = math.fsum((i - x_mean) ** 2 for i in range(n))
    slope = num / den
    if slope > 2.0:
        return "improving"
    if slope < -2.0:
        return "declining"
    return "stable"


def model_quality_score(loss_before: float, loss_after: float) -> float:
    """How one update alone changes the validation loss of the model it started from.

    100 when it does not raise the loss, 100 * loss_before / loss_after when it does (an
    update that doubles the loss scores 50). A non-finite loss after the update means the
    update broke the model: 0. A NaN loss before cannot be compared with: 0 as well, which the
    caller avoids by not scoring against a broken starting model.
    """
    after = _finite(loss_after)
    try:
        before = float(loss_before)
    except (TypeError, ValueError):
        before = math.nan
    if after is None or before != before:
        return 0.0
    if after <= before:
        return 100.0
    if before <= 0:
        return 0.0  # it raised a loss that was perfect (0) or nonsensical
    return _clamp(100.0 * before / after)


# --- data quality -------------------------------------------------------------------------------

_REPORT_KEYS = ("rows", "missing", "duplicates", "label_counts")


def _report_int(report: Mapping[str, Any], key: str, hi: int | None) -> int:
    v = report[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (hi is not None and v > hi):
        upper = "" if hi is None else f" and <= rows ({hi})"
        raise ValidationError(
            f"data report field {key!r} = {_show(v)} is not accepted: "
            f"expected an integer >= 0{upper}",
            hint="the participant's data report is malformed; update that participant",
        )
    return v


def _check_report(report: object) -> tuple[int, int, int, list[int]]:
    """(rows, missing, duplicates, counts) of a data report, or a ValidationError naming the
    field: the report comes from a participant the coordinator does not trust."""
    hint = "the participant's data report is malformed; update that participant"
    if not isinstance(report, Mapping):
        raise ValidationError(
            f"a data report must be a map with keys {', '.join(_REPORT_KEYS)}", hint=hint
        )
    missing_keys = [k for k in _REPORT_KEYS if k not in report]
    unknown = [k for k in report if k not in _REPORT_KEYS]
    if missing_keys or unknown:
        what = f"lacks {missing_keys[0]!r}" if missing_keys else f"has unknown key {unknown[0]!r}"
        raise ValidationError(
            f"the data report {what}; expected keys {', '.join(_REPORT_KEYS)}", hint=hint
        )
    rows = _report_int(report, "rows", None)
    missing = _report_int(report, "missing", rows)
    duplicates = _report_int(report, "duplicates", rows)
    labels = report["label_counts"]
    if not isinstance(labels, Mapping):
        raise ValidationError(
            "data report field 'label_counts' must be a map of label to count", hint=hint
        )
    counts: list[int] = []
    for label, c in labels.items():
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValidationError(
                f"data report field 'label_counts' [{label!r}] = {_show(c)} is not accepted: "
                "expected an integer >= 0",
                hint=hint,
            )
        counts.append(c)
    if sum(counts) > rows:
        raise ValidationError(
            f"data report field 'label_counts' sums to {sum(counts)}, more than rows ({rows})",
            hint=hint,
        )
    return rows, missing, duplicates, counts


def label_balance(counts: Sequence[int]) -> float:
    """Normalised entropy of label counts: 1 = every label equally frequent, 0 = one label
    holds everything. With fewer than two labels there is no skew to measure: 1."""
    k = len(counts)
    total = sum(counts)
    if k < 2 or total <= 0:
        return 1.0
    h = -math.fsum((c / total) * math.log(c / total) for c in counts if c > 0)
    return _clamp(h / math.log(k), 0.0, 1.0)


def data_quality_score(report: Mapping[str, Any]) -> float:
    """100 * (1 - missing/rows) * (1 - duplicates/rows) * label balance; 0 for no rows.

    The report (``data_report``) is the participant's own check of its data at load: the
    coordinator never sees the data, only these counts. A malformed report is refused with a
    ValidationError naming the field.
    """
    rows, missing, duplicates, counts = _check_report(report)
    if rows == 0:
        return 0.0
    score = 100.0 * (1 - missing / rows) * (1 - duplicates / rows) * label_balance(counts)
    return _clamp(score)


def _label_key(v: object) -> str:
    """A label as text (wire maps have text keys): 3 and 3.0 are both "3"."""
    if isinstance(v, np.bool_ | bool):
        return str(int(v))
    if isinstance(v, np.integer | int):
        return str(int(v))
    if isinstance(v, np.floating | float):
        f = float(v)
        return str(int(f)) if f.is_integer() else repr(f)
    return str(v)[:MAX_LABEL_CHARS]  # a text label longer than the wire takes is cut


OTHER_LABELS = "(other)"


def _label_counts(labels: np.ndarray, counts: np.ndarray) -> dict[str, int]:
    out: dict[str, int] = {}
    for lab, c in zip(labels, counts, strict=True):
        key = _label_key(lab)  # two long labels may cut to one key: their counts add up
        out[key] = out.get(key, 0) + int(c)
    return out


def _fold_labels(counts: dict[str, int]) -> dict[str, int]:
    """At most MAX_LABELS labels, as the wire takes: beyond, the most frequent
    MAX_LABELS - 1 are kept and the rest summed under OTHER_LABELS (the balance score is then
    a little higher than exact, never a refusal of an honest participant)."""
    if len(counts) <= MAX_LABELS:
        return counts
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = dict(ranked[: MAX_LABELS - 1])
    kept[OTHER_LABELS] = sum(c for _, c in ranked[MAX_LABELS - 1 :])
    return kept


def data_report(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The participant's data report, from its arrays: counts only, never the data.

    missing = rows with a NaN or infinite feature (or label); duplicates = finite rows equal to
    an earlier row (a row with a NaN is already counted as missing); label_counts = rows per
    finite label, keys as text.
    """
    xa, ya = np.asarray(x), np.asarray(y)
    if xa.ndim < 1 or ya.ndim != 1 or xa.shape[0] != ya.shape[0]:
        raise ValidationError(
            f"data_report needs x of shape [n, ...] and y of shape [n], got {xa.shape} "
            f"and {ya.shape}",
            hint="pass the features and labels of the same rows",
        )
    if xa.dtype.kind not in "biuf":
        raise ValidationError(
            f"data_report needs numeric features, got dtype {xa.dtype}",
            hint="convert the features to numbers before loading",
        )
    n = int(xa.shape[0])
    width = int(np.prod(xa.shape[1:]))  # (n,) is one feature; images flatten
    xf = xa.reshape(n, width).astype(np.float64) + 0.0  # + 0.0 makes -0.0 equal to 0.0
    ok = np.isfinite(xf).all(axis=1)
    label_ok = np.isfinite(ya) if ya.dtype.kind == "f" else np.ones(n, dtype=bool)
    ok &= label_ok
    good = xf[ok]
    if good.shape[0] == 0:
        duplicates = 0
    elif good.shape[1] == 0:
        duplicates = good.shape[0] - 1  # rows without features are all alike
    else:
        duplicates = int(good.shape[0] - np.unique(good, axis=0).shape[0])
    labels, counts = np.unique(ya[label_ok], return_counts=True)
    return {
        "rows": n,
        "missing": int(n - np.count_nonzero(ok)),
        "duplicates": duplicates,
        "label_counts": _fold_labels(_label_counts(labels, counts)),
    }


# --- anomalies ----------------------------------------------------------------------------------


def anomalous(distances: Mapping[str, float], k: float = 3.5) -> set[str]:
    """The keys whose distance is a robust outlier on the far side of the median.

    Modified z-score 0.6745 * (d - median) / MAD > k (Iglewicz and Hoaglin): the median and
    the MAD are not pulled by the outliers themselves, unlike a mean and a standard deviation.
    A non-finite distance is always anomalous (a broken update). With fewer than 3 finite
    values, or when half of them are identical (MAD = 0), there is no spread to judge by, so
    only the non-finite ones are flagged.
    """
    flagged = {key for key, d in distances.items() if _finite(d) is None}
    finite = {key: float(d) for key, d in distances.items() if key not in flagged}
    if len(finite) < 3:
        return flagged
    vals = np.array(list(finite.values()), dtype=np.float64)
    with np.errstate(all="ignore"):
        med = float(np.median(vals))
        mad = float(np.median(np.abs(vals - med)))
        if not math.isfinite(mad) or mad == 0:
            return flagged
        z = 0.6745 * (vals - med) / mad
    return flagged | {key for key, zi in zip(finite, z, strict=True) if zi > k}


# --- sessions -------------------------------------------------------------------------------------


@dataclass
class SessionObservation:
    """Raw figures of one session, from the ledger; accuracies are fractions 0..1."""

    session_id: str
    accuracies: list[float] = field(default_factory=list)  # [round 0 (initial), round 1, ...]
    rounds_run: int = 0  # rounds started and finished (completed + failed + aborted)
    first_selected: list[str] = field(default_factory=list)  # selected in round 1
    last_contributors: list[str] = field(default_factory=list)  # in the latest aggregate
    updates_accepted: int = 0
    updates_rejected_integrity: int = 0  # CID mismatch, bad shapes/dtype, non-finite, wrong base
    bytes_moved: int = 0  # bytes_up + bytes_down over its rounds
    bytes_ideal: int = 0  # raw float32 weights x transfers (2 per contribution)
    # the spec asks for secure aggregation or local DP-SGD (local_dp_round_complies)
    privacy_required: bool = False
    rounds_privacy_ok: int = 0  # rounds that ran with the privacy the spec asks for
    security_violations: int = 0
    participant_quality: float | None = None  # mean overall score of its participants
    anomalous_last_round_pct: float | None = None


@dataclass
class SessionScores:
    """A session's scores, each 0..100 or None when not measured; ``health`` always set."""

    convergence_rate: int | None = None  # rounds to converge
    convergence_score: float | None = None
    model_stability: float | None = None
    accuracy_improvement: float | None = None
    participant_retention: float | None = None
    data_integrity: float | None = None
    network_efficiency: float | None = None
    privacy_compliance: float | None = None
    security_score: float | None = None
    participant_quality: float | None = None
    convergence: float | None = None  # the health part: mean of the three above it
    health: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SESSION_WEIGHTS = {
    "convergence": 0.25,
    "participant_quality": 0.25,
    "data_integrity": 0.20,
    "network_efficiency": 0.15,
    "security_score": 0.15,
}
CONVERGENCE_TOLERANCE = 0.01  # within one accuracy point of the best counts as converged
STABILITY_SCALE = 0.05  # a std of round-to-round changes of 5 points means "unstable"


def _accuracy_points(accuracies: Sequence[float]) -> list[tuple[int, float]]:
    """(round, accuracy) for the rounds with a finite accuracy, clamped to 0..1."""
    out = []
    for r, a in enumerate(accuracies):
        f = _finite(a)
        if f is not None:
            out.append((r, _clamp(f, 0.0, 1.0)))
    return out


def _convergence_rate(points: list[tuple[int, float]]) -> int | None:
    """The first round r >= 1 whose accuracy is within the tolerance of the best."""
    best = max((a for _, a in points), default=None)
    if best is None:
        return None
    for r, a in points:
        if r >= 1 and a >= best - CONVERGENCE_TOLERANCE:
            return r
    return None


def _convergence_score(
    rate: int | None, acc0: float | None, later: list[float], sla: SLA
) -> float | None:
    """100 within the SLA's rounds, 100 * limit / rate later; 0 if it never beat round 0."""
    if not later:
        return None
    if acc0 is not None and max(later) <= acc0:
        return 0.0
    if rate is None:
        return None
    if rate <= sla.min_convergence_rate:
        return 100.0
    return _clamp(100.0 * sla.min_convergence_rate / rate)


def _model_stability(points: list[tuple[int, float]]) -> float | None:
    """100 * (1 - min(1, std(last 5 round-to-round changes) / 0.05)); None under 2 changes,
    since the spread of a single change is 0 by construction and says nothing."""
    accs = [a for _, a in points]
    changes = [b - a for a, b in itertools.pairwise(accs)][-5:]
    if len(changes) < 2:
        return None
    std = float(np.std(changes))
    return _clamp(100.0 * (1.0 - min(1.0, std / STABILITY_SCALE)))


def _accuracy_improvement(acc0: float | None, later: list[float]) -> float | None:
    """Share of the possible improvement over round 0 that was achieved, 0..100."""
    if acc0 is None or not later:
        return None
    last = later[-1]
    room = 1.0 - acc0
    if room <= 0:
        return 100.0 if last >= acc0 else 0.0
    return _clamp(100.0 * (last - acc0) / room)


def session_scores(obs: SessionObservation, sla: SLA) -> SessionScores:
    """Score one session.

    health = 0.25 convergence + 0.25 participant_quality + 0.20 data_integrity
             + 0.15 network_efficiency + 0.15 security_score,
    renormalised over the parts that are known (participant_quality and convergence may not
    be; the other three always are, so health is always a number).
    """
    s = SessionScores()
    points = _accuracy_points(obs.accuracies)
    acc0 = next((a for r, a in points if r == 0), None)
    later = [a for r, a in points if r >= 1]
    s.convergence_rate = _convergence_rate(points)
    s.convergence_score = _convergence_score(s.convergence_rate, acc0, later, sla)
    s.model_stability = _model_stability(points)
    s.accuracy_improvement = _accuracy_improvement(acc0, later)
    s.convergence = _mean([s.convergence_score, s.model_stability, s.accuracy_improvement])
    first = set(obs.first_selected)
    if first:
        s.participant_retention = _clamp(
            100.0 * len(first & set(obs.last_contributors)) / len(first)
        )
    accepted = max(0, int(obs.updates_accepted))
    rejected = max(0, int(obs.updates_rejected_integrity))
    s.data_integrity = _ratio_pct(accepted, accepted + rejected) if accepted + rejected else 100.0
    moved = int(obs.bytes_moved)
    s.network_efficiency = (
        100.0 if moved <= 0 else _clamp(100.0 * (min(max(0, int(obs.bytes_ideal)), moved) / moved))
    )
    if obs.privacy_required:
        s.privacy_compliance = _ratio_pct(int(obs.rounds_privacy_ok), int(obs.rounds_run))
    else:
        s.privacy_compliance = 100.0
    s.security_score = _clamp(100.0 - 20.0 * min(max(0, int(obs.security_violations)), 5))
    s.participant_quality = _pct(obs.participant_quality)
    health = _weighted((getattr(s, part), w) for part, w in SESSION_WEIGHTS.items())
    s.health = 0.0 if health is None else health
    return s


# --- alerts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertCondition:
    """An alert rule that holds now, for ``Ledger.sync_alerts`` (which raises or updates it)."""

    alert_type: str
    severity: str
    entity_id: str
    message: str
    value: float | None
    threshold: float | None
    session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Check:
    """One figure against one threshold, and what a breach means to a person."""

    alert_type: str
    label: str
    value: float | None
    threshold: float
    under: bool  # True: alert when value < threshold; False: when value > threshold
    unit: str  # "%", "ms" or "" (a 0..100 score)
    from_sla: bool
    meaning: str

    def breached(self) -> bool:
        """Strict comparison: a figure exactly at its threshold is within it."""
        if self.value is None:
            return False
        return self.value < self.threshold if self.under else self.value > self.threshold

    def message(self, severity: str) -> str:
        """E.g. "uptime 72.0 % is under 90 % (critical): the peer was offline 28 % ..."."""
        assert self.value is not None
        value = f"{self.value:.0f}" if self.unit == "ms" else f"{self.value:.1f}"
        unit = f" {self.unit}" if self.unit else ""
        where = "under" if self.under else "over"
        source = "the SLA's " if self.from_sla else ""
        return (
            f"{self.label} {value}{unit} is {where} {source}{_num(self.threshold)}{unit} "
            f"({severity}): {self.meaning}"
        )


def _conditions(
    checks: Iterable[_Check], entity_id: str, session_id: str | None
) -> list[AlertCondition]:
    out = []
    for c in checks:
        if c.breached():
            severity = ALERT_SEVERITY[c.alert_type]
            out.append(
                AlertCondition(
                    c.alert_type,
                    severity,
                    entity_id,
                    c.message(severity),
                    c.value,
                    float(c.threshold),
                    session_id,
                )
            )
    return out


def _weakest_part(scores: ParticipantScores) -> str:
    known = {p: v for p in PARTICIPANT_WEIGHTS if (v := getattr(scores, p)) is not None}
    if not known:
        return "no part was measured"
    p = min(known, key=lambda k: known[k])
    return f"its weakest part is {p} ({known[p]:.1f})"


def _under(
    alert_type: str,
    label: str,
    value: float | None,
    threshold: float,
    unit: str,
    meaning: str,
    *,
    sla: bool = False,
) -> _Check:
    """A rule that fires when the figure is under its threshold."""
    return _Check(alert_type, label, value, threshold, True, unit, sla, meaning)


def _over(
    alert_type: str,
    label: str,
    value: float | None,
    threshold: float,
    unit: str,
    meaning: str,
    *,
    sla: bool = False,
) -> _Check:
    """A rule that fires when the figure is over its threshold."""
    return _Check(alert_type, label, value, threshold, False, unit, sla, meaning)


def _participant_checks(
    obs: ParticipantObservation, s: ParticipantScores, sla: SLA
) -> list[_Check]:
    """The participant rule table: type, figure, threshold, direction and meaning."""
    up = _pct(obs.uptime_pct)
    hb = _pct(obs.heartbeat_consistency_pct)
    selected, done, failed = obs.tasks_selected, obs.tasks_completed, obs.tasks_failed
    tasks = f"of the {selected} tasks it was selected for"
    overall = s.overall if s.has_input else None
    return [
        _under("task_completion", "task completion", s.task_completion_rate,
               TASK_COMPLETION_MIN, "%", f"the peer completed {done} {tasks}"),
        _under("uptime", "uptime", up, UPTIME_MIN, "%",
               f"the peer was offline {100 - (up or 0):.0f} % of the window"),
        _under("quality_score", "overall quality score", overall, QUALITY_SCORE_MIN, "",
               _weakest_part(s)),
        _over("error_rate", "error rate", s.error_rate, ERROR_RATE_MAX, "%",
              f"{failed} {tasks} failed (task error, rejected update, timeout or left "
              "mid-round)"),
        _over("latency", "latency", _nonneg(obs.latency_ms), sla.max_latency, "ms",
              "messages to and from the peer are slow; rounds may wait on it", sla=True),
        _under("heartbeat", "heartbeat consistency", hb, HEARTBEAT_MIN, "%",
               f"{100 - (hb or 0):.0f} % of the expected heartbeats were late or missing"),
        _over("training_time", "training time", _nonneg(obs.training_time_ms),
              sla.max_training_time, "ms",
              "the peer trains slowly and may miss round deadlines", sla=True),
        _under("resource_efficiency", "resource efficiency", s.resource, RESOURCE_MIN, "",
               "the peer uses little of its CPU while training or has little memory free"),
        _under("connection_stability", "connection stability", s.connection_stability,
               CONNECTION_STABILITY_MIN, "",
               f"the peer disconnected {_times(max(0, int(obs.disconnects)))} in the window"),
        _under("model_quality", "model quality", _pct(obs.model_quality),
               sla.min_model_quality, "",
               "the peer's updates, applied alone, raise the validation loss", sla=True),
        _under("data_quality", "data quality", _pct(obs.data_quality), sla.min_data_quality,
               "", "the peer's data has missing values, duplicate rows or unbalanced labels",
               sla=True),
    ]  # fmt: skip


def _nonneg(v: object) -> float | None:
    """A measured time (never negative); a negative one is a measuring bug: not measured."""
    f = _finite(v)
    return None if f is None or f < 0 else f


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def participant_alerts(
    obs: ParticipantObservation,
    scores: ParticipantScores,
    sla: SLA,
    session_id: str | None = None,
) -> list[AlertCondition]:
    """The participant alert rules that hold now (entity_id = the peer ID).

    Each rule compares one figure with its threshold strictly (exactly at the threshold is
    fine); a figure that was not measured raises nothing, and neither does an overall score
    with no input behind it.
    """
    return _conditions(_participant_checks(obs, scores, sla), obs.peer_id, session_id)


def local_dp_round_complies(epsilons: Sequence[float | None], target: float) -> bool:
    """A local-DP round ran with the privacy the spec asks for when it had contributors and
    every one of them reported DP figures (its ε in the session, this round included: a
    ``dp_epsilon``) within the session's ``privacy.target_epsilon``. A contributor without
    figures, or one past the target (it trained more than planned, e.g. reruns), fails it."""
    return bool(epsilons) and all(e is not None and e <= target * (1 + 1e-9) for e in epsilons)


def _session_checks(obs: SessionObservation, s: SessionScores, sla: SLA) -> list[_Check]:
    """The session rule table, but for convergence (a count of rounds, see below)."""
    n = max(0, int(obs.security_violations))
    return [
        _under("privacy_compliance", "privacy compliance", s.privacy_compliance,
               sla.min_privacy_compliance, "%",
               f"{obs.rounds_privacy_ok} of {obs.rounds_run} rounds ran with the privacy the "
               "spec asks for (secure aggregation; local_dp: every contributor's reported ε "
               "within privacy.target_epsilon)", sla=True),
        _over("anomaly", "anomalous updates in the last round",
              _pct(obs.anomalous_last_round_pct), sla.max_anomaly_threshold, "%",
              "some updates are far from the others (broken data or poisoning)", sla=True),
        _under("security_score", "security score", s.security_score, sla.min_security_score,
               "", f"{n} security violation{'' if n == 1 else 's'} by the session's "
               "participants", sla=True),
    ]  # fmt: skip


def _convergence_condition(
    obs: SessionObservation, s: SessionScores, sla: SLA
) -> AlertCondition | None:
    """The "convergence" rule: the SLA's rounds have passed and the session did not converge
    within them (its best accuracy came later, or it never beat the initial model)."""
    completed = sum(1 for r, _ in _accuracy_points(obs.accuracies) if r >= 1)
    limit = sla.min_convergence_rate
    cs = s.convergence_score
    if completed < limit or cs is None or cs >= 100.0:
        return None
    if cs == 0.0 or s.convergence_rate is None:
        why = "accuracy never rose above the initial model's"
        value = float(completed)
    else:
        why = f"it reached its best accuracy only at round {s.convergence_rate}"
        value = float(s.convergence_rate)
    severity = ALERT_SEVERITY["convergence"]
    return AlertCondition(
        "convergence",
        severity,
        obs.session_id,
        f"not converged within {limit} rounds ({severity}): {why}; {completed} rounds completed",
        value,
        float(limit),
        obs.session_id,
    )


def session_alerts(
    obs: SessionObservation, scores: SessionScores, sla: SLA
) -> list[AlertCondition]:
    """The session alert rules that hold now (entity_id = session_id = the session's ID)."""
    out = _conditions(_session_checks(obs, scores, sla), obs.session_id, obs.session_id)
    conv = _convergence_condition(obs, scores, sla)
    return out if conv is None else [*out, conv]
