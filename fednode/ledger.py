"""The node's SQLite ledger: sessions, rounds, updates, peers, models and a hash-chained log.

Every node keeps one file (``<data-dir>/ledger.db``). Together with the content store it is
enough to resume after a crash and to explain afterwards what happened in a session, so:

* writes that belong together run in one transaction (``Database.atomic()``), never half;
* the ``events`` table is append-only and hash-chained, so an edited, deleted or reordered
  row is detectable offline (``fedctl ledger verify``);
* the schema is versioned by ordered migrations, so an old file opens with new code and a
  file from newer code is refused instead of being silently misread.

Schema 3 adds quality: per-peer and per-session quality snapshots, network measurements,
alerts whose every state change is also a chained event (written in the same transaction),
and, on participants, the log of the training tasks they took. Schema 4 marks model
versions that were rolled back (``rolled_back_at``, ``rolled_back_to``). Schema 5 keeps
what each participant registered for a session (``session_claims``: its examples, the most
its weight may count). Schema 7 keeps each participant's evaluation of the round's model
with its update (``client_updates.eval_examples``, ``eval_loss``, ``eval_metrics``).
Schema 8 keeps the task's metrics by name (accuracy, roc_auc, mae, r2) for rounds, model
versions and the session's final figures, beside the accuracy columns (the round's score).

Transactions use sqlite-utils' ``atomic()`` rather than ``with conn:``: sqlite-utils 4 wraps
its own writes in ``atomic()``, which nests as a savepoint inside ours, whereas an inner
``atomic()`` under a bare ``with conn:`` would commit the outer work early.

The ledger is used from one asyncio thread; every call is short and synchronous.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from sqlite_utils import Database

from protocol import alerts, lifecycle
from protocol.errors import NotFound, StateError, StorageUnavailable
from protocol.lifecycle import RoundStatus, SessionState, TaskStatus, UpdateStatus
from protocol.messages import EVAL_METRICS

GENESIS_HASH = "0" * 64

SESSION_STATUSES = frozenset(SessionState)
# rejected: the round's aggregate was refused (not finite, or its loss jumped) and never
# published; the next round starts from the model this one started from.
ROUND_STATUSES = frozenset(RoundStatus)
FINISHED_ROUND_STATUSES = lifecycle.FINISHED_ROUND_STATUSES
UPDATE_STATUSES = frozenset(UpdateStatus)

# --- quality: the words are protocol.alerts' (the rules live in fednode.quality)
SEVERITIES = frozenset(alerts.SEVERITIES)
EVENT_ALERT_TYPES = alerts.EVENT_ALERT_TYPES
RULE_ALERT_TYPES = alerts.RULE_ALERT_TYPES
ALERT_TYPES = alerts.ALERT_TYPES
ALERT_STATUSES = frozenset(alerts.ALERT_STATUSES)
ACTIVE_ALERT_STATUSES = alerts.ACTIVE_ALERT_STATUSES
ALERT_FILTERS = frozenset(alerts.ALERT_FILTERS)
NETWORK_DIRECTIONS = frozenset({"ping", "down", "up"})
TASK_STATUSES = frozenset(TaskStatus)
FINISHED_TASK_STATUSES = lifecycle.FINISHED_TASK_STATUSES
# How a selection of a peer ended, as the coordinator counts it (Ledger.recent_task_outcomes).
TaskOutcome = Literal["completed", "failed", "declined"]
TRENDS = frozenset({"improving", "stable", "declining"})

# Metric columns a caller may fill, with their kind: "real" (float or None = not measured),
# "count" (int >= 0, never None: nothing happened is 0), "int?" (int or None), "trend".
PARTICIPANT_QUALITY_COLUMNS: dict[str, str] = {
    "training_time_ms": "real",
    "tasks_selected": "count",
    "tasks_completed": "count",
    "tasks_failed": "count",
    "model_quality": "real",
    "data_quality": "real",
    "uptime": "real",
    "heartbeat_consistency": "real",
    "latency_ms": "real",
    "bandwidth_mbps": "real",
    "disconnects": "count",
    "cpu_efficiency": "real",
    "memory_efficiency": "real",
    "security_violations": "count",
    "task_completion_rate": "real",
    "error_rate": "real",
    "connection_stability": "real",
    "performance_score": "real",
    "reliability_score": "real",
    "network_score": "real",
    "resource_score": "real",
    "overall_score": "real",
    "trend": "trend",
}
SESSION_QUALITY_COLUMNS: dict[str, str] = {
    "convergence_rate": "int?",
    "convergence_score": "real",
    "model_stability": "real",
    "accuracy_improvement": "real",
    "participant_retention": "real",
    "data_integrity": "real",
    "network_efficiency": "real",
    "privacy_compliance": "real",
    "security_score": "real",
    "participant_quality": "real",
    "convergence": "real",
    "health_score": "real",
}
ALERT_CONDITION_KEYS = frozenset(
    {"alert_type", "severity", "entity_id", "message", "value", "threshold", "session_id"}
)
_REQUIRED_CONDITION_KEYS = frozenset({"alert_type", "severity", "entity_id", "message"})

# Columns a caller may change after creation; the primary keys are not among them.
SESSION_FIELDS = frozenset(
    {
        "name",
        "spec",
        "status",
        "strategy",
        "secure_aggregation",
        "rounds",
        "rounds_completed",
        "created_at",
        "started_at",
        "ended_at",
        "model_cid",
        "final_accuracy",
        "final_loss",
        "error",
    }
)
PARTICIPANT_FIELDS = frozenset(
    {
        "address",
        "dataset",
        "num_examples",
        "first_seen",
        "last_seen",
        "online",
        "status",
        "rounds_completed",
        "updates_rejected",
        "latency_ms",
        # added by _m003_quality
        "quality_score",
        "uptime",
        "excluded",
    }
)


def canonical_json(value: Any) -> str:
    """The one JSON spelling used for hashing and for JSON columns (stable across runs)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(
    prev_hash: str,
    event_id: int,
    ts: float,
    kind: str,
    session_id: str | None,
    entity_id: str | None,
    data: Any,
) -> str:
    """Hash of one event, chained to its predecessor; the id is covered so rows cannot move."""
    body = canonical_json([event_id, ts, kind, session_id, entity_id, data])
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


# --- value checks -----------------------------------------------------------------------
# The ledger refuses what JSON (and so `fedctl --json`, the hash chain and reports) cannot
# hold: NaN/inf, and non-numbers where a figure belongs. These are ValueErrors like the
# other caller mistakes in this module (unknown fields, bad statuses): the coordinator's
# code is wrong, not a peer's message.


def _real(name: str, value: Any, *, optional: bool = True, minimum: float | None = None) -> Any:
    """A finite float (numpy scalars included), or None when ``optional``."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required (a finite number), got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} is {out!r}, which JSON cannot hold; pass None if unmeasured")
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} is {out!r}; it must be >= {minimum}")
    return out


def _int(name: str, value: Any, *, optional: bool = True, minimum: int | None = None) -> Any:
    """An int (numpy integers included; bools and floats refused), or None when ``optional``."""
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required (an integer), got None; use 0 for none")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} is {out}; it must be >= {minimum}")
    return out


def _text(name: str, value: Any, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _choice(name: str, value: Any, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} {value!r} not in {sorted(allowed)}")
    return value


def _metrics(what: str, metrics: Any, columns: dict[str, str]) -> dict[str, Any]:
    """Check a metrics dict against its table's columns and coerce every value."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{what} metrics must be a dict, got {type(metrics).__name__}")
    unknown = set(metrics) - set(columns)
    if unknown:
        raise ValueError(
            f"unknown {what} metric(s) {sorted(unknown, key=str)}; known columns: {list(columns)}"
        )
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        kind = columns[key]
        if kind == "real":
            out[key] = _real(key, value)
        elif kind == "count":
            out[key] = _int(key, value, optional=False, minimum=0)
        elif kind == "int?":
            out[key] = _int(key, value, minimum=0)
        else:  # trend
            out[key] = None if value is None else _choice(key, value, TRENDS)
    return out


def _eval_metrics(what: str, metrics: Any) -> str | None:
    """A round's or version's metrics by name as their JSON column holds them (None = not
    measured): only the names of EVAL_METRICS, each a finite number within its range, so
    a peer's report cannot put anything else where reports and the dashboard read it."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{what} must be a dict of numbers by name, got {metrics!r}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        span = EVAL_METRICS.get(key)
        if span is None:
            raise ValueError(f"{what} has an unknown metric {key!r}; known: {list(EVAL_METRICS)}")
        number = _real(f"{what}.{key}", value, optional=False)
        if not span[0] <= number <= span[1]:
            raise ValueError(f"{what}.{key} is {number!r}, outside [{span[0]:g}, {span[1]:g}]")
        out[key] = number
    return canonical_json(out)


def accuracy_of(column: float | None, metrics: Mapping[str, float] | None) -> float | None:
    """Accuracy as summaries show it. The ``accuracy`` columns hold the round's score, which
    for regression is R² (rollback compares it); where the metrics by name are recorded
    (schema 8) accuracy is theirs, so a regression round shows none rather than its R²."""
    if metrics is None:
        return column  # a row from before schema 8
    return metrics.get("accuracy")


def _network_row(
    peer_id: str,
    session_id: str | None,
    ts: float,
    direction: str,
    rtt_ms: float | None = None,
    bytes: int | None = None,
    transfer_s: float | None = None,
) -> dict[str, Any]:
    """A checked network_quality_metrics row (Ledger.record_network explains the fields)."""
    row = {
        "peer_id": _text("peer_id", peer_id),
        "session_id": _text("session_id", session_id, optional=True),
        "ts": _real("ts", ts, optional=False),
        "direction": _choice("direction", direction, NETWORK_DIRECTIONS),
        "rtt_ms": _real("rtt_ms", rtt_ms, minimum=0.0),
        "bytes": _int("bytes", bytes, minimum=0),
        "transfer_s": _real("transfer_s", transfer_s, minimum=0.0),
    }
    mbps = None
    if row["bytes"] is not None and row["transfer_s"] is not None and row["transfer_s"] > 0:
        mbps = row["bytes"] * 8 / 1e6 / row["transfer_s"]
    row["bandwidth_mbps"] = mbps
    return row


def _condition(raw: Any) -> dict[str, Any]:
    """One alert condition (AlertCondition.to_dict() or an object with ``to_dict``), checked."""
    if not isinstance(raw, Mapping) and hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise ValueError(f"an alert condition must be a dict, got {type(raw).__name__}")
    unknown = set(raw) - ALERT_CONDITION_KEYS
    if unknown:
        raise ValueError(
            f"unknown alert condition key(s) {sorted(unknown, key=str)}; "
            f"known: {sorted(ALERT_CONDITION_KEYS)}"
        )
    missing = _REQUIRED_CONDITION_KEYS - set(raw)
    if missing:
        raise ValueError(f"alert condition lacks {sorted(missing)}: {dict(raw)!r}")
    return {
        "alert_type": _choice("alert_type", raw["alert_type"], RULE_ALERT_TYPES),
        "severity": _choice("severity", raw["severity"], SEVERITIES),
        "entity_id": _text("entity_id", raw["entity_id"]),
        "session_id": _text("session_id", raw.get("session_id"), optional=True),
        "message": _text("message", raw["message"]),
        "value": _real("value", raw.get("value")),
        "threshold": _real("threshold", raw.get("threshold")),
    }


# --- migrations -------------------------------------------------------------------------
# Append only: a migration, once released, is never edited; a change is a new function.


def _m001_initial(db: Database) -> None:
    db.execute(
        """CREATE TABLE sessions (
            session_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'created',
            strategy TEXT NOT NULL,
            secure_aggregation INTEGER NOT NULL DEFAULT 0,
            rounds INTEGER NOT NULL,
            rounds_completed INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            started_at REAL,
            ended_at REAL,
            model_cid TEXT,
            final_accuracy REAL,
            final_loss REAL,
            error TEXT
        )"""
    )
    db.execute(
        """CREATE TABLE training_rounds (
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            round INTEGER NOT NULL,
            status TEXT NOT NULL DEFAULT 'running',
            started_at REAL NOT NULL,
            ended_at REAL,
            duration_s REAL,
            selected TEXT NOT NULL DEFAULT '[]',
            participants INTEGER NOT NULL DEFAULT 0,
            dropped INTEGER NOT NULL DEFAULT 0,
            model_cid_in TEXT,
            model_cid TEXT,
            accuracy REAL,
            loss REAL,
            bytes_up INTEGER NOT NULL DEFAULT 0,
            bytes_down INTEGER NOT NULL DEFAULT 0,
            reason TEXT,
            PRIMARY KEY (session_id, round)
        )"""
    )
    db.execute(
        """CREATE TABLE client_updates (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            round INTEGER NOT NULL,
            participant TEXT NOT NULL,
            samples INTEGER NOT NULL DEFAULT 0,
            loss REAL,
            bytes INTEGER NOT NULL DEFAULT 0,
            duration_s REAL,
            arrival_s REAL,
            update_cid TEXT,
            status TEXT NOT NULL DEFAULT 'accepted',
            reason TEXT,
            received_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_client_updates_round ON client_updates(session_id, round)")
    db.execute("CREATE INDEX idx_client_updates_participant ON client_updates(participant)")
    db.execute(
        """CREATE TABLE participants (
            peer_id TEXT PRIMARY KEY,
            address TEXT,
            dataset TEXT,
            num_examples INTEGER,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            online INTEGER NOT NULL DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'active',
            rounds_completed INTEGER NOT NULL DEFAULT 0,
            updates_rejected INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL
        )"""
    )
    db.execute(
        """CREATE TABLE model_versions (
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            round INTEGER NOT NULL,
            cid TEXT NOT NULL,
            parent_cid TEXT,
            accuracy REAL,
            loss REAL,
            size INTEGER,
            created_at REAL NOT NULL,
            PRIMARY KEY (session_id, round)
        )"""
    )
    db.execute("CREATE INDEX idx_model_versions_cid ON model_versions(cid)")
    db.execute(
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            session_id TEXT,
            entity_id TEXT,
            data TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_events_session ON events(session_id, id)")


def _m002_admission(db: Database) -> None:
    """Join tokens and who was admitted to which session (and how)."""
    db.execute(
        """CREATE TABLE join_tokens (
            token_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            expires_at REAL NOT NULL,
            max_uses INTEGER NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL
        )"""
    )
    db.execute(
        """CREATE TABLE session_members (
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            peer_id TEXT NOT NULL,
            via TEXT NOT NULL,
            token_id TEXT REFERENCES join_tokens(token_id),
            joined_at REAL NOT NULL,
            PRIMARY KEY (session_id, peer_id)
        )"""
    )
    db.execute("CREATE INDEX idx_members_token ON session_members(token_id)")


def _m003_quality(db: Database) -> None:
    """Quality metrics, alerts, the participant's own task log, and peer quality columns."""
    db.execute(
        """CREATE TABLE participant_quality_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            peer_id TEXT NOT NULL,
            session_id TEXT,
            ts REAL NOT NULL,
            training_time_ms REAL,
            tasks_selected INTEGER NOT NULL DEFAULT 0,
            tasks_completed INTEGER NOT NULL DEFAULT 0,
            tasks_failed INTEGER NOT NULL DEFAULT 0,
            model_quality REAL,
            data_quality REAL,
            uptime REAL,
            heartbeat_consistency REAL,
            latency_ms REAL,
            bandwidth_mbps REAL,
            disconnects INTEGER NOT NULL DEFAULT 0,
            cpu_efficiency REAL,
            memory_efficiency REAL,
            security_violations INTEGER NOT NULL DEFAULT 0,
            task_completion_rate REAL,
            error_rate REAL,
            connection_stability REAL,
            performance_score REAL,
            reliability_score REAL,
            network_score REAL,
            resource_score REAL,
            overall_score REAL,
            trend TEXT
        )"""
    )
    db.execute("CREATE INDEX idx_pqm_peer ON participant_quality_metrics(peer_id, ts)")
    db.execute(
        "CREATE INDEX idx_pqm_session ON participant_quality_metrics(session_id, peer_id, ts)"
    )
    db.execute(
        """CREATE TABLE session_quality_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            round INTEGER NOT NULL,
            ts REAL NOT NULL,
            convergence_rate INTEGER,
            convergence_score REAL,
            model_stability REAL,
            accuracy_improvement REAL,
            participant_retention REAL,
            data_integrity REAL,
            network_efficiency REAL,
            privacy_compliance REAL,
            security_score REAL,
            participant_quality REAL,
            convergence REAL,
            health_score REAL,
            UNIQUE (session_id, round)
        )"""
    )
    db.execute(
        """CREATE TABLE network_quality_metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            peer_id TEXT NOT NULL,
            session_id TEXT,
            ts REAL NOT NULL,
            direction TEXT NOT NULL,
            rtt_ms REAL,
            bytes INTEGER,
            transfer_s REAL,
            bandwidth_mbps REAL
        )"""
    )
    db.execute("CREATE INDEX idx_nqm_peer ON network_quality_metrics(peer_id, ts)")
    db.execute(
        """CREATE TABLE quality_alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            alert_type TEXT NOT NULL,
            severity TEXT NOT NULL,
            entity_id TEXT NOT NULL,
            session_id TEXT,
            message TEXT NOT NULL,
            value REAL,
            threshold REAL,
            source TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'open',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            resolved_at REAL,
            acknowledged_at REAL,
            acknowledged_by TEXT
        )"""
    )
    # Dedup/resolution look an alert up by its key among the active ones; lists filter by
    # status and severity, newest first; per-entity and per-session views filter on those.
    db.execute("CREATE INDEX idx_alerts_key ON quality_alerts(alert_type, entity_id, status)")
    db.execute("CREATE INDEX idx_alerts_status ON quality_alerts(status, severity, created_at)")
    db.execute("CREATE INDEX idx_alerts_entity ON quality_alerts(entity_id, status)")
    db.execute("CREATE INDEX idx_alerts_session ON quality_alerts(session_id, created_at)")
    db.execute(
        """CREATE TABLE participant_tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL,
            round INTEGER NOT NULL,
            coordinator TEXT NOT NULL,
            model_cid TEXT,
            deadline_s REAL,
            secure INTEGER NOT NULL DEFAULT 0,
            asked_at REAL NOT NULL,
            finished_at REAL,
            train_s REAL,
            total_s REAL,
            samples INTEGER,
            loss REAL,
            bytes_up INTEGER,
            bytes_down INTEGER,
            status TEXT NOT NULL DEFAULT 'running',
            error TEXT
        )"""
    )
    db.execute("CREATE INDEX idx_tasks_session ON participant_tasks(session_id, round)")
    db.execute("ALTER TABLE participants ADD COLUMN quality_score REAL")
    db.execute("ALTER TABLE participants ADD COLUMN uptime REAL")
    db.execute("ALTER TABLE participants ADD COLUMN excluded INTEGER NOT NULL DEFAULT 0")


def _m004_rollback(db: Database) -> None:
    """Versions that were rolled back: when, and to which round (NULL = a live version)."""
    db.execute("ALTER TABLE model_versions ADD COLUMN rolled_back_at REAL")
    db.execute("ALTER TABLE model_versions ADD COLUMN rolled_back_to INTEGER")


def _m005_claims(db: Database) -> None:
    """What each participant registered for a session: the most examples it may claim."""
    db.execute(
        """CREATE TABLE session_claims (
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            peer_id TEXT NOT NULL,
            num_examples INTEGER NOT NULL,
            first_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (session_id, peer_id)
        )"""
    )


def _m006_resume(db: Database) -> None:
    """What a restarted coordinator resumes from: a strategy's own state with each model
    version (a CID in the content store; NULL = no state), how many times a round was
    started (an aborted attempt is run again under the same number), and how many times
    the coordinator restarted while a session ran."""
    db.execute("ALTER TABLE model_versions ADD COLUMN state_cid TEXT")
    db.execute("ALTER TABLE training_rounds ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
    db.execute("ALTER TABLE sessions ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0")


def _m007_participant_eval(db: Database) -> None:
    """Each participant's report of the round's model on its held-out split (evaluation.on =
    participants | both): examples, loss, and the task's metrics as a JSON object of
    numbers by name. NULL = no report (the coordinator evaluated, or a row from before)."""
    db.execute("ALTER TABLE client_updates ADD COLUMN eval_examples INTEGER")
    db.execute("ALTER TABLE client_updates ADD COLUMN eval_loss REAL")
    db.execute("ALTER TABLE client_updates ADD COLUMN eval_metrics TEXT")


def _m008_round_metrics(db: Database) -> None:
    """The task's metrics by name (a JSON object of numbers, names from
    protocol.messages.EVAL_METRICS) where schema 1 kept accuracy alone: a round's figures
    (``training_rounds.metrics``, from the same evaluation as its accuracy and loss) and the
    participants' example-weighted mean beside them (``participant_metrics``), a model
    version's (``model_versions.metrics``) and the session's last (``sessions.final_metrics``).
    NULL = not measured, or a row from before."""
    db.execute("ALTER TABLE training_rounds ADD COLUMN metrics TEXT")
    db.execute("ALTER TABLE training_rounds ADD COLUMN participant_metrics TEXT")
    db.execute("ALTER TABLE model_versions ADD COLUMN metrics TEXT")
    db.execute("ALTER TABLE sessions ADD COLUMN final_metrics TEXT")


def _m009_update_scores(db: Database) -> None:
    """What outlier detection (fednode.robustness) made of each plain update:
    ``scores`` (JSON: norm, norm_ratio, cosine, distance, z, outlier, reasons), ``excluded``
    (1 = left out of the aggregate) and ``quarantined`` (1 = this exclusion quarantined the
    peer; its earlier exclusions no longer count toward the next quarantine). NULL = not
    judged (detection off, a secure round, too few updates, or a row from before)."""
    db.execute("ALTER TABLE client_updates ADD COLUMN scores TEXT")
    db.execute("ALTER TABLE client_updates ADD COLUMN excluded INTEGER")
    db.execute("ALTER TABLE client_updates ADD COLUMN quarantined INTEGER")


# The DP figures an update reports (protocol.messages.Update's dp_* fields), as columns of
# client_updates: name -> SQL type.
DP_COLUMNS: dict[str, str] = {
    "dp_epsilon": "REAL",
    "dp_spent_epsilon": "REAL",
    "dp_delta": "REAL",
    "dp_noise_multiplier": "REAL",
    "dp_sample_rate": "REAL",
    "dp_steps": "INTEGER",
    "dp_accountant": "TEXT",
    "dp_max_epsilon": "REAL",
}


def _m010_privacy(db: Database) -> None:
    """Local DP-SGD (fednode.dpsgd). On the coordinator, each update's DP figures
    (client_updates.dp_*: the participant's ε in this session and over all its training on
    the data, δ, σ, sample rate, steps, accountant, its --max-epsilon; NULL = no DP figures).
    On a participant, ``privacy_spending``: one row per round it trained privately, keyed by
    its dataset source (e.g. ``digits:0/3``, ``csv:/path``): the accountant's history entry
    (noise multiplier, sample rate, steps), from which any later ε is recomputed."""
    for name, kind in DP_COLUMNS.items():
        db.execute(f"ALTER TABLE client_updates ADD COLUMN {name} {kind}")
    db.execute(
        """CREATE TABLE privacy_spending (
            id INTEGER PRIMARY KEY,
            dataset TEXT NOT NULL,
            session_id TEXT NOT NULL,
            round INTEGER NOT NULL,
            noise_multiplier REAL NOT NULL,
            sample_rate REAL NOT NULL,
            steps INTEGER NOT NULL,
            accountant TEXT NOT NULL,
            delta REAL NOT NULL,
            epsilon REAL NOT NULL,
            spent_epsilon REAL NOT NULL,
            recorded_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_privacy_spending_dataset ON privacy_spending(dataset)")


def _m011_central_dp(db: Database) -> None:
    """Central DP (fednode.central_dp): one row per noisy aggregate a session released (a
    round's attempt that formed one, published or not): the effective and the planned noise
    multiplier, clip_norm, the sample rate q = selected / eligible and its counts, the
    updates in the sum, the noise's std on the mean, secure (and the share count m each
    participant's noise was sized for), and the session's ε after it (its accountant, δ)."""
    db.execute(
        """CREATE TABLE central_dp_rounds (
            id INTEGER PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(session_id),
            round INTEGER NOT NULL,
            noise_multiplier REAL NOT NULL,
            planned_noise_multiplier REAL NOT NULL,
            clip_norm REAL NOT NULL,
            sample_rate REAL NOT NULL,
            selected INTEGER NOT NULL,
            eligible INTEGER NOT NULL,
            updates INTEGER NOT NULL,
            noise_std REAL NOT NULL,
            secure INTEGER NOT NULL,
            share_count INTEGER,
            epsilon REAL NOT NULL,
            delta REAL NOT NULL,
            accountant TEXT NOT NULL,
            recorded_at REAL NOT NULL
        )"""
    )
    db.execute("CREATE INDEX idx_central_dp_session ON central_dp_rounds(session_id)")


def _m012_compression(db: Database) -> None:
    """Update compression (fednode.codecs). On the coordinator, each update's sizes:
    ``bytes_raw`` (the update as float32, what the identity codec would send), ``down_bytes``
    (what this coordinator sent that participant for the round's model: blocks or a delta)
    and ``down_raw`` (the model file's size); ``bytes`` stays the update's frame on the wire.
    NULL = a row from before. On a participant, ``residuals``: per session, the error
    feedback a lossy codec left unsent (safetensors of the model's shapes, float32), kept
    across restarts so that nothing the codec held back is lost."""
    for name in ("bytes_raw", "down_bytes", "down_raw"):
        db.execute(f"ALTER TABLE client_updates ADD COLUMN {name} INTEGER")
    db.execute(
        """CREATE TABLE residuals (
            session_id TEXT PRIMARY KEY,
            round INTEGER NOT NULL,
            codec TEXT NOT NULL,
            data BLOB NOT NULL,
            updated_at REAL NOT NULL
        )"""
    )


MIGRATIONS: list[Callable[[Database], None]] = [
    _m001_initial,
    _m002_admission,
    _m003_quality,
    _m004_rollback,
    _m005_claims,
    _m006_resume,
    _m007_participant_eval,
    _m008_round_metrics,
    _m009_update_scores,
    _m010_privacy,
    _m011_central_dp,
    _m012_compression,
]
"""Ordered; migration ``i`` (0-based) brings the schema to version ``i + 1``."""


# --- row decoding -----------------------------------------------------------------------


def probe_writable(path: Path | str, lock_timeout_s: float) -> None:
    """Raise (sqlite3.OperationalError) unless the ledger at ``path`` can take a write lock
    within ``lock_timeout_s``. Its own connection, so it may run in a worker thread while
    the node's connection is busy: fednode.storage_guard probes with it during an outage."""
    con = sqlite3.connect(str(path), timeout=lock_timeout_s)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute("ROLLBACK")
    finally:
        con.close()


# --- backup and restore (fednode/backup.py) ------------------------------------------------


def backup_database(source: Path | str, dest: Path | str) -> int:
    """Copy the ledger at ``source`` into the new file ``dest`` with SQLite's online backup
    API and return the copy's schema version.

    Safe while a node writes the ledger: the source is opened read-only, and in WAL mode a
    reader neither blocks the writer nor sees half a transaction, so the copy is one
    consistent snapshot. Nothing is migrated (a backup taken before an upgrade holds the old
    schema), and the copy is switched to a rollback journal, so it is one self-contained
    file; ``Ledger`` turns WAL on again when it opens it."""
    src_path = Path(source).resolve()
    if not src_path.is_file():
        raise NotFound(f"no ledger at {src_path}")
    try:
        src = sqlite3.connect(f"{src_path.as_uri()}?mode=ro", uri=True, timeout=5.0)
        try:
            dst = sqlite3.connect(str(dest))
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")
                return _schema_version_of(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot copy the ledger {src_path}: {exc}") from None


def check_database(path: Path | str) -> dict[str, Any]:
    """Check a ledger file that came from outside (a backup being restored) without
    trusting it: opened read-only, schema code not run (``trusted_schema=OFF``), SQLite's
    ``quick_check``, a fednode schema no newer than this code's, and an intact event hash
    chain. Returns ``{"schema_version", "events"}``; raises ValueError saying what is wrong."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise ValueError(f"not a readable SQLite database ({exc})") from None
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA trusted_schema=OFF")
        con.execute("PRAGMA cell_size_check=ON")
        problems = [r[0] for r in con.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise ValueError(f"SQLite's quick_check fails: {'; '.join(map(str, problems))}")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"schema_migrations", "events", "sessions"} <= tables:
            raise ValueError("not a fednode ledger (its tables are missing)")
        version = _schema_version_of(con)
        if version > len(MIGRATIONS):
            raise ValueError(
                f"written by a newer fednode (schema {version} > {len(MIGRATIONS)}): "
                "upgrade fednode on this machine first"
            )
        ok, bad = _chain_intact(con.execute("SELECT * FROM events ORDER BY id"))
        if not ok:
            raise ValueError(f"its event hash chain breaks at event {bad}")
        events = int(con.execute("SELECT count(*) FROM events").fetchone()[0])
        return {"schema_version": version, "events": events}
    except sqlite3.Error as exc:
        raise ValueError(f"not a sound SQLite database ({exc})") from None
    finally:
        con.close()


def _schema_version_of(con: sqlite3.Connection) -> int:
    try:
        row = con.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
    except sqlite3.OperationalError:  # no such table: a ledger never opened by fednode
        return 0
    return int(row[0] or 0)


def _chain_intact(rows: Iterable[Mapping[str, Any]]) -> tuple[bool, int | None]:
    """Recompute every event's hash and link, oldest first (``Ledger.verify_chain``)."""
    prev = GENESIS_HASH
    for row in rows:
        try:
            data = json.loads(row["data"])
        except (TypeError, ValueError):
            return False, row["id"]
        expected = event_hash(
            prev, row["id"], row["ts"], row["kind"], row["session_id"], row["entity_id"], data
        )
        if row["prev_hash"] != prev or row["hash"] != expected:
            return False, row["id"]
        prev = row["hash"]
    return True, None


def _json_column(row: dict[str, Any], *names: str) -> dict[str, Any]:
    """Decode the JSON text columns ``names`` in place (NULL stays None)."""
    for name in names:
        if row.get(name) is not None:
            row[name] = json.loads(row[name])
    return row


def _session_row(row: dict[str, Any]) -> dict[str, Any]:
    row = _json_column(dict(row), "final_metrics")
    row["spec"] = json.loads(row["spec"]) if row.get("spec") else {}
    row["secure_aggregation"] = bool(row["secure_aggregation"])
    return row


def _round_row(row: dict[str, Any]) -> dict[str, Any]:
    row = _json_column(dict(row), "metrics", "participant_metrics")
    row["selected"] = json.loads(row["selected"]) if row.get("selected") else []
    return row


def _participant_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["online"] = bool(row["online"])
    if "excluded" in row:
        row["excluded"] = bool(row["excluded"])
    return row


def _task_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["secure"] = bool(row["secure"])
    return row


def _dp_columns(dp: Mapping[str, Any]) -> dict[str, Any]:
    """An update's DP figures as client_updates columns (unknown names refused)."""
    odd = set(dp) - set(DP_COLUMNS)
    if odd:
        raise ValueError(f"not DP columns: {sorted(odd)}")
    out: dict[str, Any] = {}
    for name, value in dp.items():
        kind = DP_COLUMNS[name]
        if kind == "REAL":
            out[name] = _real(name, value)
        elif kind == "INTEGER":
            out[name] = _int(name, value, minimum=0)
        else:
            out[name] = _text(name, value, optional=True)
    return out


def _update_row(row: dict[str, Any]) -> dict[str, Any]:
    return _json_column(dict(row), "eval_metrics", "scores")


def _event_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["data"] = json.loads(row["data"])
    return row


def _ratio(raw: int, wire: int) -> float | None:
    """How many times fewer bytes crossed the wire than the raw figure (None: no bytes)."""
    return raw / wire if wire > 0 and raw > 0 else None


def _traffic_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Sums of traffic rows: bytes up on the wire and raw, down likewise, and the ratios."""
    up = sum(r["bytes"] or 0 for r in rows)
    up_raw = sum(r["bytes_raw"] or 0 for r in rows)
    down = sum(r["down_bytes"] or 0 for r in rows)
    down_raw = sum(r["down_raw"] or 0 for r in rows if r["down_bytes"])
    return {
        "up_bytes": up,
        "up_raw": up_raw,
        "up_ratio": _ratio(up_raw, up),
        "down_bytes": down,
        "down_raw": down_raw,
        "down_ratio": _ratio(down_raw, down),
    }


class Ledger:
    """One node's ledger file. Open it once per process; close it (or use ``with``)."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        """``busy_timeout_s``: how long a write waits for another process's lock. A running
        node passes a short one: its event loop must not stall, and fednode.storage_guard
        handles a longer lock."""
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The ledger says who took part, when and with what: owner-only, like the key.
        # Created 0600 before SQLite opens it, because SQLite gives its -wal and -shm files
        # the database file's mode; a file made by an older version is narrowed here.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for f in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if f.exists() and f.stat().st_mode & 0o077:
                os.chmod(f, 0o600)
        self.db = Database(self.path, execute_plugins=False)
        try:
            # busy_timeout first: a second process (fedctl ledger verify) may hold a lock.
            self.db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            self.db.close()
            raise

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """All writes inside commit together or not at all (nests as a savepoint)."""
        with self.db.atomic() as db:
            yield db

    @property
    def schema_version(self) -> int:
        row = self.db.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    def _migrate(self) -> None:
        """Apply the missing migrations, each in its own transaction with its version row."""
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"
        )
        current = self.schema_version
        known = len(MIGRATIONS)
        if current > known:
            raise StateError(
                f"ledger {self.path} was written by a newer fednode (schema {current} > {known})",
                hint="upgrade fednode on this machine, or point --data-dir at another directory",
            )
        for version in range(current + 1, known + 1):
            with self.transaction():
                MIGRATIONS[version - 1](self.db)
                self.db["schema_migrations"].insert({"version": version, "applied_at": time.time()})

    # --- helpers ------------------------------------------------------------------------

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        rows = list(self.db.query(sql, params))
        return rows[0] if rows else None

    def _require_session(self, session_id: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM sessions WHERE session_id = ?", (session_id,))
        if row is None:
            raise NotFound(f"session {session_id!r} is not in ledger {self.path}")
        return row

    def _require_round(self, session_id: str, round: int) -> dict[str, Any]:
        row = self._one(
            "SELECT * FROM training_rounds WHERE session_id = ? AND round = ?",
            (session_id, round),
        )
        if row is None:
            raise NotFound(f"round {round} of session {session_id!r} was never started")
        return row

    # --- sessions -----------------------------------------------------------------------

    def create_session(
        self,
        session_id: str,
        *,
        name: str,
        spec: dict[str, Any],
        strategy: str,
        secure_aggregation: bool,
        rounds: int,
        created_at: float,
    ) -> dict[str, Any]:
        """Record a new session in status ``created``; an existing id is a StateError."""
        try:
            self.db["sessions"].insert(
                {
                    "session_id": session_id,
                    "name": name,
                    "spec": canonical_json(spec),
                    "status": "created",
                    "strategy": strategy,
                    "secure_aggregation": int(bool(secure_aggregation)),
                    "rounds": int(rounds),
                    "rounds_completed": 0,
                    "created_at": float(created_at),
                }
            )
        except sqlite3.IntegrityError as exc:
            raise StateError(f"session {session_id!r} already exists") from exc
        return self.get_session(session_id)

    def update_session(self, session_id: str, **fields: Any) -> dict[str, Any]:
        """Change known columns only: a typo must fail loudly, not add a column."""
        unknown = set(fields) - SESSION_FIELDS
        if unknown:
            raise ValueError(
                f"unknown session field(s) {sorted(unknown)}; known: {sorted(SESSION_FIELDS)}"
            )
        if "status" in fields and fields["status"] not in SESSION_STATUSES:
            raise ValueError(
                f"session status {fields['status']!r} not in {sorted(SESSION_STATUSES)}"
            )
        if "spec" in fields:
            fields["spec"] = canonical_json(fields["spec"])
        if "secure_aggregation" in fields:
            fields["secure_aggregation"] = int(bool(fields["secure_aggregation"]))
        with self.transaction():
            self._require_session(session_id)
            if fields:
                self.db["sessions"].update(session_id, fields)
        return self.get_session(session_id)

    def get_session(self, session_id: str) -> dict[str, Any]:
        return _session_row(self._require_session(session_id))

    def restart_session(self, session_id: str, *, reason: str, now: float) -> dict[str, Any]:
        """A coordinator that (re)started finds this session live: in ONE transaction, the
        round that was cut (still ``running``; none after a clean stop, which aborted it
        already) becomes ``aborted`` with its ``round_aborted`` event, the session's
        ``restarts`` counts up, and a ``coordinator_restarted`` event says so. Returns
        ``{"restarts": n, "aborted": [round numbers]}``."""
        with self.transaction():
            session = self._require_session(session_id)
            last = self.db.execute(
                "SELECT kind FROM events WHERE session_id = ? ORDER BY id DESC LIMIT 1",
                (session_id,),
            ).fetchone()
            clean = last is not None and last[0] == "coordinator_stopped"
            aborted = []
            for r in self.rounds(session_id):
                if r["status"] == "running":
                    self._abort_round_tx(session_id, r, reason=reason, now=now)
                    aborted.append(r["round"])
            restarts = int(session.get("restarts") or 0) + 1
            self.db["sessions"].update(session_id, {"restarts": restarts})
            self.append_event(
                "coordinator_restarted",
                session_id=session_id,
                data={
                    "restarts": restarts,
                    "clean": clean,  # the last stop was a clean one (SIGTERM), not a crash
                    "aborted_rounds": aborted,
                    "status": session["status"],
                },
            )
        return {"restarts": restarts, "aborted": aborted, "clean": clean}

    def abort_round(self, session_id: str, round: int, *, reason: str, now: float) -> None:
        """The round in flight when the coordinator stops cleanly: ``aborted``, with its
        ``round_aborted`` event, in ONE transaction; it runs again when the node is back."""
        with self.transaction():
            self._abort_round_tx(session_id, self._get_round(session_id, round), reason, now)

    def _abort_round_tx(self, session_id: str, r: dict[str, Any], reason: str, now: float) -> None:
        self._finish_round_tx(
            session_id,
            r["round"],
            status="aborted",
            ended_at=now,
            model_cid=None,
            accuracy=None,
            loss=None,
            participants=0,
            dropped=0,
            bytes_up=r["bytes_up"],
            bytes_down=r["bytes_down"],
            reason=reason,
        )
        self.append_event(
            "round_aborted",
            session_id=session_id,
            data={
                "round": r["round"],
                "attempt": r.get("attempts", 1),
                "started_at": r["started_at"],
                "selected": r["selected"],
                "reason": reason,
            },
        )

    def list_sessions(self) -> list[dict[str, Any]]:
        """Newest first (by creation time, then insertion order)."""
        rows = self.db.query("SELECT * FROM sessions ORDER BY created_at DESC, rowid DESC")
        return [_session_row(r) for r in rows]

    # --- rounds -------------------------------------------------------------------------

    def start_round(
        self,
        session_id: str,
        round: int,
        *,
        selected: list[str],
        model_cid_in: str,
        started_at: float,
    ) -> dict[str, Any]:
        """Open a round; starting the same round twice is a StateError (resume, don't redo).

        A round whose last attempt was ``aborted`` (the coordinator stopped or crashed while
        it ran) is started again under the same number: its row is reset to ``running`` and
        ``attempts`` counts up; the aborted attempt stays in the chain as its
        ``round_aborted`` event."""
        with self.transaction():
            self._require_session(session_id)
            old = self.db.execute(
                "SELECT status FROM training_rounds WHERE session_id = ? AND round = ?",
                (session_id, int(round)),
            ).fetchone()
            if old is not None and old[0] == "aborted":
                self.db.execute(
                    "UPDATE training_rounds SET status = 'running', started_at = ?, "
                    "ended_at = NULL, duration_s = NULL, selected = ?, participants = 0, "
                    "dropped = 0, model_cid_in = ?, model_cid = NULL, accuracy = NULL, "
                    "loss = NULL, bytes_up = 0, bytes_down = 0, reason = NULL, "
                    "attempts = attempts + 1 WHERE session_id = ? AND round = ?",
                    (
                        float(started_at),
                        canonical_json(list(selected)),
                        model_cid_in,
                        session_id,
                        int(round),
                    ),
                )
                return self._get_round(session_id, round)
            try:
                self.db["training_rounds"].insert(
                    {
                        "session_id": session_id,
                        "round": int(round),
                        "status": "running",
                        "started_at": float(started_at),
                        "selected": canonical_json(list(selected)),
                        "model_cid_in": model_cid_in,
                    }
                )
            except sqlite3.IntegrityError as exc:
                raise StateError(
                    f"round {round} of session {session_id!r} was already started"
                ) from exc
        return self._get_round(session_id, round)

    def _finish_round_tx(
        self,
        session_id: str,
        round: int,
        *,
        status: str,
        ended_at: float,
        model_cid: str | None,
        accuracy: float | None,
        loss: float | None,
        participants: int,
        dropped: int,
        bytes_up: int,
        bytes_down: int,
        reason: str | None,
        metrics: str | None = None,
        participant_metrics: str | None = None,
    ) -> dict[str, Any]:
        """The body of finish/complete; the caller holds the transaction. ``metrics`` and
        ``participant_metrics``: JSON text from _eval_metrics."""
        if status not in FINISHED_ROUND_STATUSES:
            raise ValueError(f"round status {status!r} not in {sorted(FINISHED_ROUND_STATUSES)}")
        row = self._require_round(session_id, round)
        if row["status"] != "running":
            raise StateError(f"round {round} of session {session_id!r} is already {row['status']}")
        self.db.execute(
            """UPDATE training_rounds SET status = ?, ended_at = ?, duration_s = ?,
                   model_cid = ?, accuracy = ?, loss = ?, participants = ?, dropped = ?,
                   bytes_up = ?, bytes_down = ?, reason = ?, metrics = ?,
                   participant_metrics = ?
               WHERE session_id = ? AND round = ?""",
            (
                status,
                float(ended_at),
                max(0.0, float(ended_at) - row["started_at"]),
                model_cid,
                accuracy,
                loss,
                int(participants),
                int(dropped),
                int(bytes_up),
                int(bytes_down),
                reason,
                metrics,
                participant_metrics,
                session_id,
                int(round),
            ),
        )
        if status == "completed":
            self._refresh_session_progress(session_id, model_cid, accuracy, loss, metrics)
        return row

    def _refresh_session_progress(
        self,
        session_id: str,
        model_cid: str | None,
        accuracy: float | None,
        loss: float | None,
        metrics: str | None = None,
    ) -> None:
        """rounds_completed is recounted from rows, so a replayed call cannot drift it."""
        fields: dict[str, Any] = {
            "rounds_completed": self.db.execute(
                "SELECT COUNT(*) FROM training_rounds WHERE session_id = ? "
                "AND status = 'completed'",
                (session_id,),
            ).fetchone()[0]
        }
        if model_cid is not None:
            fields.update(
                model_cid=model_cid,
                final_accuracy=accuracy,
                final_loss=loss,
                final_metrics=metrics,
            )
        self.db["sessions"].update(session_id, fields)

    def finish_round(
        self,
        session_id: str,
        round: int,
        *,
        status: str,
        ended_at: float,
        model_cid: str | None = None,
        accuracy: float | None = None,
        loss: float | None = None,
        participants: int = 0,
        dropped: int = 0,
        bytes_up: int = 0,
        bytes_down: int = 0,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Close a running round (mostly ``failed``/``aborted``; see ``complete_round``).

        A ``completed`` status here also refreshes the session's progress, but records no
        model version: rounds that produce a model should go through ``complete_round``.
        """
        with self.transaction():
            self._finish_round_tx(
                session_id,
                round,
                status=status,
                ended_at=ended_at,
                model_cid=model_cid,
                accuracy=accuracy,
                loss=loss,
                participants=participants,
                dropped=dropped,
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                reason=reason,
            )
        return self._get_round(session_id, round)

    def complete_round(
        self,
        session_id: str,
        round: int,
        *,
        ended_at: float,
        model_cid: str,
        accuracy: float | None,
        loss: float | None,
        size: int,
        participants: int,
        dropped: int = 0,
        bytes_up: int = 0,
        bytes_down: int = 0,
        parent_cid: str | None = None,
        reason: str | None = None,
        state_cid: str | None = None,
        evaluated_cid: str | None = None,
        metrics: Mapping[str, float] | None = None,
        participant_metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Finish a round that produced a new global model, in ONE transaction.

        ``metrics``: the task's figures by name (protocol.messages.EVAL_METRICS: accuracy,
        roc_auc, mae, r2) from the same evaluation as ``accuracy`` and ``loss``; they go
        where those go (the round, the session's ``final_metrics``, the version measured).
        ``participant_metrics``: the participants' example-weighted mean, kept on the
        round beside them (with evaluation.on = "both" the round's are the coordinator's).

        ``evaluated_cid``: the round's ``accuracy`` and ``loss`` describe that model (the
        participants evaluated the model the round trained from), not the new version: they
        go to the round's row and the session's final figures, and to that live version's
        own row where it has none yet, while the new version stays unmeasured (NULL) until
        the next round's reports.

        Marks the round ``completed`` (with timings, counts, bytes and metrics), inserts its
        ``model_versions`` row (``parent_cid`` defaults to the round's ``model_cid_in``,
        ``created_at`` = ``ended_at``) and sets the session's ``rounds_completed``,
        ``model_cid``, ``final_accuracy`` and ``final_loss``. If any part fails (say the
        model row already exists) nothing is written, so after a crash the ledger never
        shows a completed round without its model. Returns the round as ``rounds()`` does.
        Raises NotFound for a round never started, StateError for one already finished.
        """
        figures = _eval_metrics("metrics", metrics)
        theirs = _eval_metrics("participant_metrics", participant_metrics)
        with self.transaction():
            row = self._finish_round_tx(
                session_id,
                round,
                status="completed",
                ended_at=ended_at,
                model_cid=model_cid,
                accuracy=accuracy,
                loss=loss,
                participants=participants,
                dropped=dropped,
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                reason=reason,
                metrics=figures,
                participant_metrics=theirs,
            )
            lagged = evaluated_cid is not None
            self._insert_model(
                session_id,
                round,
                cid=model_cid,
                parent_cid=parent_cid if parent_cid is not None else row["model_cid_in"],
                accuracy=None if lagged else accuracy,
                loss=None if lagged else loss,
                size=size,
                created_at=ended_at,
                state_cid=state_cid,
                metrics=None if lagged else figures,
            )
            if lagged and accuracy is not None:
                self.db.execute(
                    "UPDATE model_versions SET accuracy = ?, loss = ?, metrics = ? "
                    "WHERE session_id = ? AND cid = ? AND rolled_back_at IS NULL "
                    "AND accuracy IS NULL",
                    (accuracy, loss, figures, session_id, evaluated_cid),
                )
        return self._get_round(session_id, round)

    def _get_round(self, session_id: str, round: int) -> dict[str, Any]:
        return _round_row(self._require_round(session_id, round))

    def rounds(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT * FROM training_rounds WHERE session_id = ? ORDER BY round", (session_id,)
        )
        return [_round_row(r) for r in rows]

    # --- client updates -----------------------------------------------------------------

    def record_update(self, session_id: str, round: int, **fields: Any) -> dict[str, Any]:
        """Record one received update (``update_values`` names the fields) and bump its
        peer's counters; the stored row. The coordinator batches instead (``record_updates``)."""
        self.record_updates([self.update_values(session_id, round, **fields)])
        row = self._one("SELECT * FROM client_updates ORDER BY id DESC LIMIT 1")
        assert row is not None
        return _update_row(row)

    @staticmethod
    def update_values(
        session_id: str,
        round: int,
        *,
        participant: str,
        samples: int,
        loss: float | None,
        bytes: int,
        duration_s: float | None,
        arrival_s: float | None,
        update_cid: str | None,
        status: str = "accepted",
        reason: str | None = None,
        received_at: float,
        eval_examples: int | None = None,
        eval_loss: float | None = None,
        eval_metrics: Mapping[str, float] | None = None,
        dp: Mapping[str, Any] | None = None,
        bytes_raw: int | None = None,
        down_bytes: int | None = None,
        down_raw: int | None = None,
    ) -> dict[str, Any]:
        """One received update's ``client_updates`` row, checked now (a bad figure raises
        here, where it entered, not later inside a batch of other peers' rows).

        ``eval_*``: the participant's evaluation of the round's model on its held-out split,
        when it sent one (None = no report). ``dp``: its DP figures by DP_COLUMNS name
        (None or missing = not reported). ``bytes_raw``, ``down_bytes``, ``down_raw``: the
        compression figures of _m012_compression (None = not known).
        """
        if status not in UPDATE_STATUSES:
            raise ValueError(f"update status {status!r} not in {sorted(UPDATE_STATUSES)}")
        return {
            "session_id": session_id,
            "round": int(round),
            "participant": participant,
            "samples": int(samples),
            "loss": loss,
            "bytes": int(bytes),
            "duration_s": duration_s,
            "arrival_s": arrival_s,
            "update_cid": update_cid,
            "status": status,
            "reason": reason,
            "received_at": float(received_at),
            "eval_examples": _int("eval_examples", eval_examples, minimum=0),
            "eval_loss": _real("eval_loss", eval_loss),
            "eval_metrics": None
            if eval_metrics is None
            else canonical_json({k: _real(k, v, optional=False) for k, v in eval_metrics.items()}),
            # every DP column, None where not reported: a batch's rows share their columns
            **dict.fromkeys(DP_COLUMNS),
            **_dp_columns(dp or {}),
            "bytes_raw": _int("bytes_raw", bytes_raw, minimum=0),
            "down_bytes": _int("down_bytes", down_bytes, minimum=0),
            "down_raw": _int("down_raw", down_raw, minimum=0),
        }

    def record_updates(self, rows: Sequence[Mapping[str, Any]]) -> int:
        """Many ``update_values`` rows in ONE transaction with prepared statements (the
        coordinator writes a round's updates in batches: docs/scale.md). Each peer's
        ``rounds_completed`` (accepted) or ``updates_rejected`` (rejected) moves in the same
        transaction, so callers must not also increment them by hand. Returns the count."""
        if not rows:
            return 0
        cols = list(rows[0])
        if any(list(r) != cols for r in rows) or set(cols) != UPDATE_COLUMNS:
            raise ValueError("record_updates takes rows made by Ledger.update_values")
        counts: Counter[tuple[str, str]] = Counter(
            (
                "rounds_completed" if r["status"] == "accepted" else "updates_rejected",
                r["participant"],
            )
            for r in rows
        )
        with self.transaction():
            for session_id in {r["session_id"] for r in rows}:
                self._require_session(session_id)
            self.db.conn.executemany(
                f"INSERT INTO client_updates ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' * len(cols))})",
                [tuple(r.values()) for r in rows],
            )
            for counter in ("rounds_completed", "updates_rejected"):
                self.db.conn.executemany(
                    f"UPDATE participants SET {counter} = {counter} + ? WHERE peer_id = ?",
                    [(n, peer) for (c, peer), n in counts.items() if c == counter],
                )
        return len(rows)

    def record_scores(
        self, session_id: str, round: int, scores: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Outlier detection's figures and verdict (``scores[peer]``: UpdateScore.as_dict) on
        each peer's accepted update of the round (its latest attempt), in one transaction."""
        with self.transaction():
            for peer, figures in scores.items():
                self.db.execute(
                    "UPDATE client_updates SET scores = ?, excluded = ? WHERE id = (SELECT "
                    "MAX(id) FROM client_updates WHERE session_id = ? AND round = ? AND "
                    "participant = ? AND status = 'accepted')",
                    (
                        json.dumps(dict(figures), allow_nan=False),
                        1 if figures.get("excluded") else 0,
                        _text("session_id", session_id),
                        _int("round", round),
                        _text("participant", peer),
                    ),
                )

    def exclusion_history(self, session_id: str, peer: str) -> list[bool]:
        """Oldest first: whether each of the peer's judged updates in the session was
        excluded, counting only those after its last quarantine."""
        rows = self.db.query(
            "SELECT excluded, quarantined FROM client_updates WHERE session_id = ? AND "
            "participant = ? AND excluded IS NOT NULL ORDER BY id",
            (session_id, peer),
        )
        out: list[bool] = []
        for r in rows:
            out.append(bool(r["excluded"]))
            if r["quarantined"]:
                out = []  # what came before this quarantine was dealt with by it
        return out

    def mark_quarantined(self, session_id: str, round: int, peer: str) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE client_updates SET quarantined = 1 WHERE id = (SELECT MAX(id) FROM "
                "client_updates WHERE session_id = ? AND round = ? AND participant = ? AND "
                "status = 'accepted')",
                (_text("session_id", session_id), _int("round", round), _text("participant", peer)),
            )

    def record_central_dp(self, session_id: str, release: Mapping[str, Any]) -> None:
        """One noisy aggregate of a central-DP session (fednode.central_dp.Release's
        fields, with the session's ``epsilon`` after it, ``delta`` and ``accountant``)."""
        r = release
        row = {
            "session_id": _text("session_id", session_id),
            "round": _int("round", r["round"], optional=False, minimum=1),
            "noise_multiplier": _real("noise_multiplier", r["noise_multiplier"], optional=False),
            "planned_noise_multiplier": _real(
                "planned_noise_multiplier", r["planned_noise_multiplier"], optional=False
            ),
            "clip_norm": _real("clip_norm", r["clip_norm"], optional=False),
            "sample_rate": _real("sample_rate", r["sample_rate"], optional=False),
            "selected": _int("selected", r["selected"], optional=False, minimum=0),
            "eligible": _int("eligible", r["eligible"], optional=False, minimum=0),
            "updates": _int("updates", r["updates"], optional=False, minimum=0),
            "noise_std": _real("noise_std", r["noise_std"], optional=False),
            "secure": 1 if r["secure"] else 0,
            "share_count": _int("share_count", r.get("share_count"), minimum=1),
            "epsilon": _real("epsilon", r["epsilon"], optional=False),
            "delta": _real("delta", r["delta"], optional=False),
            "accountant": _text("accountant", r["accountant"]),
            "recorded_at": _real("recorded_at", r["recorded_at"], optional=False),
        }
        with self.transaction():
            self._insert("central_dp_rounds", row)

    def central_dp_rounds(self, session_id: str) -> list[dict[str, Any]]:
        """A central-DP session's noisy aggregates, oldest first (the accountant's history:
        one step per row at its noise_multiplier and sample_rate); ``epsilon`` of the last
        is the session's ε so far."""
        rows = self.db.query(
            "SELECT * FROM central_dp_rounds WHERE session_id = ? ORDER BY id", (session_id,)
        )
        return [{**r, "secure": bool(r["secure"])} for r in rows]

    def updates(self, session_id: str, round: int | None = None) -> list[dict[str, Any]]:
        """In arrival order; one round's when ``round`` is given."""
        if round is None:
            rows = self.db.query(
                "SELECT * FROM client_updates WHERE session_id = ? ORDER BY id", (session_id,)
            )
        else:
            rows = self.db.query(
                "SELECT * FROM client_updates WHERE session_id = ? AND round = ? ORDER BY id",
                (session_id, round),
            )
        return [_update_row(r) for r in rows]

    # --- participants -------------------------------------------------------------------

    def upsert_participant(self, peer_id: str, **fields: Any) -> dict[str, Any]:
        """Insert a peer seen for the first time (first_seen = last_seen = now), or update
        only the given fields of a known one (last_seen moves only when passed)."""
        unknown = set(fields) - PARTICIPANT_FIELDS
        if unknown:
            raise ValueError(
                f"unknown participant field(s) {sorted(unknown)}; "
                f"known: {sorted(PARTICIPANT_FIELDS)}"
            )
        for flag in ("online", "excluded"):
            if flag in fields:
                fields[flag] = int(bool(fields[flag]))
        with self.transaction():
            exists = self._one("SELECT 1 AS x FROM participants WHERE peer_id = ?", (peer_id,))
            if exists is None:
                now = time.time()
                record = {"peer_id": peer_id, "first_seen": now, "last_seen": now, **fields}
                self.db["participants"].insert(record)
            elif fields:
                self.db["participants"].update(peer_id, fields)
        return self.get_participant(peer_id)

    def get_participant(self, peer_id: str) -> dict[str, Any]:
        row = self._one("SELECT * FROM participants WHERE peer_id = ?", (peer_id,))
        if row is None:
            raise NotFound(f"peer {peer_id} has never been seen by this node")
        return _participant_row(row)

    def participants(self) -> list[dict[str, Any]]:
        """Most recently seen first."""
        rows = self.db.query("SELECT * FROM participants ORDER BY last_seen DESC, peer_id")
        return [_participant_row(r) for r in rows]

    def excluded_peers(self) -> set[str]:
        """Peers an operator excluded from selection (``fedctl participants exclude``)."""
        return {
            r["peer_id"] for r in self.db.query("SELECT peer_id FROM participants WHERE excluded")
        }

    def last_contributions(self) -> dict[str, dict[str, Any]]:
        """Each peer's last accepted update: session, round and when it arrived."""
        rows = self.db.query(
            "SELECT participant, session_id, round, received_at FROM client_updates "
            "WHERE id IN (SELECT MAX(id) FROM client_updates WHERE status = 'accepted' "
            "GROUP BY participant)"
        )
        return {
            r["participant"]: {
                "session_id": r["session_id"],
                "round": r["round"],
                "at": r["received_at"],
            }
            for r in rows
        }

    def recent_task_outcomes(self, peer_id: str, limit: int) -> list[tuple[str, int, TaskOutcome]]:
        """A peer's last ``limit`` finished selections, oldest first, as (session_id, round,
        outcome): the history the coordinator's quality monitor starts from for a peer it
        has not seen since this process started (it then keeps it in memory).

        ``completed``: it has an accepted update (or masked input) in the round;
        ``declined``: it sent a ``task_error`` whose code is ``LIMIT_*`` (the spec exceeds the
        limits its own operator set: the operator's choice, not unreliability); ``failed``:
        anything else (a training deadline, a crash, a rejected update, it left). A round
        that asked it as a spare and closed without it (``not_needed`` in the round's
        ``round_completed`` event: [selection] over_selection) is no selection of it."""
        rows = list(
            self.db.query(
                "SELECT r.session_id, r.round FROM training_rounds r, json_each(r.selected) j "
                "WHERE j.value = ? AND r.status NOT IN ('running', 'aborted') "
                "AND NOT EXISTS (SELECT 1 FROM events e, json_each(e.data, '$.not_needed') n "
                "WHERE e.session_id = r.session_id AND e.kind = 'round_completed' "
                "AND json_extract(e.data, '$.round') = r.round AND n.value = j.value) "
                "ORDER BY r.started_at DESC LIMIT ?",
                (peer_id, _int("limit", limit, optional=False, minimum=0)),
            )
        )
        if not rows:
            return []
        sessions = sorted({r["session_id"] for r in rows})
        declined = {
            (d["session_id"], d["round"])
            for d in self.db.query(
                "SELECT session_id, json_extract(data, '$.round') AS round FROM events "
                f"WHERE session_id IN ({','.join('?' * len(sessions))}) "  # idx_events_session
                "AND kind = 'task_error' AND entity_id = ? "
                "AND json_extract(data, '$.code') LIKE 'LIMIT\\_%' ESCAPE '\\'",
                (*sessions, peer_id),
            )
        }
        out: list[tuple[str, int, TaskOutcome]] = []
        for r in reversed(rows):
            key = (r["session_id"], r["round"])
            outcome: TaskOutcome = "declined"
            if key not in declined:
                hit = self.db.execute(
                    "SELECT 1 FROM client_updates WHERE session_id = ? AND round = ? "
                    "AND participant = ? AND status = 'accepted' LIMIT 1",
                    (*key, peer_id),
                ).fetchone()
                outcome = "completed" if hit is not None else "failed"
            out.append((key[0], key[1], outcome))
        return out

    def mark_all_offline(self) -> int:
        """At node start nobody is connected yet, whatever the last run left behind."""
        with self.transaction():
            cur = self.db.execute("UPDATE participants SET online = 0 WHERE online != 0")
        return cur.rowcount

    # --- admission ----------------------------------------------------------------------

    def record_token(
        self, token_id: str, session_id: str, *, expires_at: float, max_uses: int, created_by: str
    ) -> None:
        self._require_session(session_id)
        with self.transaction():
            self.db["join_tokens"].insert(
                {
                    "token_id": token_id,
                    "session_id": session_id,
                    "expires_at": expires_at,
                    "max_uses": max_uses,
                    "created_at": time.time(),
                    "created_by": created_by,
                }
            )

    def use_token(self, token_id: str, session_id: str, peer_id: str) -> str:
        """Admit ``peer_id`` to the token's session, counting a use for a new peer.

        Returns "admitted", "already" (this peer used it before) or raises StateError
        with code TOKEN_USED_UP / NotFound for a token this ledger never issued. One
        transaction: two peers racing for the last use cannot both get it.
        """
        with self.transaction():
            tok = self._one("SELECT * FROM join_tokens WHERE token_id = ?", (token_id,))
            if tok is None or tok["session_id"] != session_id:
                raise NotFound(f"join token {token_id} was not issued by this coordinator")
            member = self._one(
                "SELECT token_id FROM session_members WHERE session_id = ? AND peer_id = ?",
                (session_id, peer_id),
            )
            if member is not None:
                return "already"
            used = self._one(
                "SELECT count(*) AS n FROM session_members WHERE token_id = ?", (token_id,)
            )
            if used is not None and used["n"] >= tok["max_uses"]:
                raise StateError(
                    f"join token {token_id} was already used by {used['n']} peer(s), its limit",
                    code="TOKEN_USED_UP",
                    hint="ask the operator for a new invite",
                )
            self.db["session_members"].insert(
                {
                    "session_id": session_id,
                    "peer_id": peer_id,
                    "via": "token",
                    "token_id": token_id,
                    "joined_at": time.time(),
                }
            )
        return "admitted"

    def has_usable_invite(self, session_id: str, now: float) -> bool:
        """Whether an invite of the session can still admit someone: unexpired at ``now``,
        with uses left."""
        row = self._one(
            "SELECT 1 AS x FROM join_tokens AS t WHERE t.session_id = ? AND t.expires_at > ? "
            "AND (SELECT count(*) FROM session_members AS m WHERE m.token_id = t.token_id)"
            " < t.max_uses LIMIT 1",
            (session_id, _real("now", now, optional=False)),
        )
        return row is not None

    def record_claims(
        self, session_ids: Iterable[str], peer_id: str, num_examples: int, now: float
    ) -> None:
        """A participant registered ``num_examples`` for these sessions. A session keeps the
        smallest count the peer ever registered for it: a claim cannot grow mid-session."""
        with self.transaction():
            for sid in session_ids:
                self.db.execute(
                    """INSERT INTO session_claims
                           (session_id, peer_id, num_examples, first_at, updated_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (session_id, peer_id) DO UPDATE SET
                           num_examples = MIN(num_examples, excluded.num_examples),
                           updated_at = excluded.updated_at""",
                    (sid, peer_id, int(num_examples), float(now), float(now)),
                )

    def record_session_claims(
        self, session_id: str, examples: Mapping[str, int], now: float
    ) -> None:
        """``record_claims`` of many peers for one session (a round's selection), in ONE
        transaction: a round of a thousand peers is one commit, not a thousand."""
        with self.transaction():
            for peer_id, n in examples.items():
                self.record_claims([session_id], peer_id, n, now)

    def claims(self, session_id: str) -> dict[str, int]:
        """peer ID -> the most examples it may claim in this session."""
        rows = self.db.query(
            "SELECT peer_id, num_examples FROM session_claims WHERE session_id = ?", [session_id]
        )
        return {r["peer_id"]: int(r["num_examples"]) for r in rows}

    def members(self, session_id: str) -> set[str]:
        rows = self.db.query(
            "SELECT peer_id FROM session_members WHERE session_id = ?", [session_id]
        )
        return {r["peer_id"] for r in rows}

    # --- models -------------------------------------------------------------------------

    def _insert_model(
        self,
        session_id: str,
        round: int,
        *,
        cid: str,
        parent_cid: str | None,
        accuracy: float | None,
        loss: float | None,
        size: int | None,
        created_at: float,
        state_cid: str | None = None,
        metrics: str | None = None,
    ) -> None:
        try:
            self.db["model_versions"].insert(
                {
                    "session_id": session_id,
                    "round": int(round),
                    "cid": cid,
                    "parent_cid": parent_cid,
                    "accuracy": accuracy,
                    "loss": loss,
                    "size": size,
                    "created_at": float(created_at),
                    "state_cid": state_cid,
                    "metrics": metrics,
                }
            )
        except sqlite3.IntegrityError as exc:
            raise StateError(
                f"a model for round {round} of session {session_id!r} is already recorded"
            ) from exc

    def record_model(
        self,
        session_id: str,
        round: int,
        *,
        cid: str,
        parent_cid: str | None,
        accuracy: float | None,
        loss: float | None,
        size: int | None,
        created_at: float,
        state_cid: str | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """A model version outside a round's completion (e.g. the initial model, round 0);
        ``metrics``: its figures by name (as ``complete_round``'s)."""
        with self.transaction():
            self._require_session(session_id)
            self._insert_model(
                session_id,
                round,
                cid=cid,
                parent_cid=parent_cid,
                accuracy=accuracy,
                loss=loss,
                size=size,
                created_at=created_at,
                state_cid=state_cid,
                metrics=_eval_metrics("metrics", metrics),
            )
        row = self.db["model_versions"].get((session_id, int(round)))
        return _json_column(dict(row), "metrics")

    def models(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT * FROM model_versions WHERE session_id = ? ORDER BY round", (session_id,)
        )
        return [_json_column(dict(r), "metrics") for r in rows]

    def live_models(self, session_id: str) -> list[dict[str, Any]]:
        """The versions not rolled back, by round: the lineage the current model is on."""
        rows = self.db.query(
            "SELECT * FROM model_versions WHERE session_id = ? AND rolled_back_at IS NULL "
            "ORDER BY round",
            (session_id,),
        )
        return [_json_column(dict(r), "metrics") for r in rows]

    def rollback_models(
        self,
        session_id: str,
        to_round: int,
        *,
        now: float,
        data: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Go back to round ``to_round``'s version, in ONE transaction.

        Every live version after it is marked rolled back (``rolled_back_at`` = ``now``,
        ``rolled_back_to`` = ``to_round``), the session's ``model_cid``/``final_accuracy``/
        ``final_loss`` become the target's, and a hash-chained "rollback" event is appended
        with ``data`` plus from_cid, from_round, to_cid, to_round and the rounds rolled back.
        NotFound for a round without a version; StateError for a version itself rolled back.
        Returns the event's data.
        """
        to_round = _int("to_round", to_round, optional=False, minimum=0)
        t = _real("now", now, optional=False)
        with self.transaction():
            self._require_session(session_id)
            target = self._one(
                "SELECT * FROM model_versions WHERE session_id = ? AND round = ?",
                (session_id, to_round),
            )
            if target is None:
                raise NotFound(
                    f"session {session_id!r} has no model version of round {to_round}",
                    hint=f"`fedctl model list {session_id}` shows the rounds that have one",
                )
            if target["rolled_back_at"] is not None:
                raise StateError(
                    f"round {to_round}'s version of session {session_id!r} was itself rolled "
                    f"back (to round {target['rolled_back_to']})",
                    hint=f"pick a round whose status is current or superseded in "
                    f"`fedctl model list {session_id}`",
                )
            live = self.live_models(session_id)
            current = live[-1]
            undone = [m["round"] for m in live if m["round"] > to_round]
            self.db.execute(
                "UPDATE model_versions SET rolled_back_at = ?, rolled_back_to = ? "
                "WHERE session_id = ? AND round > ? AND rolled_back_at IS NULL",
                (t, to_round, session_id, to_round),
            )
            self.db["sessions"].update(
                session_id,
                {
                    "model_cid": target["cid"],
                    "final_accuracy": target["accuracy"],
                    "final_loss": target["loss"],
                    "final_metrics": target["metrics"],  # JSON text, as stored
                },
            )
            event = {
                **data,
                "from_cid": current["cid"],
                "from_round": current["round"],
                "to_cid": target["cid"],
                "to_round": to_round,
                "rolled_back": undone,
            }
            self.append_event("rollback", session_id=session_id, data=event, ts=t)
        return event

    def find_model(self, cid: str) -> dict[str, Any] | None:
        """The first recorded version with this CID (the same bytes can recur)."""
        return self._one(
            "SELECT * FROM model_versions WHERE cid = ? ORDER BY created_at, rowid LIMIT 1",
            (cid,),
        )

    # --- events (hash chain) ------------------------------------------------------------

    def append_event(
        self,
        kind: str,
        *,
        session_id: str | None = None,
        entity_id: str | None = None,
        data: dict[str, Any] | None = None,
        ts: float | None = None,
    ) -> dict[str, Any]:
        """Append one event linked to the last one; the id is fixed before hashing."""
        data = {} if data is None else data
        ts = time.time() if ts is None else float(ts)
        data_json = canonical_json(data)  # fails early on values JSON cannot hold
        with self.transaction():
            last = self._one("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1")
            seq = self.db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
            ).fetchone()
            # Never reuse an id, even one whose row has gone (that is what AUTOINCREMENT is for).
            event_id = max(seq[0] if seq else 0, last["id"] if last else 0) + 1
            prev_hash = last["hash"] if last else GENESIS_HASH
            decoded = json.loads(data_json)
            row = {
                "id": event_id,
                "ts": ts,
                "kind": kind,
                "session_id": session_id,
                "entity_id": entity_id,
                "data": data_json,
                "prev_hash": prev_hash,
                "hash": event_hash(prev_hash, event_id, ts, kind, session_id, entity_id, decoded),
            }
            self.db["events"].insert(row)
        return _event_row(row)

    def events(
        self, session_id: str | None = None, since_id: int = 0, limit: int = 200
    ) -> list[dict[str, Any]]:
        """Events after ``since_id`` in order, for paging and live tails."""
        if session_id is None:
            rows = self.db.query(
                "SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?", (since_id, limit)
            )
        else:
            rows = self.db.query(
                "SELECT * FROM events WHERE session_id = ? AND id > ? ORDER BY id LIMIT ?",
                (session_id, since_id, limit),
            )
        return [_event_row(r) for r in rows]

    def latest_events(self, session_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The last ``limit`` events (of one session, or of the node), oldest first: the
        tail an operator asks for (admin ``events.list``)."""
        n = _int("limit", limit, optional=False, minimum=1)
        if session_id is None:
            rows = self.db.query("SELECT * FROM events ORDER BY id DESC LIMIT ?", (n,))
        else:
            rows = self.db.query(
                "SELECT * FROM events WHERE session_id = ? ORDER BY id DESC LIMIT ?",
                (session_id, n),
            )
        return [_event_row(r) for r in reversed(list(rows))]

    def latest_event(self, kind: str) -> dict[str, Any] | None:
        """The newest event of one kind (e.g. the ``sla`` a coordinator records at start)."""
        row = self._one("SELECT * FROM events WHERE kind = ? ORDER BY id DESC LIMIT 1", (kind,))
        return _event_row(row) if row is not None else None

    def event_count(self) -> int:
        """How many events the chain holds."""
        row = self._one("SELECT count(*) AS n FROM events")
        return int(row["n"]) if row is not None else 0

    def verify_chain(self) -> tuple[bool, int | None]:
        """Recompute every hash and link; returns (ok, id of the first bad event).

        An edited row fails its own hash; a deleted or moved row breaks the next row's
        ``prev_hash`` link. Truncating the tail is not detectable from the chain alone.
        """
        return _chain_intact(self.db.query("SELECT * FROM events ORDER BY id"))

    # --- quality metrics (coordinator side) ---------------------------------------------

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        """INSERT of checked columns (names from this module's constants, never a caller's)."""
        cols = ", ".join(row)
        marks = ", ".join("?" * len(row))
        cur = self.db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))
        return int(cur.lastrowid)

    def _row(self, table: str, row_id: int) -> dict[str, Any]:
        row = self._one(f"SELECT * FROM {table} WHERE id = ?", (row_id,))
        if row is None:
            raise NotFound(f"{table} row {row_id} is not in ledger {self.path}")
        return row

    def record_participant_quality(
        self, peer_id: str, session_id: str | None, ts: float, metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """One snapshot of a peer's measured figures and scores; returns the stored row.

        ``metrics`` keys are the column names (PARTICIPANT_QUALITY_COLUMNS); an unknown key
        is a ValueError, so a renamed field in quality.py fails here instead of vanishing.
        Columns left out are NULL (not measured); counts default to 0. In the same
        transaction the peer's ``participants.quality_score`` (= overall_score) and
        ``uptime`` follow the snapshot when the peer is known and the figure was measured,
        so `fedctl participants list` shows the latest without a join.
        """
        values = _metrics("participant quality", metrics, PARTICIPANT_QUALITY_COLUMNS)
        row = {
            "peer_id": _text("peer_id", peer_id),
            "session_id": _text("session_id", session_id, optional=True),
            "ts": _real("ts", ts, optional=False),
            **values,
        }
        peer_fields = {
            col: values[key]
            for col, key in (("quality_score", "overall_score"), ("uptime", "uptime"))
            if values.get(key) is not None
        }
        with self.transaction():
            row_id = self._insert("participant_quality_metrics", row)
            if peer_fields:
                sets = ", ".join(f"{col} = ?" for col in peer_fields)
                self.db.execute(
                    f"UPDATE participants SET {sets} WHERE peer_id = ?",
                    (*peer_fields.values(), peer_id),
                )
            return self._row("participant_quality_metrics", row_id)

    def record_participant_quality_many(
        self, rows: Iterable[tuple[str, str | None, float, dict[str, Any]]]
    ) -> int:
        """``record_participant_quality`` of many (peer, session, ts, metrics), in ONE
        transaction (after a round: one row per selected peer). Returns the count."""
        n = 0
        with self.transaction():
            for peer_id, session_id, ts, metrics in rows:
                self.record_participant_quality(peer_id, session_id, ts, metrics)
                n += 1
        return n

    def participant_quality(
        self, peer_id: str | None = None, session_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Snapshots, newest first, optionally of one peer and/or one session."""
        where, params = self._where(peer_id=peer_id, session_id=session_id)
        rows = self.db.query(
            f"SELECT * FROM participant_quality_metrics{where} ORDER BY ts DESC, id DESC LIMIT ?",
            (*params, _int("limit", limit, optional=False, minimum=1)),
        )
        return [dict(r) for r in rows]

    def latest_participant_quality(
        self, session_id: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each peer's newest snapshot (in ``session_id`` when given), keyed by peer ID."""
        where, params = self._where(session_id=session_id)
        rows = self.db.query(
            f"""SELECT * FROM (
                    SELECT *, ROW_NUMBER() OVER (
                        PARTITION BY peer_id ORDER BY ts DESC, id DESC) AS _rank
                    FROM participant_quality_metrics{where})
                WHERE _rank = 1 ORDER BY peer_id""",
            params,
        )
        out: dict[str, dict[str, Any]] = {}
        for r in rows:
            r = dict(r)
            del r["_rank"]
            out[r["peer_id"]] = r
        return out

    @staticmethod
    def _where(**filters: Any) -> tuple[str, tuple[Any, ...]]:
        """`` WHERE a = ? AND ...`` for the filters that are not None (names are ours)."""
        given = {k: v for k, v in filters.items() if v is not None}
        if not given:
            return "", ()
        return " WHERE " + " AND ".join(f"{k} = ?" for k in given), tuple(given.values())

    def record_session_quality(
        self, session_id: str, round: int, ts: float, metrics: dict[str, Any]
    ) -> dict[str, Any]:
        """The session's health and its parts after ``round``; returns the stored row.

        One row per (session, round): recording the same round again (say, after the final
        evaluation) replaces its figures rather than leaving two answers for one round.
        Keys are SESSION_QUALITY_COLUMNS; unknown ones are a ValueError; an unknown
        session is NotFound.
        """
        values = _metrics("session quality", metrics, SESSION_QUALITY_COLUMNS)
        row = {
            "session_id": session_id,
            "round": _int("round", round, optional=False, minimum=0),
            "ts": _real("ts", ts, optional=False),
            **{col: values.get(col) for col in SESSION_QUALITY_COLUMNS},
        }
        with self.transaction():
            self._require_session(session_id)
            cols = ", ".join(row)
            marks = ", ".join("?" * len(row))
            updates = ", ".join(
                f"{c} = excluded.{c}" for c in row if c not in ("session_id", "round")
            )
            self.db.execute(
                f"INSERT INTO session_quality_metrics ({cols}) VALUES ({marks}) "
                f"ON CONFLICT (session_id, round) DO UPDATE SET {updates}",
                tuple(row.values()),
            )
            stored = self._one(
                "SELECT * FROM session_quality_metrics WHERE session_id = ? AND round = ?",
                (session_id, row["round"]),
            )
        assert stored is not None
        return stored

    def session_quality(self, session_id: str) -> list[dict[str, Any]]:
        """The session's quality rows by round."""
        rows = self.db.query(
            "SELECT * FROM session_quality_metrics WHERE session_id = ? ORDER BY round",
            (session_id,),
        )
        return [dict(r) for r in rows]

    def record_network(
        self,
        peer_id: str,
        session_id: str | None,
        ts: float,
        direction: str,
        rtt_ms: float | None = None,
        bytes: int | None = None,
        transfer_s: float | None = None,
    ) -> dict[str, Any]:
        """One network measurement: a ping (``rtt_ms``) or a transfer (``bytes`` in
        ``transfer_s`` seconds, ``down`` = to the peer, ``up`` = from it).

        ``bandwidth_mbps`` (megabits per second) is computed here, from the same figures
        every time, when both bytes and a positive transfer time are given; else NULL.
        """
        row = _network_row(peer_id, session_id, ts, direction, rtt_ms, bytes, transfer_s)
        with self.transaction():
            row_id = self._insert("network_quality_metrics", row)
            return self._row("network_quality_metrics", row_id)

    def record_network_many(self, measurements: Iterable[Mapping[str, Any]]) -> int:
        """Many measurements (each with ``record_network``'s arguments by name) in ONE
        transaction: the quality monitor keeps pings and transfers in memory and writes
        them once per round. All are checked before any is written. Returns how many."""
        rows = [_network_row(**m) for m in measurements]
        with self.transaction():
            for row in rows:
                self._insert("network_quality_metrics", row)
        return len(rows)

    def network_metrics(
        self, peer_id: str, since: float = 0.0, direction: str | None = None
    ) -> list[dict[str, Any]]:
        """A peer's measurements with ``ts >= since``, oldest first (a time series)."""
        if direction is not None:
            _choice("direction", direction, NETWORK_DIRECTIONS)
        sql = "SELECT * FROM network_quality_metrics WHERE peer_id = ? AND ts >= ?"
        params: tuple[Any, ...] = (peer_id, _real("since", since, optional=False))
        if direction is not None:
            sql += " AND direction = ?"
            params += (direction,)
        return [dict(r) for r in self.db.query(sql + " ORDER BY ts, id", params)]

    # --- alerts -------------------------------------------------------------------------

    def _alert_event(self, kind: str, alert: dict[str, Any], now: float) -> None:
        """The hash-chained trace of an alert state change (caller holds the transaction)."""
        self.append_event(
            kind,
            session_id=alert["session_id"],
            entity_id=alert["entity_id"],
            data=alert,
            ts=now,
        )

    def sync_alerts(
        self, entities: Iterable[str], conditions: Iterable[Any], now: float
    ) -> dict[str, list[dict[str, Any]]]:
        """Make the rule alerts match the conditions just evaluated; ONE transaction.

        ``entities`` are the peers/sessions that were evaluated; ``conditions`` the alert
        conditions that hold now (dicts with AlertCondition's keys). A condition whose
        (alert_type, entity_id) already has an open or acknowledged rule alert updates that
        alert's message/value/threshold/updated_at (so an acknowledged alert stays
        acknowledged and is not raised again); otherwise a new 'open' rule alert is raised.
        Every active rule alert of an evaluated entity without a matching condition is
        resolved; entities not evaluated keep theirs, and event alerts are never touched.
        Each raise and resolve appends an "alert_raised"/"alert_resolved" event (data = the
        alert row) in the same transaction, so the chain and the alert table cannot
        disagree. All conditions are checked before anything is written. Returns the
        raised and the resolved rows (as stored when the call ends).
        """
        if isinstance(entities, str):
            raise ValueError("entities must be an iterable of IDs, not one string")
        evaluated = {_text("entity_id", e) for e in entities}
        checked = [_condition(c) for c in conditions]
        t = _real("now", now, optional=False)
        raised: list[int] = []
        resolved: list[int] = []
        with self.transaction():
            active: dict[tuple[str, str], dict[str, Any]] = {}
            for a in self.db.query(
                "SELECT * FROM quality_alerts WHERE source = 'rule' "
                "AND status IN ('open', 'acknowledged') ORDER BY id"
            ):
                active[(a["alert_type"], a["entity_id"])] = a
            seen: set[tuple[str, str]] = set()
            for c in checked:
                key = (c["alert_type"], c["entity_id"])
                seen.add(key)
                current = active.get(key)
                if current is not None:
                    self.db.execute(
                        "UPDATE quality_alerts SET message = ?, value = ?, threshold = ?, "
                        "updated_at = ? WHERE id = ?",
                        (c["message"], c["value"], c["threshold"], t, current["id"]),
                    )
                    continue
                alert_id = self._insert(
                    "quality_alerts",
                    {**c, "source": "rule", "status": "open", "created_at": t, "updated_at": t},
                )
                alert = self._row("quality_alerts", alert_id)
                active[key] = alert
                raised.append(alert_id)
                self._alert_event("alert_raised", alert, t)
            for key, a in active.items():
                if key in seen or a["entity_id"] not in evaluated:
                    continue
                self.db.execute(
                    "UPDATE quality_alerts SET status = 'resolved', resolved_at = ?, "
                    "updated_at = ? WHERE id = ?",
                    (t, t, a["id"]),
                )
                resolved.append(a["id"])
                self._alert_event("alert_resolved", self._row("quality_alerts", a["id"]), t)
            return {
                "raised": [self._row("quality_alerts", i) for i in raised],
                "resolved": [self._row("quality_alerts", i) for i in resolved],
            }

    def raise_event_alert(
        self,
        alert_type: str,
        severity: str,
        entity_id: str,
        session_id: str | None,
        message: str,
        now: float,
    ) -> dict[str, Any]:
        """An alert for something that happened (a security violation), not a condition.

        It never resolves by itself; an operator acknowledges it. While one is still
        'open' for the same (alert_type, entity_id, session_id), a repeat updates it
        (message, updated_at, and ``value`` = the number of occurrences) instead of
        flooding the list; once acknowledged, a new occurrence opens a new alert, so
        nothing that happens after the operator looked is hidden. A new alert appends an
        "alert_raised" event in the same transaction (repeats are already in the chain
        as the caller's own security events).
        """
        row = {
            "alert_type": _choice("alert_type", alert_type, EVENT_ALERT_TYPES),
            "severity": _choice("severity", severity, SEVERITIES),
            "entity_id": _text("entity_id", entity_id),
            "session_id": _text("session_id", session_id, optional=True),
            "message": _text("message", message),
        }
        t = _real("now", now, optional=False)
        with self.transaction():
            current = self._one(
                "SELECT * FROM quality_alerts WHERE source = 'event' AND status = 'open' "
                "AND alert_type = ? AND entity_id = ? AND session_id IS ? "
                "ORDER BY id DESC LIMIT 1",
                (alert_type, entity_id, session_id),
            )
            if current is not None:
                self.db.execute(
                    "UPDATE quality_alerts SET message = ?, severity = ?, "
                    "value = COALESCE(value, 0) + 1, updated_at = ? WHERE id = ?",
                    (message, severity, t, current["id"]),
                )
                return self._row("quality_alerts", current["id"])
            alert_id = self._insert(
                "quality_alerts",
                {
                    **row,
                    "value": 1.0,
                    "threshold": None,
                    "source": "event",
                    "status": "open",
                    "created_at": t,
                    "updated_at": t,
                },
            )
            alert = self._row("quality_alerts", alert_id)
            self._alert_event("alert_raised", alert, t)
            return alert

    def resolve_event_alerts(
        self, alert_type: str, entity_id: str, message: str, now: float
    ) -> list[dict[str, Any]]:
        """Resolve the active event alerts of this type and entity (their cause is over:
        storage is back), each with an "alert_resolved" event, in ONE transaction."""
        _choice("alert_type", alert_type, EVENT_ALERT_TYPES)
        t = _real("now", now, optional=False)
        out = []
        with self.transaction():
            rows = list(
                self.db.query(
                    "SELECT id FROM quality_alerts WHERE source = 'event' AND alert_type = ? "
                    "AND entity_id = ? AND status IN ('open', 'acknowledged') ORDER BY id",
                    (alert_type, entity_id),
                )
            )
            for r in rows:
                self.db.execute(
                    "UPDATE quality_alerts SET status = 'resolved', resolved_at = ?, "
                    "updated_at = ?, message = ? WHERE id = ?",
                    (t, t, _text("message", message), r["id"]),
                )
                alert = self._row("quality_alerts", r["id"])
                self._alert_event("alert_resolved", alert, t)
                out.append(alert)
        return out

    def ack_alert(self, alert_id: int, by: str, now: float) -> dict[str, Any]:
        """An operator has seen the alert: it leaves 'open' but stays active.

        NotFound for an id this ledger never issued; StateError (code ALERT_RESOLVED) for
        a resolved one (there is nothing left to acknowledge). Acknowledging twice returns
        the alert unchanged (first acknowledger and time kept, no second event). The
        state change and its "alert_acked" event commit together.
        """
        alert_id = _int("alert_id", alert_id, optional=False)
        by = _text("by", by)
        t = _real("now", now, optional=False)
        with self.transaction():
            alert = self._one("SELECT * FROM quality_alerts WHERE id = ?", (alert_id,))
            if alert is None:
                raise NotFound(
                    f"alert {alert_id} is not in ledger {self.path}",
                    hint="list the alerts first (`fedctl alerts list`)",
                )
            if alert["status"] == "resolved":
                raise StateError(
                    f"alert {alert_id} was already resolved at {alert['resolved_at']}",
                    code="ALERT_RESOLVED",
                    hint="only open alerts can be acknowledged; see `fedctl alerts list`",
                )
            if alert["status"] == "acknowledged":
                return alert
            self.db.execute(
                "UPDATE quality_alerts SET status = 'acknowledged', acknowledged_at = ?, "
                "acknowledged_by = ?, updated_at = ? WHERE id = ?",
                (t, by, t, alert_id),
            )
            alert = self._row("quality_alerts", alert_id)
            self._alert_event("alert_acked", alert, t)
            return alert

    def alerts(
        self,
        status: str | None = "active",
        severity: Iterable[str] | str | None = None,
        entity_id: str | None = None,
        session_id: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Alerts, newest first. ``status``: "active" (open + acknowledged, the default),
        "open", "acknowledged", "resolved", or "all"/None; ``severity``: a set of levels
        (one string is taken as one level)."""
        clauses: list[str] = []
        params: list[Any] = []
        if status is None:
            status = "all"
        _choice("status", status, ALERT_FILTERS)
        if status == "active":
            clauses.append("status IN ('open', 'acknowledged')")
        elif status != "all":
            clauses.append("status = ?")
            params.append(status)
        if severity is not None:
            levels = {severity} if isinstance(severity, str) else set(severity)
            for level in levels:
                _choice("severity", level, SEVERITIES)
            if not levels:
                return []
            clauses.append(f"severity IN ({', '.join('?' * len(levels))})")
            params.extend(sorted(levels))
        for col, value in (("entity_id", entity_id), ("session_id", session_id)):
            if value is not None:
                clauses.append(f"{col} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(_int("limit", limit, optional=False, minimum=1))
        rows = self.db.query(
            f"SELECT * FROM quality_alerts{where} ORDER BY created_at DESC, id DESC LIMIT ?",
            params,
        )
        return [dict(r) for r in rows]

    def open_alert_entities(self, severity: str = "critical") -> set[str]:
        """Entity IDs with an open or acknowledged alert of ``severity`` (for selection:
        a peer with a critical alert can be skipped)."""
        _choice("severity", severity, SEVERITIES)
        rows = self.db.query(
            "SELECT DISTINCT entity_id FROM quality_alerts "
            "WHERE status IN ('open', 'acknowledged') AND severity = ?",
            (severity,),
        )
        return {r["entity_id"] for r in rows}

    # --- tasks (participant side) -------------------------------------------------------

    def record_task_start(
        self,
        session_id: str,
        round: int,
        *,
        coordinator: str,
        model_cid: str | None,
        deadline_s: float | None,
        secure: bool,
        asked_at: float,
    ) -> int:
        """A participant took a training task; returns its id for ``finish_task``.

        The participant's ledger has no row for the coordinator's session, so the session
        is not checked here.
        """
        row = {
            "session_id": _text("session_id", session_id),
            "round": _int("round", round, optional=False, minimum=0),
            "coordinator": _text("coordinator", coordinator),
            "model_cid": _text("model_cid", model_cid, optional=True),
            "deadline_s": _real("deadline_s", deadline_s, minimum=0.0),
            "secure": int(bool(secure)),
            "asked_at": _real("asked_at", asked_at, optional=False),
            "status": "running",
        }
        with self.transaction():
            return self._insert("participant_tasks", row)

    def finish_task(
        self,
        task_id: int,
        *,
        status: str,
        finished_at: float,
        train_s: float | None = None,
        total_s: float | None = None,
        samples: int | None = None,
        loss: float | None = None,
        bytes_up: int | None = None,
        bytes_down: int | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Close a running task as 'done' or 'failed'; NotFound for an unknown id and
        StateError for one already finished (a task ends once). A NaN loss is refused:
        pass ``loss=None`` and say why in ``error``."""
        fields = {
            "status": _choice("status", status, FINISHED_TASK_STATUSES),
            "finished_at": _real("finished_at", finished_at, optional=False),
            "train_s": _real("train_s", train_s, minimum=0.0),
            "total_s": _real("total_s", total_s, minimum=0.0),
            "samples": _int("samples", samples, minimum=0),
            "loss": _real("loss", loss),
            "bytes_up": _int("bytes_up", bytes_up, minimum=0),
            "bytes_down": _int("bytes_down", bytes_down, minimum=0),
            "error": _text("error", error, optional=True),
        }
        task_id = _int("task_id", task_id, optional=False)
        with self.transaction():
            task = self._one("SELECT * FROM participant_tasks WHERE id = ?", (task_id,))
            if task is None:
                raise NotFound(f"task {task_id} is not in ledger {self.path}")
            if task["status"] != "running":
                raise StateError(f"task {task_id} is already {task['status']}")
            sets = ", ".join(f"{k} = ?" for k in fields)
            self.db.execute(
                f"UPDATE participant_tasks SET {sets} WHERE id = ?", (*fields.values(), task_id)
            )
            return _task_row(self._row("participant_tasks", task_id))

    def record_privacy_spending(
        self,
        dataset: str,
        session_id: str,
        round: int,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        accountant: str,
        delta: float,
        epsilon: float,
        spent_epsilon: float,
        now: float,
    ) -> dict[str, Any]:
        """A participant trained one round with local DP-SGD on ``dataset`` (its source
        string): the accountant's history entry, and the ε after it in the session
        (``epsilon``) and over all training on the data (``spent_epsilon``)."""
        row = {
            "dataset": _text("dataset", dataset),
            "session_id": _text("session_id", session_id),
            "round": _int("round", round, optional=False, minimum=0),
            "noise_multiplier": _real("noise_multiplier", noise_multiplier, optional=False),
            "sample_rate": _real("sample_rate", sample_rate, optional=False, minimum=0.0),
            "steps": _int("steps", steps, optional=False, minimum=0),
            "accountant": _text("accountant", accountant),
            "delta": _real("delta", delta, optional=False, minimum=0.0),
            "epsilon": _real("epsilon", epsilon, optional=False, minimum=0.0),
            "spent_epsilon": _real("spent_epsilon", spent_epsilon, optional=False, minimum=0.0),
            "recorded_at": _real("now", now, optional=False),
        }
        with self.transaction():
            return self._row("privacy_spending", self._insert("privacy_spending", row))

    # --- error feedback (participant side; fednode.codecs.feedback) ---------------------

    def save_residual(self, session_id: str, round: int, codec: str, data: bytes) -> None:
        """What a lossy codec left unsent after ``round`` (safetensors bytes), replacing the
        session's previous residual in one statement: a crash leaves the old or the new."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO residuals (session_id, round, codec, data, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET round = "
                "excluded.round, codec = excluded.codec, data = excluded.data, "
                "updated_at = excluded.updated_at",
                (
                    _text("session_id", session_id),
                    _int("round", round, optional=False, minimum=0),
                    _text("codec", codec),
                    bytes(data),
                    time.time(),
                ),
            )

    def residual(self, session_id: str) -> dict[str, Any] | None:
        """The session's saved residual (round, codec, data), or None."""
        return self._one(
            "SELECT round, codec, data FROM residuals WHERE session_id = ?",
            (_text("session_id", session_id),),
        )

    def privacy_spending(self, dataset: str) -> list[dict[str, Any]]:
        """Every round this participant trained privately on ``dataset``, oldest first."""
        rows = self.db.query(
            "SELECT * FROM privacy_spending WHERE dataset = ? ORDER BY id", (dataset,)
        )
        return [dict(r) for r in rows]

    def tasks(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """The tasks this participant took, oldest first, optionally of one session."""
        where, params = self._where(session_id=session_id)
        rows = self.db.query(f"SELECT * FROM participant_tasks{where} ORDER BY id", params)
        return [_task_row(r) for r in rows]

    # --- summary ------------------------------------------------------------------------

    def summary(self, session_id: str, *, now: float | None = None) -> dict[str, Any]:
        """The session summary (docs/cli.md, `session status`) from rows (no ``ok`` key).

        ``duration_s`` runs to ``ended_at``, or to ``now`` while the session is live, and is
        0 for a session never started; bytes and ``dropped`` are sums over its rounds;
        ``participants`` counts distinct peers with at least one accepted update.
        """
        session = self.get_session(session_id)
        totals = self.db.execute(
            "SELECT COALESCE(SUM(dropped), 0), COALESCE(SUM(bytes_up), 0), "
            "COALESCE(SUM(bytes_down), 0) FROM training_rounds WHERE session_id = ?",
            (session_id,),
        ).fetchone()
        distinct = self.db.execute(
            "SELECT COUNT(DISTINCT participant) FROM client_updates "
            "WHERE session_id = ? AND status = 'accepted'",
            (session_id,),
        ).fetchone()[0]
        started = session["started_at"]
        if started is None:
            duration = 0.0
        else:
            end = session["ended_at"]
            if end is None:
                end = time.time() if now is None else now
            duration = max(0.0, end - started)
        undone = {
            m["round"] for m in self.models(session_id) if m.get("rolled_back_at") is not None
        }
        history = [
            {
                "round": r["round"],
                "accuracy": accuracy_of(r["accuracy"], r.get("metrics")),
                "loss": r["loss"],
                "metrics": r.get("metrics") or {},
                "participant_metrics": r.get("participant_metrics") or {},
                "duration_s": r["duration_s"],
                "participants": r["participants"],
                "rolled_back": r["round"] in undone,  # its model was later rolled back
            }
            for r in self.rounds(session_id)
            if r["status"] == "completed"
        ]
        traffic = self.traffic(session_id)
        by_round: dict[int, list[dict[str, Any]]] = {}
        by_peer: dict[str, list[dict[str, Any]]] = {}
        for t in traffic:
            by_round.setdefault(t["round"], []).append(t)
            by_peer.setdefault(t["participant"], []).append(t)
        for h in history:  # what that round's accepted updates weighed, raw and on the wire
            h.update(_traffic_totals(by_round.get(h["round"], [])))
        final_metrics = session.get("final_metrics")
        return {
            "session_id": session_id,
            "status": session["status"],
            "rounds_completed": session["rounds_completed"],
            "participants": int(distinct),
            "strategy": session["strategy"],
            "secure_aggregation": session["secure_aggregation"],
            "dropped": int(totals[0]),
            "final_accuracy": accuracy_of(session["final_accuracy"], final_metrics),
            "final_loss": session["final_loss"],
            "final_metrics": final_metrics or {},  # by name: accuracy, roc_auc, mae, r2
            # who measured the figures: the coordinator, the participants (their example-
            # weighted mean of the model each round started from) or both (the coordinator's)
            "evaluation": session["spec"].get("evaluation", {}).get("on", "coordinator"),
            "model_cid": session["model_cid"],
            "restarts": session.get("restarts", 0),  # coordinator restarts while it ran
            "duration_s": duration,
            "bytes_up": int(totals[1]),
            "bytes_down": int(totals[2]),
            # compression (docs/compression.md): the codec, and the accepted updates' bytes
            # raw (float32) and on the wire, up and down, with their ratios
            "compression": {
                "codec": (session["spec"].get("compression") or {}).get("codec", "identity"),
                "downlink": (session["spec"].get("compression") or {}).get("downlink", "full"),
                **_traffic_totals(traffic),
            },
            "traffic": traffic,  # per accepted update: round, participant and its bytes
            "traffic_by_participant": [
                {"participant": p, "updates": len(ts), **_traffic_totals(ts)}
                for p, ts in sorted(by_peer.items())
            ],
            "ledger": str(self.path),
            "history": history,
        }

    def traffic(self, session_id: str) -> list[dict[str, Any]]:
        """Each accepted update's sizes (_m012_compression), by round then participant;
        rows from before that migration are left out."""
        return [
            dict(r)
            for r in self.db.query(
                "SELECT round, participant, bytes, bytes_raw, down_bytes, down_raw "
                "FROM client_updates WHERE session_id = ? AND status = 'accepted' AND "
                "bytes_raw IS NOT NULL ORDER BY round, participant, id",
                (session_id,),
            )
        ]

    # --- figures for the Prometheus endpoint (fednode.metrics) ----------------------------

    def observation_figures(self, session_id: str) -> dict[str, Any]:
        """What the quality monitor judges a session by after each round, summed in SQL: a
        few queries whose Python memory does not grow with the session's history (reading
        every update row of the session each round did: docs/scale.md, "Soak").
        ``accuracies`` of the live lineage (one float a round),
        ``rounds_run`` (finished), ``completed``, ``last_completed`` (round, or None),
        ``first_selected``, ``bytes_moved`` (finished rounds' bytes up and down),
        ``participants_completed`` (summed over completed rounds), ``updates_accepted``,
        ``updates_rejected``, ``noisy_rounds`` (finished rounds with a central-DP release)
        and ``security_violations`` (alerts of that type, any status)."""
        one = self._one
        accs = [
            r[0]
            for r in self.db.execute(
                "SELECT accuracy FROM model_versions WHERE session_id = ? AND accuracy IS NOT "
                "NULL AND rolled_back_at IS NULL ORDER BY round",
                (session_id,),
            )
        ]
        rounds = one(
            "SELECT COALESCE(SUM(status != 'running'), 0) AS run, "
            "COALESCE(SUM(status = 'completed'), 0) AS completed, "
            "MAX(CASE WHEN status = 'completed' THEN round END) AS last, "
            "COALESCE(SUM(CASE WHEN status != 'running' THEN bytes_up + bytes_down END), 0) "
            "AS moved, COALESCE(SUM(CASE WHEN status = 'completed' THEN participants END), 0) "
            "AS participants FROM training_rounds WHERE session_id = ?",
            (session_id,),
        )
        first = one(
            "SELECT selected FROM training_rounds WHERE session_id = ? ORDER BY round LIMIT 1",
            (session_id,),
        )
        counts = dict(
            self.db.execute(
                "SELECT status, COUNT(*) FROM client_updates WHERE session_id = ? GROUP BY status",
                (session_id,),
            ).fetchall()
        )
        noisy = one(
            "SELECT COUNT(*) AS n FROM training_rounds WHERE session_id = ? AND status != "
            "'running' AND round IN (SELECT round FROM central_dp_rounds WHERE session_id = ?)",
            (session_id, session_id),
        )
        violations = one(
            "SELECT COUNT(*) AS n FROM quality_alerts WHERE session_id = ? AND "
            "alert_type = 'security_violation'",
            (session_id,),
        )
        assert rounds is not None and noisy is not None and violations is not None
        return {
            "accuracies": accs,
            "rounds_run": rounds["run"],
            "completed": rounds["completed"],
            "last_completed": rounds["last"],
            "first_selected": json.loads(first["selected"]) if first and first["selected"] else [],
            "bytes_moved": rounds["moved"],
            "participants_completed": rounds["participants"],
            "updates_accepted": counts.get("accepted", 0),
            "updates_rejected": counts.get("rejected", 0),
            "noisy_rounds": noisy["n"],
            "security_violations": violations["n"],
        }

    def completed_rounds_after(self, session_id: str, after: int) -> list[int]:
        """The numbers of the session's completed rounds above ``after``, in order."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT round FROM training_rounds WHERE session_id = ? AND status = "
                "'completed' AND round > ? ORDER BY round",
                (session_id, after),
            )
        ]

    def accepted_in_round(self, session_id: str, round: int) -> list[tuple[str, float | None]]:
        """One round's accepted updates: (participant, its reported dp_epsilon), by arrival."""
        return [
            (r[0], r[1])
            for r in self.db.execute(
                "SELECT participant, dp_epsilon FROM client_updates WHERE session_id = ? AND "
                "round = ? AND status = 'accepted' ORDER BY id",
                (session_id, round),
            )
        ]

    def session_figures(self, session_id: str | None = None) -> dict[str, dict[str, Any]]:
        """What fednode.metrics exports of each session (or of one), by session ID: its
        ``status`` and planned ``rounds``, ``current_round`` (the highest round started, 0
        = none), ``rounds_by_status``, the bytes of its rounds on the wire (``bytes_up``,
        ``bytes_down``: what `session status` sums), its accepted updates' bytes on the wire
        and raw (``update_bytes``: up/down, the compression figures of `session status`),
        ``excluded_updates`` (left out of the aggregate by outlier detection) and the last
        completed round's ``loss`` and ``metrics``. Sums in SQL, a few queries whatever the
        size: the coordinator calls this once per round, never per scrape."""
        where, params = ("WHERE session_id = ?", (session_id,)) if session_id else ("", ())
        out: dict[str, dict[str, Any]] = {}
        for r in self.db.execute(
            f"SELECT session_id, status, rounds FROM sessions {where}", params
        ):
            out[r[0]] = {
                "status": r[1],
                "rounds": r[2],
                "current_round": 0,
                "rounds_by_status": {},
                "bytes_up": 0,
                "bytes_down": 0,
                "update_bytes": {"up": (0, 0), "down": (0, 0)},  # (wire, raw)
                "excluded_updates": 0,
                "loss": None,
                "metrics": {},
            }
        for sid, status, n, last, up, down in self.db.execute(
            "SELECT session_id, status, COUNT(*), MAX(round), COALESCE(SUM(bytes_up), 0), "
            f"COALESCE(SUM(bytes_down), 0) FROM training_rounds {where} "
            "GROUP BY session_id, status",
            params,
        ):
            if sid in out:
                f = out[sid]
                f["rounds_by_status"][status] = n
                f["current_round"] = max(f["current_round"], last)
                f["bytes_up"] += up
                f["bytes_down"] += down
        # the same rows as traffic() (accepted, sized), summed as _traffic_totals does
        sized = "status = 'accepted' AND bytes_raw IS NOT NULL"
        for sid, up, up_raw, down, down_raw, excluded in self.db.execute(
            f"SELECT session_id, SUM(CASE WHEN {sized} THEN bytes ELSE 0 END), "
            f"SUM(CASE WHEN {sized} THEN bytes_raw ELSE 0 END), "
            f"SUM(CASE WHEN {sized} THEN COALESCE(down_bytes, 0) ELSE 0 END), "
            f"SUM(CASE WHEN {sized} AND down_bytes > 0 THEN COALESCE(down_raw, 0) ELSE 0 END), "
            f"SUM(CASE WHEN excluded = 1 THEN 1 ELSE 0 END) FROM client_updates {where} "
            "GROUP BY session_id",
            params,
        ):
            if sid in out:
                out[sid]["update_bytes"] = {
                    "up": (up or 0, up_raw or 0),
                    "down": (down or 0, down_raw or 0),
                }
                out[sid]["excluded_updates"] = excluded or 0
        for sid, loss, metrics in self.db.execute(
            "SELECT t.session_id, t.loss, t.metrics FROM training_rounds t JOIN "
            "(SELECT session_id, MAX(round) AS last FROM training_rounds "
            f"WHERE status = 'completed'{' AND session_id = ?' if session_id else ''} "
            "GROUP BY session_id) m ON t.session_id = m.session_id AND t.round = m.last",
            params,
        ):
            if sid in out:
                out[sid]["loss"] = loss
                out[sid]["metrics"] = json.loads(metrics) if metrics else {}
        return out

    def active_alerts(self) -> list[dict[str, Any]]:
        """Every open or acknowledged alert, briefly (id, type, severity, status, entity,
        session), with no limit: fednode.metrics counts them by severity once at start and
        once per round (``alerts`` returns pages of full rows)."""
        rows = self.db.query(
            "SELECT id, alert_type, severity, status, entity_id, session_id FROM "
            "quality_alerts WHERE status IN ('open', 'acknowledged')"
        )
        return [dict(r) for r in rows]


# The columns ``Ledger.update_values`` fills: ``record_updates`` takes no other names.
UPDATE_COLUMNS = frozenset(
    Ledger.update_values(
        "",
        0,
        participant="",
        samples=0,
        loss=None,
        bytes=0,
        duration_s=None,
        arrival_s=None,
        update_cid=None,
        received_at=0.0,
    )
)
