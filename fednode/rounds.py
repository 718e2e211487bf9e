"""A round's decisions, as plain functions over plain data: the pure core of the round engine.

The coordinator's async driver (fednode.session) does the I/O — it waits, sends, writes the
ledger, reads the clock — and asks this module every question whose answer must not depend
on any of that:

    who may take part, who is selected    eligible(), select(), plan_selection(), sample(),
                                          regathered()
    which update is accepted, and why     check_turn(), check_content(): ValidationError(code)
    when the round stops waiting          RoundRun.closed(now, end), RoundRun.enough
    what the aggregate is                 bound_plan() / bound_updates() then the strategy's
                                          from_mean() or aggregate()
    whether it is published               verdict()
    who evaluates, the round's figures    coordinator_evaluates(), weighted_eval(),
                                          round_figures()
    whether to roll back                  divergence()
    what a restarted session resumes from fednode.resume.resume_point()

No asyncio, sockets, SQLite or clock here (tests/test_imports.py holds that): the times a
decision needs come in as arguments, so each one can be tested, replayed and reasoned
about on its own. The hardening checks of each round live here: a claim bounded by what the
peer registered, the share cap, the update-norm clip, the loss-jump check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fednode import bounds, versions
from fednode.codecs.base import BAD_UPDATE
from fednode.strategies.base import ClientUpdate, State
from fednode.weights import Weights
from protocol import messages, selection
from protocol.cid import file_cid
from protocol.errors import ValidationError
from protocol.lifecycle import RoundPhase


@dataclass
class RoundRun:
    """What one round knows while it runs (the driver owns one at a time)."""

    number: int
    model_cid: str
    selected: list[str]
    started_at: float  # wall clock, for the ledger; given by the driver
    phase: RoundPhase = RoundPhase.SELECTING
    # over-selection: the accepted updates that close the round (0 = every selected peer's)
    needed: int = 0
    # asked but not waited for: enough updates had arrived first (cut()); neither dropped
    # nor failed, in the ledger as in the quality scores
    not_needed: list[str] = field(default_factory=list)
    # accepted updates: the message (its bytes dropped once decoded) and when it arrived
    received: dict[str, tuple[messages.Update, float]] = field(default_factory=dict)
    # what each contributor reported of the round's model on its held-out split
    reports: dict[str, EvalReport] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # peer -> reason (left, error)
    bytes_up: int = 0
    bytes_down: int = 0
    down: dict[str, int] = field(default_factory=dict)  # peer -> bytes of the model sent it
    # backpressure (fednode.uploads): the most updates granted at once, the asks that waited
    uploads_peak: int = 0
    uploads_waited: int = 0
    anomalous_pct: float | None = None  # plain rounds: share of updates that were outliers
    # plain rounds: peers whose update outlier detection left out (fednode.robustness)
    excluded: list[str] = field(default_factory=list)
    # the strategy's state after this round's aggregate; it becomes the session's only when
    # the round's model is published (None: the round left the state as it was)
    next_state: State | None = None

    @property
    def outstanding(self) -> set[str]:
        """Selected peers that have neither answered nor dropped out."""
        return set(self.selected) - set(self.received) - set(self.failed) - set(self.not_needed)

    @property
    def enough(self) -> bool:
        """Over-selection: the needed count of updates has been accepted."""
        return bool(self.needed) and len(self.received) >= self.needed

    def closed(self, now: float, end: float) -> bool:
        """Whether the round stops waiting for updates: everyone answered or dropped out,
        enough updates arrived (over-selection), or the deadline ``end`` passed (``now``
        and ``end`` on the same monotonic clock)."""
        return not self.outstanding or self.enough or now >= end

    def cut(self) -> None:
        """Enough updates arrived: whoever has not answered is not needed (not a failure:
        it was asked as a spare)."""
        if self.enough:
            self.not_needed = sorted(self.outstanding)

    def time_out(self) -> None:
        """At the deadline: whoever has not answered failed the round."""
        for peer in self.outstanding:
            self.failed[peer] = "no update before the round timeout"

    @property
    def dropped(self) -> list[str]:
        """Selected peers without an accepted update, the spares not needed left out."""
        return sorted(set(self.selected) - set(self.received) - set(self.not_needed))


# --- selection ------------------------------------------------------------------------------


def eligible(
    online: Iterable[str],
    names_of: Callable[[str], set[str]],
    allowed: set[str],
    excluded: set[str],
) -> list[str]:
    """The online peers this session admits (by peer ID or an invite's name, ``names_of``)
    that no open critical alert or operator exclusion keeps out, in ``online``'s order."""
    return [p for p in online if names_of(p) & allowed and p not in excluded]


def select(candidates: list[str], min_participants: int, max_participants: int) -> list[str] | None:
    """The round's participants, or None while fewer than ``min_participants`` can take part
    (the driver waits, up to the spec's wait_participants_s). ``max_participants`` 0 = all."""
    if len(candidates) < min_participants:
        return None
    return candidates[:max_participants] if max_participants else list(candidates)


@dataclass(frozen=True)
class SelectionPlan:
    """How many updates a round needs, and how many participants it asks for them."""

    needed: int
    asked: int  # needed, or more with over-selection (never more than are eligible)

    @property
    def spares(self) -> bool:
        """Whether the round asks more than it needs, so closes at ``needed`` updates."""
        return self.asked > self.needed


def plan_selection(
    eligible: int,
    *,
    min_participants: int,
    max_participants: int,
    fraction: float,
    over_selection: float,
) -> SelectionPlan | None:
    """The round's counts from the spec's (top-level and [selection]) settings, or None while
    fewer than ``min_participants`` are eligible (the driver waits, as with ``select``).

    needed: ceil(fraction x eligible) with a fraction, else every eligible peer; at least
    min_participants, at most max_participants (0: no bound) and the eligible count.
    asked: ceil(needed x (1 + over_selection)), at most the eligible count."""
    if eligible < min_participants:
        return None
    # round(): 0.1 x 30 is 3.0000000000000004 in floating point, whose ceiling would be 4
    needed = (
        max(math.ceil(round(fraction * eligible, 9)), min_participants) if fraction else eligible
    )
    if max_participants:
        needed = min(needed, max_participants)
    needed = min(needed, eligible)
    asked = min(eligible, math.ceil(round(needed * (1.0 + over_selection), 9)))
    return SelectionPlan(needed, asked)


def round_rng(seed: int, number: int) -> np.random.Generator:
    """The draw of round ``number`` of a session seeded ``seed``: the same for the same two
    (a session's selections are reproducible), independent from one round to the next."""
    return np.random.default_rng([seed, number])


def sample(
    candidates: list[str],
    scores: Mapping[str, float | None],
    k: int,
    method: str,
    rng: np.random.Generator,
) -> list[str]:
    """``k`` of ``candidates`` (spec selection.method):

    first    the first k, in the candidates' order (the order peers came online);
    random   a uniform sample without replacement;
    quality  a sample without replacement weighted by ``scores`` (each peer's latest
             overall quality score, 0-100; None or missing: not scored yet), each weight
             at least QUALITY_FLOOR so that no peer is shut out for good.

    random and quality draw over the candidates sorted by peer ID, so that the draw
    depends on ``rng`` and the set of candidates only, not on who connected first; they
    return the sample sorted too."""
    if k >= len(candidates):
        return list(candidates) if method == "first" else sorted(candidates)
    if method == "first":
        return candidates[:k]
    pool = sorted(candidates)
    if method == "random":
        return sorted(pool[i] for i in rng.permutation(len(pool))[:k])
    if method != "quality":
        raise ValueError(f"unknown selection method {method!r}")
    w = np.array([quality_weight(scores.get(p)) for p in pool])
    # Efraimidis and Spirakis (2006): the k largest u^(1/w) are a weighted sample without
    # replacement (each next pick proportional to weight among those left); in logs, as
    # log(u) / w, so that small weights do not underflow.
    keys = np.log(rng.random(len(pool))) / w
    return sorted(pool[i] for i in np.argsort(-keys, kind="stable")[:k])


def quality_weight(score: float | None) -> float:
    """A peer's weight in a quality-weighted draw (protocol.selection says why)."""
    if score is None or not math.isfinite(score):
        return selection.QUALITY_UNSCORED
    return max(float(score), selection.QUALITY_FLOOR)


def regathered(candidates: list[str], expected: Iterable[str], now: float, until: float) -> bool:
    """After a coordinator restart: may the first round select now? Yes once every peer of
    the round that was cut (``expected``) is back among the candidates, or at ``until``
    (a peer that does not come back is not waited for longer)."""
    return set(expected) <= set(candidates) or now >= until


# --- acceptance -----------------------------------------------------------------------------


def check_turn(rnd: RoundRun | None, session_id: str, peer: str, round_no: int) -> None:
    """Whether ``peer`` may answer round ``round_no`` now: the round is collecting, the peer
    was selected and has not answered. Raises ValidationError (STALE_UPDATE, NOT_SELECTED,
    DUPLICATE_UPDATE); such a refusal leaves the round as it was."""
    if rnd is None or rnd.phase != RoundPhase.TRAINING or round_no != rnd.number:
        current = rnd.number if rnd else 0
        raise ValidationError(
            f"update for round {round_no}, but round {current} of "
            f"session {session_id} is not collecting updates",
            code="STALE_UPDATE",
        )
    if peer not in rnd.selected:
        raise ValidationError(
            f"{peer} was not selected for round {rnd.number}", code="NOT_SELECTED"
        )
    if peer in rnd.received or peer in rnd.failed:
        raise ValidationError(
            f"{peer} already answered round {rnd.number}", code="DUPLICATE_UPDATE"
        )


def check_content(
    rnd: RoundRun, msg: messages.Update, decode: Callable[[bytes], Weights]
) -> Weights:
    """Whether an update's content may enter the aggregate: trained on the round's model, its
    bytes hashing to the CID it names, and decodable to the model's shapes, dtype and finite
    values (``decode``, the session's codec; checked after the CID so that a peer cannot make
    the coordinator decode bytes it did not commit to). Raises ValidationError (WRONG_BASE,
    CID_MISMATCH, or the codec's code); the peer has then failed the round. Returns the
    decoded weights, so that an update is decoded once."""
    if msg.base_cid != rnd.model_cid:
        raise ValidationError(
            f"update trained on {msg.base_cid}, the round's model is {rnd.model_cid}",
            code="WRONG_BASE",
        )
    if file_cid(msg.data) != msg.update_cid:
        raise ValidationError("update bytes do not hash to their update_cid", code="CID_MISMATCH")
    return decode(msg.data)


# Refusals of an update's bytes that its sender must have made on purpose: a payload its
# codec cannot read (fednode.codecs: BAD_UPDATE) or bytes that are not what it named
# (check_content). Recorded as ``security`` events, besides the rejection.
CONTENT_REFUSALS = frozenset({BAD_UPDATE, "CID_MISMATCH"})


# --- the aggregate --------------------------------------------------------------------------


def bound_plan(
    examples: Mapping[str, int],
    norms: Mapping[str, float],
    claims: Mapping[str, int],
    agg: Mapping[str, Any],
) -> dict[str, dict[str, Any]]:
    """Each update's share of the aggregate and the scale of its step (fednode.bounds), from
    the example count it claimed and the L2 norm of its step, with the figures of the
    decision for the ledger: ``claimed``, ``registered``, ``weight`` (the claim bounded by
    what the participant registered, ``claims``), ``share`` (no share above
    ``max_weight_share``; the shares sum to 1), ``norm`` and ``scale`` (the step clipped to
    ``max_update_norm``)."""
    raw = {
        p: bounds.bounded_weight(
            n, claims.get(p), weighting=agg["weighting"], max_examples=agg["max_examples"]
        )
        for p, n in examples.items()
    }
    shares = bounds.capped_shares(raw, agg["max_weight_share"])
    return {
        p: {
            "claimed": n,
            "registered": claims.get(p),
            "weight": raw[p],
            "share": shares[p],
            "norm": norms[p],
            "scale": bounds.clip_scale(norms[p], agg["max_update_norm"]),
        }
        for p, n in examples.items()
    }


def bound_updates(
    updates: list[ClientUpdate],
    base: Weights,
    claims: Mapping[str, int],
    agg: Mapping[str, Any],
) -> tuple[list[ClientUpdate], dict[str, dict[str, Any]]]:
    """The updates bounded as ``bound_plan`` decides (each weighted by its share, each step
    clipped around ``base``, the round's model), with the figures of the decision."""
    figures = bound_plan(
        {u.peer_id: u.num_examples for u in updates},
        {u.peer_id: bounds.update_norm(u.weights, base) for u in updates},
        claims,
        agg,
    )
    out = []
    for u in updates:
        w, _norm, _scale = bounds.clip_update(u.weights, base, agg["max_update_norm"])
        out.append(ClientUpdate(u.peer_id, w, u.num_examples, u.loss, figures[u.peer_id]["share"]))
    return out, figures


def secure_weights(
    selected: list[str], claims: Mapping[str, int], agg: Mapping[str, Any], max_weight: int
) -> dict[str, int]:
    """Secure rounds: the whole-number weight each selected participant must use, from what
    it registered, bounded as a plain round bounds a claim (the coordinator checks their sum
    after unmasking; it cannot see a single one)."""
    raw = {
        p: bounds.bounded_weight(
            claims.get(p, 0),
            claims.get(p),
            weighting=agg["weighting"],
            max_examples=agg["max_examples"],
        )
        for p in selected
    }
    shares = bounds.capped_shares(raw, agg["max_weight_share"])
    return bounds.integer_weights(shares, sum(raw.values()), max_weight)


# --- publish or reject, roll back or not ----------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    publish: bool
    reason: str = ""  # why not, for the ledger and the alert


def verdict(
    new: Weights, loss: float | None, accuracy: float | None, base_loss: float, factor: float
) -> Verdict:
    """Whether a candidate aggregate becomes the next model version: every weight finite and
    its validation loss not over ``factor`` x the current model's (bounds.loss_jumped).
    ``loss`` None: the coordinator has no evaluation data (evaluation.on = "participants"),
    so only the finite check applies."""
    if not versions.is_finite(new):
        return Verdict(False, "the aggregate has non-finite weights (NaN or inf)")
    if loss is not None and bounds.loss_jumped(loss, base_loss, factor):
        return Verdict(
            False,
            f"its validation loss {loss:.4g} is over {factor:g} x the current model's "
            f"{base_loss:.4g} (accuracy {accuracy or math.nan:.4f})"
            if math.isfinite(loss)
            else "its validation loss is not finite",
        )
    return Verdict(True)


@dataclass(frozen=True)
class Rollback:
    to_round: int
    reason: str


def divergence(
    history: versions.History, rb: Mapping[str, Any], after_round: int
) -> Rollback | None:
    """After a round's version is stored: has the live lineage diverged (spec [rollback])?
    Then where to go back to, and why."""
    if not rb["enabled"]:
        return None
    # Versions not measured yet are left out at the end: with the participants evaluating,
    # the newest version's figures arrive with the next round's updates (weighted_eval).
    history = list(history)
    while history and history[-1][1] is None:
        history.pop()
    target = versions.rollback_target(history, rb["margin"], rb["rounds"])
    if target is None:
        return None
    best = dict(history)[target]
    acc = history[-1][1]
    return Rollback(
        target,
        f"accuracy {acc:.4f} after round {after_round} is more than {rb['margin']:g} below the "
        f"best so far ({best:.4f}, round {target}) for {rb['rounds']} consecutive round(s)",
    )


# --- evaluation: on the coordinator, on the participants, or both ---------------------------
#
# With evaluation.on = "participants" each participant evaluates the round's model (the one it
# fetched to train from) on its held-out split and reports the figures with its update: no
# second message per round, but the figures that arrive in round r describe the model round r
# started from (round r-1's version), not the candidate round r makes. docs/architecture.md,
# "Sessions and rounds", says why.


def coordinator_evaluates(on: str) -> bool:
    """Whether the coordinator evaluates on its own data.dataset (evaluation.on)."""
    return on in ("coordinator", "both")


def participants_evaluate(on: str) -> bool:
    """Whether participants hold out a test split and report figures with their updates."""
    return on in ("participants", "both")


@dataclass(frozen=True)
class EvalReport:
    """One participant's figures for the round's model on its held-out split."""

    examples: int
    loss: float
    metrics: Mapping[str, float]


def report_of(msg: messages.Update | messages.SecaggMasked) -> EvalReport | None:
    """The evaluation report an update carries (validated by protocol.messages), or None."""
    if msg.eval_examples <= 0 or msg.eval_loss is None:
        return None
    return EvalReport(msg.eval_examples, msg.eval_loss, dict(msg.eval_metrics))


@dataclass(frozen=True)
class EvalFigures:
    """The example-weighted mean of a round's reports."""

    examples: int  # the weight they carried, in all
    loss: float
    metrics: dict[str, float]
    reports: int

    @property
    def accuracy(self) -> float | None:
        """The round's score (``score``)."""
        return score(self.metrics)


def score(metrics: Mapping[str, float]) -> float | None:
    """The one figure a round is judged by, as fednode.training.evaluate gives it: accuracy
    (classification, binary), else R² (regression); higher is better either way, as
    rollback assumes. It is what the ledger's ``accuracy`` columns hold."""
    return metrics.get("accuracy", metrics.get("r2"))


def bounded_metrics(figures: Mapping[str, float]) -> dict[str, float]:
    """The coordinator's own figures (fednode.training.evaluate_metrics) as the ledger takes
    them: the EVAL_METRICS names only, finite, each clipped to its range (a diverged
    candidate's MAE can pass 10¹²; the loss check, not this, judges it)."""
    out: dict[str, float] = {}
    for name, (lo, hi) in messages.EVAL_METRICS.items():
        value = figures.get(name)
        if value is not None and math.isfinite(value):
            out[name] = min(max(float(value), lo), hi)
    return out


def round_metrics(
    on: str, coordinator: Mapping[str, float] | None, participants: EvalFigures | None
) -> dict[str, float] | None:
    """The round's metrics by name, from the evaluation ``round_figures`` takes its accuracy
    and loss from: the coordinator's whenever it evaluates, else the participants' mean
    (None: nobody measured)."""
    if coordinator_evaluates(on):
        return None if coordinator is None else bounded_metrics(coordinator)
    return None if participants is None else dict(participants.metrics)


def weighted_eval(
    reports: Mapping[str, EvalReport], claims: Mapping[str, int]
) -> EvalFigures | None:
    """The example-weighted mean of the reports' loss and of each metric (over the reports
    that carry it), or None without a report. A report weighs its examples, but at most what
    the participant registered for the session (``claims``): its held-out split is part of
    that data, so a participant cannot outweigh the others by claiming a larger test set."""
    weights = {
        peer: min(r.examples, claims[peer]) if peer in claims else r.examples
        for peer, r in reports.items()
    }
    used = {peer: w for peer, w in weights.items() if w > 0}
    if not used:
        return None
    total = sum(used.values())
    loss = sum(w * reports[p].loss for p, w in used.items()) / total
    metrics: dict[str, float] = {}
    for name in sorted({m for p in used for m in reports[p].metrics}):
        have = {p: w for p, w in used.items() if name in reports[p].metrics}
        metrics[name] = sum(w * reports[p].metrics[name] for p, w in have.items()) / sum(
            have.values()
        )
    return EvalFigures(total, loss, metrics, len(used))


def round_figures(
    on: str,
    coordinator: tuple[float, float] | None,
    participants: EvalFigures | None,
) -> tuple[float | None, float | None]:
    """The round's (accuracy, loss), as training_rounds, the round_completed event and the
    session's final figures keep them: the coordinator's own evaluation of the candidate
    whenever it evaluates (``on`` coordinator or both: one held-out set for every round, so
    rounds compare like with like), else the participants' weighted figures (None, None
    when no participant reported)."""
    if coordinator_evaluates(on):
        if coordinator is None:
            raise ValueError(f"evaluation.on = {on!r} needs the coordinator's own figures")
        return coordinator
    if participants is None:
        return None, None
    return participants.accuracy, participants.loss
