"""The node's SQLite ledger: sessions, rounds, updates, peers, models and a hash-chained log.

Every node keeps one file (``<data-dir>/ledger.db``). Together with the content store it is
enough to resume after a crash and to explain afterwards what happened in a session, so:

* writes that belong together run in one transaction (``Database.atomic()``), never half;
* the ``events`` table is append-only and hash-chained, so an edited, deleted or reordered
  row is detectable offline (``fedctl ledger verify``);
* the schema is versioned by ordered migrations, so an old file opens with new code and a
  file from newer code is refused instead of being silently misread.

Transactions use sqlite-utils' ``atomic()`` rather than ``with conn:``: sqlite-utils 4 wraps
its own writes in ``atomic()``, which nests as a savepoint inside ours, whereas an inner
``atomic()`` under a bare ``with conn:`` would commit the outer work early.

The ledger is used from one asyncio thread; every call is short and synchronous.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlite_utils import Database

from protocol.errors import NotFound, StateError

GENESIS_HASH = "0" * 64

SESSION_STATUSES = frozenset({"created", "running", "paused", "completed", "failed", "stopped"})
ROUND_STATUSES = frozenset({"running", "completed", "failed", "aborted"})
FINISHED_ROUND_STATUSES = ROUND_STATUSES - {"running"}
UPDATE_STATUSES = frozenset({"accepted", "rejected"})

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


MIGRATIONS: list[Callable[[Database], None]] = [_m001_initial, _m002_admission]
"""Ordered; migration ``i`` (0-based) brings the schema to version ``i + 1``."""


# --- row decoding -----------------------------------------------------------------------


def _session_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["spec"] = json.loads(row["spec"]) if row.get("spec") else {}
    row["secure_aggregation"] = bool(row["secure_aggregation"])
    return row


def _round_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["selected"] = json.loads(row["selected"]) if row.get("selected") else []
    return row


def _participant_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["online"] = bool(row["online"])
    return row


def _event_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["data"] = json.loads(row["data"])
    return row


class Ledger:
    """One node's ledger file. Open it once per process; close it (or use ``with``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = Database(self.path, execute_plugins=False)
        try:
            # busy_timeout first: a second process (fedctl ledger verify) may hold a lock.
            self.db.execute("PRAGMA busy_timeout=5000")
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
        """Open a round; starting the same round twice is a StateError (resume, don't redo)."""
        with self.transaction():
            self._require_session(session_id)
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
    ) -> dict[str, Any]:
        """The body of finish/complete; the caller holds the transaction."""
        if status not in FINISHED_ROUND_STATUSES:
            raise ValueError(f"round status {status!r} not in {sorted(FINISHED_ROUND_STATUSES)}")
        row = self._require_round(session_id, round)
        if row["status"] != "running":
            raise StateError(f"round {round} of session {session_id!r} is already {row['status']}")
        self.db.execute(
            """UPDATE training_rounds SET status = ?, ended_at = ?, duration_s = ?,
                   model_cid = ?, accuracy = ?, loss = ?, participants = ?, dropped = ?,
                   bytes_up = ?, bytes_down = ?, reason = ?
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
                session_id,
                int(round),
            ),
        )
        if status == "completed":
            self._refresh_session_progress(session_id, model_cid, accuracy, loss)
        return row

    def _refresh_session_progress(
        self,
        session_id: str,
        model_cid: str | None,
        accuracy: float | None,
        loss: float | None,
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
            fields.update(model_cid=model_cid, final_accuracy=accuracy, final_loss=loss)
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
    ) -> dict[str, Any]:
        """Finish a round that produced a new global model, in ONE transaction.

        Marks the round ``completed`` (with timings, counts, bytes and metrics), inserts its
        ``model_versions`` row (``parent_cid`` defaults to the round's ``model_cid_in``,
        ``created_at`` = ``ended_at``) and sets the session's ``rounds_completed``,
        ``model_cid``, ``final_accuracy`` and ``final_loss``. If any part fails (say the
        model row already exists) nothing is written, so after a crash the ledger never
        shows a completed round without its model. Returns the round as ``rounds()`` does.
        Raises NotFound for a round never started, StateError for one already finished.
        """
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
            )
            self._insert_model(
                session_id,
                round,
                cid=model_cid,
                parent_cid=parent_cid if parent_cid is not None else row["model_cid_in"],
                accuracy=accuracy,
                loss=loss,
                size=size,
                created_at=ended_at,
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

    def record_update(
        self,
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
    ) -> dict[str, Any]:
        """Record one received update and, if the peer is known, bump its counters.

        The peer's ``rounds_completed`` (accepted) or ``updates_rejected`` (rejected) move in
        the same transaction, so callers must not also increment them by hand.
        """
        if status not in UPDATE_STATUSES:
            raise ValueError(f"update status {status!r} not in {sorted(UPDATE_STATUSES)}")
        with self.transaction():
            self._require_session(session_id)
            table = self.db["client_updates"]
            table.insert(
                {
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
                }
            )
            update_id = table.last_pk
            counter = "rounds_completed" if status == "accepted" else "updates_rejected"
            self.db.execute(
                f"UPDATE participants SET {counter} = {counter} + 1 WHERE peer_id = ?",
                (participant,),
            )
        return dict(self.db["client_updates"].get(update_id))

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
        return [dict(r) for r in rows]

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
        if "online" in fields:
            fields["online"] = int(bool(fields["online"]))
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
    ) -> dict[str, Any]:
        """A model version outside a round's completion (e.g. the initial model, round 0)."""
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
            )
        return dict(self.db["model_versions"].get((session_id, int(round))))

    def models(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.db.query(
            "SELECT * FROM model_versions WHERE session_id = ? ORDER BY round", (session_id,)
        )
        return [dict(r) for r in rows]

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

    def verify_chain(self) -> tuple[bool, int | None]:
        """Recompute every hash and link; returns (ok, id of the first bad event).

        An edited row fails its own hash; a deleted or moved row breaks the next row's
        ``prev_hash`` link. Truncating the tail is not detectable from the chain alone.
        """
        prev = GENESIS_HASH
        for row in self.db.query("SELECT * FROM events ORDER BY id"):
            try:
                data = json.loads(row["data"])
            except (TypeError, ValueError):
                return False, row["id"]
            expected = event_hash(
                prev,
                row["id"],
                row["ts"],
                row["kind"],
                row["session_id"],
                row["entity_id"],
                data,
            )
            if row["prev_hash"] != prev or row["hash"] != expected:
                return False, row["id"]
            prev = row["hash"]
        return True, None

    # --- summary ------------------------------------------------------------------------

    def summary(self, session_id: str, *, now: float | None = None) -> dict[str, Any]:
        """The session summary of CLI.md, computed from rows (without the ``ok`` key).

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
        history = [
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "loss": r["loss"],
                "duration_s": r["duration_s"],
                "participants": r["participants"],
            }
            for r in self.rounds(session_id)
            if r["status"] == "completed"
        ]
        return {
            "session_id": session_id,
            "status": session["status"],
            "rounds_completed": session["rounds_completed"],
            "participants": int(distinct),
            "strategy": session["strategy"],
            "secure_aggregation": session["secure_aggregation"],
            "dropped": int(totals[0]),
            "final_accuracy": session["final_accuracy"],
            "final_loss": session["final_loss"],
            "model_cid": session["model_cid"],
            "duration_s": duration,
            "bytes_up": int(totals[1]),
            "bytes_down": int(totals[2]),
            "ledger": str(self.path),
            "history": history,
        }
