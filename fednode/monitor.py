"""The coordinator's quality monitor: what it measured of each peer, scored and alerted.

It gathers raw figures as they happen (connections, heartbeats, ping round trips, transfers,
training times, each plain update's effect on the validation loss, refusals), turns them into
``fednode.quality`` observations, and keeps the ledger's quality tables and alerts in step:

* every ``HEARTBEAT`` interval it pings each participant and re-evaluates the participant
  alert rules (so an offline or silent peer is flagged between rounds, not only after one);
  this runs on what it keeps in memory and touches the ledger only when the set of alerts
  that hold changes, so a heartbeat, a ping or a quiet evaluation runs no SQL;
* after every finished round it writes one ``participant_quality_metrics`` row per selected
  peer and one ``session_quality_metrics`` row, syncs the session's alerts, and writes the
  pings and transfers it measured since the last write (also every ``FLUSH_S``).

It decides, it does not act: its evaluations return ``Action``s (raise an event alert, pause
a session, a peer now left out of selection) that the coordinator applies
(``Coordinator.apply``), logging each as an event. A peer under an *open* critical alert is
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fednode import quality
from fednode.ledger import Ledger, TaskOutcome
from fednode.quality import SLA, ParticipantObservation, SessionObservation
from fednode.storage_guard import is_storage_fault
from protocol import messages, plugins

if TYPE_CHECKING:
    from fednode.services import MonitorHost, RoundView, SessionControl

log = logging.getLogger("fednode.monitor")

WINDOW_S = 600.0  # uptime and heartbeats look at most this far back
RECENT_TASKS = 20  # task completion / error rate over a peer's last selections
RECENT = 5  # medians of training time, bandwidth, model quality over the last few
PING_TIMEOUT_FACTOR = 2.0
FLUSH_S = 60.0  # pings and transfers measured between rounds are written at least this often
MAX_PENDING_NETWORK = 10_000  # measurements kept until the next write; beyond, the oldest go

# What the monitor asks the node to do (Coordinator.apply carries it out).
ActionKind = Literal["raise_alert", "pause_session", "exclude_peer"]


@dataclass(frozen=True, slots=True)
class Action:
    """One thing the monitor decided; pure data, applied by the coordinator.

    ``raise_alert``: raise the event alert ``alert_type`` for ``peer_id`` in ``session_id``
    with ``reason`` as its message. ``pause_session``: pause ``session_id`` because of
    ``peer_id`` (logged as a ``pause`` action with ``reason``). ``exclude_peer``: the critical
    rule alert ``alert_id`` was just raised for ``peer_id``, so selection leaves it out until
    an operator acknowledges the alert (the open alert in the ledger is what selection reads).
    """

    kind: ActionKind
    reason: str
    session_id: str | None = None
    peer_id: str | None = None
    alert_id: int | None = None
    alert_type: str | None = None


Writer = Callable[..., None]  # StorageGuard.write: do fn(*args, **kwargs) now, or keep it
Publisher = Callable[[str, dict[str, Any], str | None], None]  # EventBus.publish


def _write_now(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    fn(*args, **kwargs)


def _publish_nowhere(kind: str, data: dict[str, Any], session_id: str | None) -> None:
    return None


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
    # How its last selections ended (oldest first), the ledger's history read once on its
    # first connection (tasks_loaded), then what this process observed at each round's end.
    tasks: deque[TaskOutcome] = field(default_factory=lambda: deque(maxlen=RECENT_TASKS))
    tasks_loaded: bool = False
    answered: set[tuple[str, int]] = field(default_factory=set)  # (session, round) it delivered
    declined: set[tuple[str, int]] = field(default_factory=set)  # ... refused for LIMIT_*

    @property
    def online(self) -> bool:
        return bool(self.spans) and self.spans[-1][1] is None


def _median(values: Any) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


class QualityMonitor:
    """``write`` is how it writes to ``ledger`` (the coordinator's StorageGuard.write, so a
    storage fault queues the write instead of raising), ``publish`` where alert changes and
    quality rows go live (the coordinator's EventBus.publish)."""

    def __init__(
        self,
        ledger: Ledger,
        sla: SLA,
        heartbeat_s: float,
        *,
        write: Writer = _write_now,
        publish: Publisher = _publish_nowhere,
    ):
        self.ledger = ledger
        self.sla = sla
        self.heartbeat_s = heartbeat_s
        self.write = write
        self.publish = publish
        self.peers: dict[str, PeerStats] = {}
        self._task: asyncio.Task[None] | None = None
        self.metrics: Any = None  # fednode.metrics.Exporter when --metrics is given
        # The rule alert types that held for each entity at its last sync with the ledger:
        # an evaluation that finds the same ones has nothing to write.
        self._synced: dict[str, frozenset[str]] = {}
        self._network: deque[dict[str, Any]] = deque(maxlen=MAX_PENDING_NETWORK)
        # local-DP sessions: each completed round's compliance, judged once (session -> round)
        self._dp_ok: dict[str, dict[int, bool]] = {}
        self._flushed_at = time.monotonic()

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
        if not st.tasks_loaded:  # once per peer and process: later rounds are observed here
            try:
                earlier = self.ledger.recent_task_outcomes(peer_id, RECENT_TASKS)
            except Exception as exc:
                if not is_storage_fault(exc):
                    raise
                log.warning("task history of %s not read now (%s)", peer_id, exc)
            else:
                st.tasks = deque([*(o for _s, _r, o in earlier), *st.tasks], maxlen=RECENT_TASKS)
                st.tasks_loaded = True
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
        st.answered.add((session_id, msg.round))
        epsilon = getattr(msg, "dp_epsilon", None)  # local DP-SGD (an update or masked input)
        if epsilon is not None and self.metrics is not None:
            self.metrics.privacy(session_id, peer_id, epsilon)
        st.training_ms.append(msg.train_s * 1000.0)
        if msg.cpu_efficiency is not None:
            st.cpu_efficiency = msg.cpu_efficiency
        if msg.memory_efficiency is not None:
            st.memory_efficiency = msg.memory_efficiency
        if msg.fetch_bytes > 0 and msg.fetch_s > 0:
            self._network.append(
                {
                    "peer_id": peer_id,
                    "session_id": session_id,
                    "ts": now,
                    "direction": "down",
                    "bytes": msg.fetch_bytes,
                    "transfer_s": msg.fetch_s,
                }
            )
            st.bandwidth_mbps.append(msg.fetch_bytes * 8 / 1e6 / msg.fetch_s)  # as the ledger

    def on_ping(self, peer_id: str, now: float, rtt_ms: float, session_id: str | None) -> None:
        """A ping's round trip; ``session_id``: the session whose round the peer is in."""
        self._peer(peer_id, now).rtts_ms.append(rtt_ms)
        self._network.append(
            {
                "peer_id": peer_id,
                "session_id": session_id,
                "ts": now,
                "direction": "ping",
                "rtt_ms": rtt_ms,
            }
        )

    def on_task_error(self, peer_id: str, session_id: str, round: int, code: str) -> None:
        """A selected peer said it cannot do the round. A decline because the spec exceeds
        the limits its own operator set (``LIMIT_*``) is that operator's choice, not
        unreliability: the task is not counted at all. A training deadline or a crash is
        (it said yes and did not deliver), like any other round it did not answer."""
        if code.startswith("LIMIT_"):
            self._peer(peer_id, time.time()).declined.add((session_id, round))

    def on_model_quality(self, peer_id: str, score: float) -> None:
        self._peer(peer_id, time.time()).model_quality.append(score)

    def on_round_figures(
        self, session_id: str, metrics: Mapping[str, float], loss: float | None
    ) -> None:
        """A published round's evaluation (the ledger has it with the round): exported only."""
        if self.metrics is not None:
            self.metrics.round(session_id, metrics, loss)

    def on_security_violation(
        self, peer_id: str, code: str, message: str, running: list[str]
    ) -> list[Action]:
        """A participant's stream broke the rules: an alert, and a pause of each session in
        ``running`` (the running sessions it takes part in); one alert with no session if
        there are none."""
        self._peer(peer_id, time.time()).security_violations += 1
        alert = f"security violation by {peer_id}: {code}: {message}"
        actions: list[Action] = []
        for sid in running or [None]:
            actions.append(Action("raise_alert", alert, sid, peer_id, None, "security_violation"))
            if sid is not None:
                why = f"security violation by {peer_id} ({code})"
                actions.append(Action("pause_session", why, sid, peer_id))
        return actions

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
        """(selected, completed, failed) over the peer's last finished selections, those it
        declined for its own limits left out (on_task_error)."""
        st = self.peers.get(peer_id)
        counted = [o for o in st.tasks if o != "declined"] if st is not None else []
        done = sum(1 for o in counted if o == "completed")
        return len(counted), done, len(counted) - done

    def _tasks_ended(self, session_id: str, number: int, selected: list[str]) -> None:
        """A round ended: how each selected peer's task went, kept in memory."""
        key = (session_id, number)
        now = time.time()
        for pid in selected:
            st = self._peer(pid, now)
            if key in st.declined:
                outcome: TaskOutcome = "declined"
            else:
                outcome = "completed" if key in st.answered else "failed"
            st.tasks.append(outcome)
            # what is left is of rounds that never reported their end (none should)
            st.answered = {k for k in st.answered if k[0] != session_id or k[1] > number}
            st.declined = {k for k in st.declined if k[0] != session_id or k[1] > number}

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
        self,
        peer_ids: list[str] | None = None,
        session_id: str | None = None,
        write: bool = False,
    ) -> tuple[dict[str, quality.ParticipantScores], list[Action]]:
        """Score peers (all it knows by default) from memory and sync their alerts; with
        ``write`` (after a round), one metrics row each and every alert's figures, else the
        ledger only hears of alerts that came or went. Returns the scores, and an
        ``exclude_peer`` action for each critical alert this raised."""
        now = time.time()
        ids = sorted(self.peers) if peer_ids is None else peer_ids
        conditions: list[dict[str, Any]] = []
        out: dict[str, quality.ParticipantScores] = {}
        rows: list[tuple[str, str | None, float, dict[str, Any]]] = []
        for pid in ids:
            obs, scores = self.score_peer(pid, now)
            out[pid] = scores
            conditions += [
                c.to_dict() for c in quality.participant_alerts(obs, scores, self.sla, session_id)
            ]
            if write:
                self.peers[pid].history.append(scores.overall)
                rows.append((pid, session_id, now, self.metrics_row(obs, scores)))
            if self.metrics is not None:
                self.metrics.participant(pid, obs, scores, self.peers[pid].online)
        if rows:  # one transaction for the round's selection, not one per peer
            self.write(self.ledger.record_participant_quality_many, rows)
        raised = self._sync(ids, conditions, now, always=write)
        actions = [
            Action("exclude_peer", a["message"], a["session_id"], a["entity_id"], a["id"])
            for a in raised
            if a["severity"] == "critical"
        ]
        return out, actions

    def _sync(
        self, entities: list[str], conditions: list[dict[str, Any]], now: float, always: bool
    ) -> list[dict[str, Any]]:
        """Bring the entities' rule alerts in the ledger in step with ``conditions``: all of
        them when ``always``, else only the entities whose set of alert types changed since
        their last sync (figures of an alert that still holds wait for the next round).
        Returns the alerts raised (none when storage is down: the write waits in the
        guard's queue, and the exclusion it makes still holds once it is written)."""
        held: dict[str, set[str]] = {e: set() for e in entities}
        for c in conditions:
            held.setdefault(c["entity_id"], set()).add(c["alert_type"])
        changed = [e for e in entities if always or self._synced.get(e) != frozenset(held[e])]
        if not changed:
            return []
        mine = [c for c in conditions if c["entity_id"] in set(changed)]
        raised: list[dict[str, Any]] = []

        def write() -> None:
            changes = self.ledger.sync_alerts(changed, mine, now)
            raised.extend(changes["raised"])
            for change in ("raised", "resolved"):
                for alert in changes[change]:
                    self.publish("alert", {"change": change, **alert}, alert.get("session_id"))

        self.write(write)
        for e in changed:
            self._synced[e] = frozenset(held[e])
        return raised

    def alerted(self) -> set[str]:
        """Peers under an open (unacknowledged) critical alert: left out of selection."""
        rows = self.ledger.alerts(status="open", severity={"critical"})
        return {r["entity_id"] for r in rows if r["entity_id"]}

    def excluded(self) -> set[str]:
        """Every peer left out of selection: alerted ones and those an operator excluded."""
        return self.alerted() | self.ledger.excluded_peers()

    # --- after a round ------------------------------------------------------------------

    def after_round(
        self, run: SessionControl, rnd: RoundView, anomalous_pct: float | None
    ) -> list[Action]:
        """Count the round's tasks, score its peers and the session, write the figures; a
        bug here must not fail the session. Returns what the node should do about it."""
        try:
            return self._after_round(run, rnd, anomalous_pct)
        except Exception:
            log.exception("quality evaluation after round %d failed", rnd.number)
            return []

    def _after_round(
        self, run: SessionControl, rnd: RoundView, anomalous_pct: float | None
    ) -> list[Action]:
        # a spare an over-selection did not wait for had no task to fail ([selection])
        asked = [p for p in rnd.selected if p not in set(rnd.not_needed)]
        self._tasks_ended(run.session_id, rnd.number, asked)
        scores, actions = self.evaluate_peers(list(rnd.selected), run.session_id, write=True)
        obs = self.session_observation(run, scores, anomalous_pct)
        s = quality.session_scores(obs, self.sla)
        now = time.time()
        row = s.to_dict()
        row["health_score"] = row.pop("health")
        self.write(self.ledger.record_session_quality, run.session_id, rnd.number, now, row)
        conds = [c.to_dict() for c in quality.session_alerts(obs, s, self.sla)]
        self._sync([run.session_id], conds, now, always=True)
        self.flush()
        self.publish("quality", {"round": rnd.number, **row}, run.session_id)
        if self.metrics is not None:
            self.metrics.session(run.session_id, s)
            self.export_totals(run.session_id)
        return actions

    def export_totals(self, session_id: str) -> None:
        """The ledger's sums for the Prometheus endpoint (fednode.metrics), once per round:
        the session's rounds, bytes and exclusions, the active alerts, the peers left out of
        selection. A read that storage refuses now is taken again after the next round."""
        try:
            self.metrics.refresh(self.ledger.session_figures(session_id))
            self.metrics.reset_alerts(self.ledger.active_alerts())
            self.metrics.peers_left_out(len(self.ledger.excluded_peers()), len(self.alerted()))
        except Exception as exc:
            if not is_storage_fault(exc):
                raise
            log.warning("metrics not refreshed after the round (%s)", exc)

    def flush(self) -> None:
        """Write the pings and transfers measured since the last write, in one transaction."""
        self._flushed_at = time.monotonic()
        if self._network:
            rows = list(self._network)
            self._network.clear()
            self.write(self.ledger.record_network_many, rows)

    def session_observation(
        self,
        run: SessionControl,
        scores: dict[str, quality.ParticipantScores],
        anomalous_pct: float | None,
    ) -> SessionObservation:
        ledger = self.ledger
        sid = run.session_id
        # sums in SQL: nothing here may grow with the session's history (docs/scale.md, "Soak")
        fig = ledger.observation_figures(sid)
        last = fig["last_completed"]
        contributors = (
            sorted({p for p, _eps in ledger.accepted_in_round(sid, last)}) if last else []
        )
        raw = 4 * sum(math.prod(s) for s in run.shapes.values())
        secure = bool(run.spec["aggregation"]["secure"])
        ok_rounds = fig["completed"] if secure else fig["rounds_run"]
        privacy = run.spec.get("privacy", {})
        local_dp = privacy.get("mode") == plugins.LOCAL_DP
        if local_dp:  # from the ε each contributor reported (fednode.dpsgd)
            ok_rounds = self._local_dp_rounds_ok(sid, float(privacy["target_epsilon"]))
        central_dp = privacy.get("mode") == plugins.CENTRAL_DP
        if central_dp:  # a round complies when its aggregate was made noisy (central_dp.py)
            ok_rounds = fig["noisy_rounds"]
        pq = [scores[p].overall for p in scores if scores[p].has_input]  # 0.0 = unmeasured
        return SessionObservation(
            session_id=sid,
            # the live lineage: versions rolled back are not the session's history any more
            accuracies=fig["accuracies"],
            rounds_run=fig["rounds_run"],
            first_selected=fig["first_selected"],
            last_contributors=contributors,
            updates_accepted=fig["updates_accepted"],
            # Only integrity failures reach the ledger as rejected (wrong base, CID, tensors);
            # stale or duplicate frames are refused before an update row exists.
            updates_rejected_integrity=fig["updates_rejected"],
            bytes_moved=fig["bytes_moved"],
            bytes_ideal=2 * raw * fig["participants_completed"],
            privacy_required=secure or local_dp or central_dp,
            rounds_privacy_ok=ok_rounds,
            security_violations=fig["security_violations"],
            participant_quality=statistics.fmean(pq) if pq else None,
            anomalous_last_round_pct=anomalous_pct,
        )

    def _local_dp_rounds_ok(self, session_id: str, target: float) -> int:
        """How many completed rounds of a local-DP session ran within its target ε
        (quality.local_dp_round_complies); each round judged once, when first seen completed
        (a completed round's updates do not change), so a round costs one round's rows."""
        done = self._dp_ok.setdefault(session_id, {})
        for r in self.ledger.completed_rounds_after(session_id, max(done, default=0)):
            eps = [e for _p, e in self.ledger.accepted_in_round(session_id, r)]
            done[r] = quality.local_dp_round_complies(eps, target)
        return sum(done.values())

    # --- the periodic loop --------------------------------------------------------------

    def tick(self) -> list[Action]:
        """The periodic evaluation, from memory: every peer's alerts (written only when they
        change) and, every ``FLUSH_S``, the measurements kept since the last write."""
        _scores, actions = self.evaluate_peers()
        if time.monotonic() - self._flushed_at >= FLUSH_S:
            self.flush()
        return actions

    def start(self, node: MonitorHost) -> None:
        """Ping ``node``'s participants and evaluate every heartbeat interval; ``node``
        applies what the evaluation decides."""
        self._task = asyncio.create_task(self._loop(node), name="quality-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()

    async def _loop(self, node: MonitorHost) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if not node.guard.healthy:  # nothing to score against while it cannot write
                continue
            try:
                await asyncio.gather(*(self._ping(node, p) for p in list(node.peers)))
                node.apply(self.tick())
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the node from serving
                log.exception("quality evaluation failed")

    async def _ping(self, node: MonitorHost, peer_id: str) -> None:
        """One websocket ping; its pong's round trip is the peer's latency."""
        peer = node.peers.get(peer_id)
        if peer is None:
            return
        start = time.perf_counter()
        try:
            pong = await peer.conn.ws.ping()
            await asyncio.wait_for(pong, PING_TIMEOUT_FACTOR * self.heartbeat_s)
        except (TimeoutError, Exception):  # closed or silent: uptime/heartbeats will show it
            return
        rtt = 1000.0 * (time.perf_counter() - start)
        self.on_ping(peer_id, time.time(), rtt, _session_of(node, peer_id))


def _session_of(node: MonitorHost, peer_id: str) -> str | None:
    """The live session whose current round selected the peer, if any."""
    for run in node.sessions.values():
        live = run.state.value in ("running", "paused")
        if live and run.round is not None and peer_id in run.round.selected:
            return run.session_id
    return None
