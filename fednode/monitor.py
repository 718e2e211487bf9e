"""The coordinator's quality monitor: what it measured of each peer, scored and alerted.

It gathers raw figures as they happen (connections, heartbeats, ping round trips, transfers,
training times, each plain update's effect on the validation loss, refusals), turns them into
``fednode.quality`` observations, and keeps the ledger's quality tables and alerts in step:

* every ``HEARTBEAT`` interval it pings each participant and re-evaluates the participant
  alert rules (so an offline or silent peer is flagged between rounds, not only after one);
* after every finished round it writes one ``participant_quality_metrics`` row per selected
  peer and one ``session_quality_metrics`` row, and syncs the session's alerts.

Actions follow from alerts (each logged as an event): a peer under an *open* critical alert is
left out of selection (acknowledging the alert readmits it: the operator's call); a security
violation by a session's participant pauses that session until an operator resumes it.

All the math is in ``fednode.quality`` (pure); this module only observes and persists.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fednode import quality
from fednode.quality import SLA, ParticipantObservation, SessionObservation
from protocol import messages

if TYPE_CHECKING:
    from fednode.coordinator import Coordinator
    from fednode.session import RoundRun, SessionRun

log = logging.getLogger("fednode.monitor")

WINDOW_S = 600.0  # uptime and heartbeats look at most this far back
RECENT_TASKS = 20  # task completion / error rate over a peer's last selections
RECENT = 5  # medians of training time, bandwidth, model quality over the last few
PING_TIMEOUT_FACTOR = 2.0


@dataclass
class PeerStats:
    """What the coordinator has seen of one participant since this process started."""

    first_seen: float
    spans: list[list[float | None]] = field(default_factory=list)  # [connected, left|None]
    heartbeats: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    rtts_ms: deque[float] = field(default_factory=lambda: deque(maxlen=20))
    disconnects: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    training_ms: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    bandwidth_mbps: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    model_quality: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    cpu_efficiency: float | None = None
    memory_efficiency: float | None = None
    data_quality: float | None = None
    security_violations: int = 0
    history: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    @property
    def online(self) -> bool:
        return bool(self.spans) and self.spans[-1][1] is None


def _median(values: Any) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


class QualityMonitor:
    def __init__(self, coord: Coordinator, sla: SLA, heartbeat_s: float):
        self.coord = coord
        self.sla = sla
        self.heartbeat_s = heartbeat_s
        self.peers: dict[str, PeerStats] = {}
        self._task: asyncio.Task[None] | None = None
        self.metrics: Any = None  # fednode.metrics.Exporter when --metrics is given

    # --- raw observations -----------------------------------------------------------

    def _peer(self, peer_id: str, now: float) -> PeerStats:
        if peer_id not in self.peers:
            self.peers[peer_id] = PeerStats(first_seen=now)
        return self.peers[peer_id]

    def on_connect(self, peer_id: str, now: float, data_report: dict[str, Any]) -> None:
        st = self._peer(peer_id, now)
        if st.online:  # a newer connection replaced the old one without a gap
            st.spans[-1][1] = now
        st.spans.append([now, None])
        st.heartbeats.append(now)  # the registration counts as the first sign of life
        if data_report:
            try:
                st.data_quality = quality.data_quality_score(data_report)
            except Exception as exc:  # a malformed report is the peer's problem, not ours
                log.warning("data report of %s refused: %s", peer_id, exc)
                st.data_quality = 0.0

    def on_disconnect(self, peer_id: str, now: float) -> None:
        st = self.peers.get(peer_id)
        if st is not None and st.online:
            st.spans[-1][1] = now
            st.disconnects.append(now)

    def on_heartbeat(
        self,
        peer_id: str,
        now: float,
        cpu_efficiency: float | None,
        memory_efficiency: float | None,
    ) -> None:
        st = self._peer(peer_id, now)
        st.heartbeats.append(now)
        if cpu_efficiency is not None:
            st.cpu_efficiency = cpu_efficiency
        if memory_efficiency is not None:
            st.memory_efficiency = memory_efficiency

    def on_update(
        self,
        peer_id: str,
        session_id: str,
        now: float,
        msg: messages.Update | messages.SecaggMasked,
    ) -> None:
        """An accepted update (or masked input): its timings and the task's resource use."""
        st = self._peer(peer_id, now)
        st.training_ms.append(msg.train_s * 1000.0)
        if msg.cpu_efficiency is not None:
            st.cpu_efficiency = msg.cpu_efficiency
        if msg.memory_efficiency is not None:
            st.memory_efficiency = msg.memory_efficiency
        if msg.fetch_bytes > 0 and msg.fetch_s > 0:
            self.coord.guard.write(
                self.coord.ledger.record_network,
                peer_id,
                session_id,
                now,
                "down",
                bytes=msg.fetch_bytes,
                transfer_s=msg.fetch_s,
            )
            st.bandwidth_mbps.append(msg.fetch_bytes * 8 / 1e6 / msg.fetch_s)  # as the ledger

    def on_model_quality(self, peer_id: str, score: float) -> None:
        self._peer(peer_id, time.time()).model_quality.append(score)

    def on_security_violation(self, peer_id: str, code: str, message: str) -> None:
        """A participant's stream broke the rules: alert, and pause its running sessions."""
        now = time.time()
        self._peer(peer_id, now).security_violations += 1
        runs = [
            r
            for r in self.coord.sessions.values()
            if r.state.value == "running" and self.coord.names_of(peer_id) & self.coord.allowed(r)
        ]
        for run in runs or [None]:
            sid = run.session_id if run else None
            self.coord.raise_alert(
                "security_violation",
                peer_id,
                sid,
                f"security violation by {peer_id}: {code}: {message}",
            )
            if run is not None:
                run.act("pause")
                self.coord.record(
                    "action",
                    sid,
                    {"action": "pause", "reason": f"security violation by {peer_id} ({code})"},
                    entity_id=peer_id,
                )

    # --- scoring ----------------------------------------------------------------------

    def _uptime(self, st: PeerStats, now: float) -> float | None:
        start = max(st.first_seen, now - WINDOW_S)
        total = now - start
        if total <= 0:
            return None
        up = 0.0
        for a, b in st.spans:
            a_, b_ = max(a or start, start), (now if b is None else b)
            if b_ > a_:
                up += b_ - a_
        return 100.0 * min(1.0, up / total)

    def _heartbeat_consistency(self, st: PeerStats, now: float) -> float | None:
        """Share of heartbeat gaps within 1.5 intervals, inside connected spans only (time
        offline is uptime's business); a silent but connected peer counts as a late gap."""
        limit = 1.5 * self.heartbeat_s
        start = now - WINDOW_S
        good = bad = 0
        for a, b in st.spans:
            end = now if b is None else b
            if end < start:
                continue
            beats = [t for t in st.heartbeats if (a or 0) <= t <= end and t >= start]
            for x, y in itertools.pairwise(beats):
                if y - x <= limit:
                    good += 1
                else:
                    bad += 1
            if b is None and beats and now - beats[-1] > limit:
                bad += 1
        if good + bad == 0:
            return None
        return 100.0 * good / (good + bad)

    def _tasks(self, peer_id: str) -> tuple[int, int, int]:
        """(selected, completed, failed) over the peer's last finished selections."""
        rows = list(
            self.coord.ledger.db.query(
                "SELECT r.session_id, r.round FROM training_rounds r, json_each(r.selected) j "
                "WHERE j.value = ? AND r.status != 'running' "
                "ORDER BY r.started_at DESC LIMIT ?",
                (peer_id, RECENT_TASKS),
            )
        )
        # A task the participant declined because the spec exceeds the limits its own operator
        # set (LIMIT_*) is the operator's choice, not unreliability: it is not counted at all.
        # A training deadline or a crash is (it said yes and did not deliver).
        sessions = sorted({r["session_id"] for r in rows})
        declined = {
            (d["session_id"], d["round"])
            for d in self.coord.ledger.db.query(
                "SELECT session_id, json_extract(data, '$.round') AS round FROM events "
                f"WHERE session_id IN ({','.join('?' * len(sessions))}) "  # idx_events_session
                "AND kind = 'task_error' AND entity_id = ? "
                "AND json_extract(data, '$.code') LIKE 'LIMIT\\_%' ESCAPE '\\'",
                (*sessions, peer_id),
            )
        }
        rows = [r for r in rows if (r["session_id"], r["round"]) not in declined]
        if not rows:
            return 0, 0, 0
        done = 0
        for r in rows:
            hit = self.coord.ledger.db.execute(
                "SELECT 1 FROM client_updates WHERE session_id = ? AND round = ? "
                "AND participant = ? AND status = 'accepted' LIMIT 1",
                (r["session_id"], r["round"], peer_id),
            ).fetchone()
            done += hit is not None
        return len(rows), done, len(rows) - done

    def observation(self, peer_id: str, now: float) -> ParticipantObservation:
        st = self._peer(peer_id, now)
        selected, completed, failed = self._tasks(peer_id)
        return ParticipantObservation(
            peer_id=peer_id,
            training_time_ms=_median(st.training_ms),
            tasks_selected=selected,
            tasks_completed=completed,
            tasks_failed=failed,
            model_quality=_median(st.model_quality),
            data_quality=st.data_quality,
            uptime_pct=self._uptime(st, now),
            heartbeat_consistency_pct=self._heartbeat_consistency(st, now),
            latency_ms=_median(st.rtts_ms),
            bandwidth_mbps=_median(st.bandwidth_mbps),
            disconnects=sum(1 for t in st.disconnects if t >= now - WINDOW_S),
            cpu_efficiency_pct=st.cpu_efficiency,
            memory_efficiency_pct=st.memory_efficiency,
            security_violations=st.security_violations,
        )

    def score_peer(
        self, peer_id: str, now: float
    ) -> tuple[ParticipantObservation, quality.ParticipantScores]:
        obs = self.observation(peer_id, now)
        scores = quality.participant_scores(obs, self.sla, list(self.peers[peer_id].history))
        return obs, scores

    @staticmethod
    def metrics_row(obs: ParticipantObservation, s: quality.ParticipantScores) -> dict[str, Any]:
        """One participant_quality_metrics row: the raw figures and the scores."""
        return {
            "training_time_ms": obs.training_time_ms,
            "tasks_selected": obs.tasks_selected,
            "tasks_completed": obs.tasks_completed,
            "tasks_failed": obs.tasks_failed,
            "model_quality": obs.model_quality,
            "data_quality": obs.data_quality,
            "uptime": obs.uptime_pct,
            "heartbeat_consistency": obs.heartbeat_consistency_pct,
            "latency_ms": obs.latency_ms,
            "bandwidth_mbps": obs.bandwidth_mbps,
            "disconnects": obs.disconnects,
            "cpu_efficiency": obs.cpu_efficiency_pct,
            "memory_efficiency": obs.memory_efficiency_pct,
            "security_violations": obs.security_violations,
            "task_completion_rate": s.task_completion_rate,
            "error_rate": s.error_rate,
            "connection_stability": s.connection_stability,
            "performance_score": s.performance,
            "reliability_score": s.reliability,
            "network_score": s.network,
            "resource_score": s.resource,
            "overall_score": s.overall,
            "trend": s.trend,
        }

    def evaluate_peers(
        self, peer_ids: list[str] | None = None, session_id: str | None = None, write: bool = False
    ) -> dict[str, quality.ParticipantScores]:
        """Score peers and sync their alerts; with ``write``, one metrics row each."""
        now = time.time()
        ids = sorted(self.peers) if peer_ids is None else peer_ids
        conditions: list[dict[str, Any]] = []
        out: dict[str, quality.ParticipantScores] = {}
        for pid in ids:
            obs, scores = self.score_peer(pid, now)
            out[pid] = scores
            conditions += [
                c.to_dict() for c in quality.participant_alerts(obs, scores, self.sla, session_id)
            ]
            if write:
                self.peers[pid].history.append(scores.overall)
                self.coord.guard.write(
                    self.coord.ledger.record_participant_quality,
                    pid,
                    session_id,
                    now,
                    self.metrics_row(obs, scores),
                )
            if self.metrics is not None:
                self.metrics.participant(pid, obs, scores, self.peers[pid].online)
        self._sync(ids, conditions, now)
        return out

    def _sync(self, entities: list[str], conditions: list[dict[str, Any]], now: float) -> None:
        def write() -> None:
            changes = self.coord.ledger.sync_alerts(entities, conditions, now)
            for change in ("raised", "resolved"):
                for alert in changes[change]:
                    self.coord.events.publish(
                        "alert", {"change": change, **alert}, alert.get("session_id")
                    )

        self.coord.guard.write(write)

    def alerted(self) -> set[str]:
        """Peers under an open (unacknowledged) critical alert: left out of selection."""
        rows = self.coord.ledger.alerts(status="open", severity={"critical"})
        return {r["entity_id"] for r in rows if r["entity_id"]}

    def excluded(self) -> set[str]:
        """Every peer left out of selection: alerted ones and those an operator excluded."""
        return self.alerted() | self.coord.ledger.excluded_peers()

    # --- after a round ------------------------------------------------------------------

    def after_round(self, run: SessionRun, rnd: RoundRun, anomalous_pct: float | None) -> None:
        """Score the round's peers and the session; a bug here must not fail the session."""
        try:
            self._after_round(run, rnd, anomalous_pct)
        except Exception:
            log.exception("quality evaluation after round %d failed", rnd.number)

    def _after_round(self, run: SessionRun, rnd: RoundRun, anomalous_pct: float | None) -> None:
        scores = self.evaluate_peers(list(rnd.selected), run.session_id, write=True)
        obs = self.session_observation(run, scores, anomalous_pct)
        s = quality.session_scores(obs, self.sla)
        now = time.time()
        row = s.to_dict()
        row["health_score"] = row.pop("health")
        self.coord.guard.write(
            self.coord.ledger.record_session_quality, run.session_id, rnd.number, now, row
        )
        conds = [c.to_dict() for c in quality.session_alerts(obs, s, self.sla)]
        self._sync([run.session_id], conds, now)
        self.coord.events.publish("quality", {"round": rnd.number, **row}, run.session_id)
        if self.metrics is not None:
            self.metrics.session(run.session_id, s)

    def session_observation(
        self,
        run: SessionRun,
        scores: dict[str, quality.ParticipantScores],
        anomalous_pct: float | None,
    ) -> SessionObservation:
        ledger = self.coord.ledger
        sid = run.session_id
        models = ledger.models(sid)
        rounds = ledger.rounds(sid)
        finished = [r for r in rounds if r["status"] != "running"]
        completed = [r for r in finished if r["status"] == "completed"]
        last = completed[-1] if completed else None
        contributors: list[str] = []
        if last is not None:
            contributors = sorted(
                {
                    u["participant"]
                    for u in ledger.updates(sid, last["round"])
                    if u["status"] == "accepted"
                }
            )
        updates = ledger.updates(sid)
        accepted = sum(1 for u in updates if u["status"] == "accepted")
        # Only integrity failures reach the ledger as rejected (wrong base, CID, tensors);
        # stale or duplicate frames are refused before an update row exists.
        integrity = sum(1 for u in updates if u["status"] == "rejected")
        raw = 4 * sum(math.prod(s) for s in run.shapes.values())
        moved = sum(r["bytes_up"] + r["bytes_down"] for r in finished)
        ideal = sum(2 * raw * r["participants"] for r in completed)
        secure = bool(run.spec["aggregation"]["secure"])
        ok_rounds = len(completed) if secure else len(finished)
        violations = sum(
            1
            for a in ledger.alerts(status="all", session_id=sid)
            if a["alert_type"] == "security_violation"
        )
        pq = [scores[p].overall for p in scores if scores[p].has_input]  # 0.0 = unmeasured
        return SessionObservation(
            session_id=sid,
            # the live lineage: versions rolled back are not the session's history any more
            accuracies=[
                m["accuracy"]
                for m in models
                if m["accuracy"] is not None and m.get("rolled_back_at") is None
            ],
            rounds_run=len(finished),
            first_selected=rounds[0]["selected"] if rounds else [],
            last_contributors=contributors,
            updates_accepted=accepted,
            updates_rejected_integrity=integrity,
            bytes_moved=moved,
            bytes_ideal=ideal,
            privacy_required=secure,
            rounds_privacy_ok=ok_rounds,
            security_violations=violations,
            participant_quality=statistics.fmean(pq) if pq else None,
            anomalous_last_round_pct=anomalous_pct,
        )

    # --- the periodic loop --------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="quality-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if not self.coord.guard.healthy:  # nothing to score against while it cannot write
                continue
            try:
                await asyncio.gather(*(self._ping(p) for p in list(self.coord.peers)))
                self.evaluate_peers()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the node from serving
                log.exception("quality evaluation failed")

    async def _ping(self, peer_id: str) -> None:
        """One websocket ping; its pong's round trip is the peer's latency."""
        peer = self.coord.peers.get(peer_id)
        if peer is None:
            return
        start = time.perf_counter()
        try:
            pong = await peer.conn.ws.ping()
            await asyncio.wait_for(pong, PING_TIMEOUT_FACTOR * self.heartbeat_s)
        except (TimeoutError, Exception):  # closed or silent: uptime/heartbeats will show it
            return
        rtt = 1000.0 * (time.perf_counter() - start)
        now = time.time()
        self._peer(peer_id, now).rtts_ms.append(rtt)
        sid = self._session_of(peer_id)
        ledger = self.coord.ledger
        self.coord.guard.write(ledger.record_network, peer_id, sid, now, "ping", rtt_ms=rtt)

    def _session_of(self, peer_id: str) -> str | None:
        for run in self.coord.sessions.values():
            live = run.state.value in ("running", "paused")
            if live and run.round is not None and peer_id in run.round.selected:
                return run.session_id
        return None
