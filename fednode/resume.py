"""Where a restarted coordinator takes a live session up again (pure: rows in, a decision out).

A coordinator can die at any moment (SIGKILL, power). Everything it committed is in the
ledger: a round ends in ONE transaction with its model version (Ledger.complete_round), so
after a crash a round is either ended (completed, rejected, failed and counted, aborted) or
still ``running``, which Ledger.restart_session turns into ``aborted``. From those rows:

* the rounds already run are every round whose status counts as run (all but ``aborted``):
  rounds are run in order, so the session goes on with the round after the last of them,
  and an aborted round is run again under its own number (no round is counted twice);
* the model it goes on from is the newest *live* version (not rolled back): the one the
  next round would have started from, with its loss (the reference of the loss-jump check)
  and its strategy state (``state_cid``);
* with no version at all the session never got its initial model: it starts over;
* the participants of the last round started (``regather``): the first round after the
  restart waits a little for them to reconnect, so that a restart does not change who
  trains (fednode.rounds.regathered).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Round statuses after which the round is over and counts toward the session's rounds.
COUNTED = frozenset({"completed", "rejected", "failed"})


@dataclass(frozen=True)
class ResumePoint:
    rounds_done: int  # the session continues with round rounds_done + 1
    model_round: int  # the version it continues from
    model_cid: str
    loss: float | None
    state_cid: str | None
    regather: tuple[str, ...] = ()  # the last round's selected participants


def resume_point(
    rounds: Iterable[Mapping[str, Any]], live_models: Iterable[Mapping[str, Any]]
) -> ResumePoint | None:
    """The point to resume from, or None when the session has no model yet (start over).

    ``rounds`` are the session's training_rounds rows, ``live_models`` its model versions
    not rolled back (Ledger.rounds, Ledger.live_models). A ``running`` round must have been
    aborted first: finding one is a bug in the caller, so it raises."""
    done, last, regather = 0, 0, ()
    for r in rounds:
        if int(r["round"]) >= last:
            last, regather = int(r["round"]), tuple(r.get("selected") or ())
        if r["status"] == "running":
            raise ValueError(f"round {r['round']} is still running: abort it before resuming")
        if r["status"] in COUNTED:
            done = max(done, int(r["round"]))
    models = sorted(live_models, key=lambda m: int(m["round"]))
    if not models:
        return None
    current = models[-1]
    return ResumePoint(
        rounds_done=done,
        model_round=int(current["round"]),
        model_cid=str(current["cid"]),
        loss=current.get("loss"),
        state_cid=current.get("state_cid"),
        regather=regather,
    )
