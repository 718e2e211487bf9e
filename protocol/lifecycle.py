"""The life of a session, a round, an update and a task: the words the node, fedctl and the
dashboard share, defined once.

Session states and the actions an operator may ask for (``next_state`` is the rule):

    created --start--> running --pause--> paused --resume--> running
    created|running|paused --stop--> stopped
    running --(all rounds done)--> completed      running --(error)--> failed

``TERMINAL`` states never change again. A round goes through ``RoundPhase`` in order,
``selecting -> training -> aggregating -> evaluating -> done``, and ends with a
``RoundStatus``: ``completed`` (a new version was published), ``failed`` (too few updates),
``aborted`` (stopped by an operator, or cut by a coordinator that stopped; it runs again
under the same number), ``rejected`` (the aggregate was refused, not published). An update
is ``accepted`` or ``rejected``; a participant's task (its own ledger) ends ``done``,
``failed`` or ``declined`` (its limits, or a spec it refuses).

Pure: no I/O. These are ``StrEnum`` members, so each compares equal to its word on the wire
and in the ledger (``SessionState.RUNNING == "running"``).
"""

from __future__ import annotations

from enum import StrEnum

from protocol.errors import StateError


class SessionState(StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


class RoundPhase(StrEnum):
    SELECTING = "selecting"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"


class Action(StrEnum):
    """What an operator may ask of a session (admin ops ``session.<action>``)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"


class RoundStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    REJECTED = "rejected"


class UpdateStatus(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class TaskStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DECLINED = "declined"
    # the round closed on the updates it needed before this one ([selection] over_selection)
    NOT_NEEDED = "not_needed"


TERMINAL: frozenset[SessionState] = frozenset(
    {SessionState.COMPLETED, SessionState.FAILED, SessionState.STOPPED}
)
#: A session that may still train: the round driver runs or waits.
LIVE: frozenset[SessionState] = frozenset({SessionState.RUNNING, SessionState.PAUSED})

#: operator action -> (states it is allowed from, state it leads to)
ACTIONS: dict[Action, tuple[frozenset[SessionState], SessionState]] = {
    Action.START: (frozenset({SessionState.CREATED}), SessionState.RUNNING),
    Action.PAUSE: (frozenset({SessionState.RUNNING}), SessionState.PAUSED),
    Action.RESUME: (frozenset({SessionState.PAUSED}), SessionState.RUNNING),
    Action.STOP: (
        frozenset({SessionState.CREATED, SessionState.RUNNING, SessionState.PAUSED}),
        SessionState.STOPPED,
    ),
}

FINISHED_ROUND_STATUSES: frozenset[RoundStatus] = frozenset(RoundStatus) - {RoundStatus.RUNNING}
FINISHED_TASK_STATUSES: frozenset[TaskStatus] = frozenset(TaskStatus) - {TaskStatus.RUNNING}


def next_state(state: SessionState, action: str) -> SessionState:
    """The state after an operator action, or StateError saying why it is not allowed."""
    allowed, target = ACTIONS[Action(action)]
    if state not in allowed:
        raise StateError(
            f"cannot {action} a session that is {SessionState(state).value}",
            hint="allowed from: " + ", ".join(sorted(s.value for s in allowed)),
        )
    return target


def is_terminal(state: object) -> bool:
    """Whether a session status (as a peer sent it: any value) is one that never changes."""
    return isinstance(state, str) and state in TERMINAL


def allowed_actions(state: str) -> frozenset[Action]:
    """The actions an operator may take on a session in ``state`` (none for an unknown
    word: a client shows no button rather than one the node refuses)."""
    return frozenset(a for a, (sources, _) in ACTIONS.items() if state in sources)
