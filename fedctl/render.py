"""Human output of session summaries and live events (rich).

Every figure and word here comes from the coordinator, and some of it (alert messages,
task errors, peer IDs) from participants it relayed: all of it is built into
``rich.text.Text`` as literal, cleaned text (fedctl.output.plain/line), never into a markup
string, so a ``[/]`` in a peer's message is printed, not parsed.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from fedctl.output import line, plain, stdout
from protocol import events as ev
from protocol import text
from protocol.alerts import AlertChange, Severity
from protocol.lifecycle import SessionState
from protocol.messages import EVAL_METRICS, METRIC_LABELS

# How much of one peer-written message a live line shows; the whole text is in --json.
LINE_TEXT = 300

_STATUS_STYLE: dict[str, str] = {
    SessionState.COMPLETED: "green",
    SessionState.RUNNING: "cyan",
    SessionState.PAUSED: "yellow",
    SessionState.FAILED: "red",
    SessionState.STOPPED: "magenta",
    SessionState.CREATED: "white",
}
SEVERITY_STYLE: dict[str, str] = {
    Severity.CRITICAL: "bold red",
    Severity.HIGH: "red",
    Severity.MEDIUM: "yellow",
    Severity.LOW: "dim",
}


def short(peer_id: Any) -> str:
    return "…" + text.clean(str(peer_id))[-6:]


def _fmt(v: float | None, pattern: str = "{:.4f}") -> str:  # ints are floats here
    return "–" if v is None else pattern.format(v)


def _words(v: Any) -> str:
    """A peer-written phrase for a live line: cleaned and cut to LINE_TEXT."""
    return text.clean("" if v is None else str(v), LINE_TEXT)


def metric_names(*figures: dict[str, Any] | None) -> list[str]:
    """The task's metrics that any of ``figures`` (metrics by name) holds, in the order
    fedctl report uses; a session from before metrics by name (or none measured) shows
    accuracy alone."""
    have = {k for f in figures if f for k in f}
    return [m for m in EVAL_METRICS if m in have] or ["accuracy"]


def metric_value(
    name: str, metrics: dict[str, Any] | None, accuracy: float | None = None
) -> float | None:
    """One metric by name; ``accuracy`` (the older column) stands in where none by name."""
    if metrics and name in metrics:
        v = metrics[name]  # from the coordinator: a number unless it misbehaves
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
    return accuracy if name == "accuracy" and not metrics else None


def metrics_text(metrics: dict[str, Any] | None, accuracy: float | None = None) -> str:
    """'accuracy 0.9611  ROC AUC 0.9874'; '' when nothing was measured."""
    parts = []
    for name in metric_names(metrics):
        v = metric_value(name, metrics, accuracy)
        if v is not None:
            parts.append(f"{METRIC_LABELS[name]} {_fmt(v)}")
    return "  ".join(parts)


def summary_lines(s: dict[str, Any]) -> list[Text | Table]:
    """What ``print_summary`` prints, as renderables (tests read them back)."""
    status = str(s["status"])
    out: list[Text | Table] = [
        line(
            "session ",
            (s["session_id"], "bold"),
            "  ",
            (status, _STATUS_STYLE.get(status, "white")),
            f"  {s['rounds_completed']} rounds  {s['participants']} participants  ",
            str(s["strategy"]),
            f"  secure aggregation: {'on' if s['secure_aggregation'] else 'off'}",
        )
    ]
    names = metric_names(s.get("final_metrics"), *(h.get("metrics") for h in s["history"]))
    t = Table(
        "round", *(METRIC_LABELS[n] for n in names), "loss", "participants", "seconds", "up ×"
    )
    for h in s["history"]:
        t.add_row(
            plain(h["round"]),
            *(plain(_fmt(metric_value(n, h.get("metrics"), h["accuracy"]))) for n in names),
            plain(_fmt(h["loss"])),
            plain(h["participants"]),
            plain(_fmt(h["duration_s"], "{:.2f}")),
            plain(ratio_text(h.get("up_ratio"))),
        )
    if s["history"]:
        out.append(t)
    final = metrics_text(s.get("final_metrics"), s["final_accuracy"]) or "accuracy –"
    out.append(
        line(
            "final ",
            (final, "bold"),
            f"  loss {_fmt(s['final_loss'])}  dropped {s['dropped']}  "
            f"{_fmt(s['duration_s'], '{:.1f}')} s  up {s['bytes_up']:,} B  "
            f"down {s['bytes_down']:,} B",
        )
    )
    out += compression_lines(s)
    out.append(line("model  ", s["model_cid"] or "–"))
    out.append(line("ledger ", str(s["ledger"])))
    if s.get("attackers"):  # fedctl demo --attackers: who attacked, to check what was found
        who = ", ".join(str(p) for p in s["attackers"])
        out.append(line(("attackers ", "bold yellow"), f"({s.get('attack', '')}) {who}"))
        caught = set(s.get("quarantined") or []) & {str(p) for p in s["attackers"]}
        wrong = set(s.get("quarantined") or []) - caught
        out.append(
            line(
                ("quarantined by the coordinator ", "bold"),
                f"{len(caught)} of {len(s['attackers'])} attackers"
                + (f", and {len(wrong)} honest participants" if wrong else ""),
            )
        )
    return out


def ratio_text(r: Any) -> str:
    """'48.2x' fewer bytes than float32; '–' when nothing was measured."""
    return f"{r:.1f}x" if isinstance(r, int | float) and not isinstance(r, bool) else "–"


def compression_lines(s: dict[str, Any]) -> list[Text | Table]:
    """The codec and the bytes each participant's updates weighed, raw and on the wire
    (summed per participant; each update's in ``--json``'s ``traffic``)."""
    comp = s.get("compression") or {}
    if not comp:
        return []
    out: list[Text | Table] = [
        line(
            "compression ",
            (str(comp.get("codec")), "bold"),
            f"  uplink {comp.get('up_bytes', 0):,} B of {comp.get('up_raw', 0):,} B raw "
            f"({ratio_text(comp.get('up_ratio'))} fewer)  downlink ({comp.get('downlink')}) "
            f"{comp.get('down_bytes', 0):,} B of {comp.get('down_raw', 0):,} B "
            f"({ratio_text(comp.get('down_ratio'))} fewer)",
        )
    ]
    per = s.get("traffic_by_participant") or []
    if per:
        t = Table("participant", "updates", "up B", "up raw B", "up ×", "down B", "down ×")
        for p in per:
            t.add_row(
                plain(p["participant"]),
                plain(p["updates"]),
                plain(f"{p['up_bytes']:,}"),
                plain(f"{p['up_raw']:,}"),
                plain(ratio_text(p["up_ratio"])),
                plain(f"{p['down_bytes']:,}"),
                plain(ratio_text(p["down_ratio"])),
            )
        out.append(t)
    return out


def print_summary(s: dict[str, Any]) -> None:
    for renderable in summary_lines(s):
        stdout.print(renderable)


# The kinds a watcher gets a line for; the others (secagg, invite, anomaly, sla, …) are
# followed in the dashboard and the ledger, not in a terminal.
SHOWN = frozenset(
    {
        ev.RoundStarted.KIND,
        ev.UpdateReceived.KIND,
        ev.RoundCompleted.KIND,
        ev.RoundFailed.KIND,
        ev.TaskError.KIND,
        ev.Session.KIND,
        ev.Participant.KIND,
        ev.Alert.KIND,
        ev.Action.KIND,
        ev.Quality.KIND,
        ev.Lagged.KIND,
    }
)


def session_line(kind: str, data: dict[str, Any], rounds: int) -> Text | None:
    """One line of live progress for an event, or None for events not worth a line.

    A watcher must outlive whatever a coordinator pushes: the payload is read through
    protocol.events.parse_event, and an event of a known kind whose data is not what that
    kind carries gets a plain line saying so, never an exception.
    """
    if kind not in SHOWN:
        return None
    parsed = ev.parse_event(kind, data)
    if isinstance(parsed, ev.UnknownEvent | ev.MalformedEvent):
        return line((f"  {_words(kind)} event with unexpected data", "dim"))
    return _session_line(parsed, rounds)


def _session_line(e: ev.Payload, rounds: int) -> Text | None:
    match e:
        case ev.RoundStarted():
            return line(
                f"round {e.round}/{rounds} started: {len(e.selected)} participants selected"
            )
        case ev.UpdateReceived():
            spent = "" if e.epsilon is None else f", ε {_fmt(e.epsilon, '{:.2f}')} spent"
            return line(
                f"  {short(e.participant)} trained round {e.round}: "
                f"{_fmt(e.samples, '{}')} examples, loss {_fmt(e.loss)}, "
                f"{_fmt(e.train_s, '{:.2f}')} s{spent} "
                f"({_fmt(e.received, '{}')}/{_fmt(e.selected, '{}')})"
            )
        case ev.RoundCompleted():
            who = ", ".join(short(p) for p in e.participants)
            dropped = f", dropped {len(e.dropped)}" if e.dropped else ""
            if e.excluded:  # outliers left out of the aggregate (docs/robustness.md)
                dropped += ", excluded " + ", ".join(short(p) for p in e.excluded)
            return line(
                (f"round {e.round}/{rounds}", "bold"),
                " ",
                (metrics_text(e.metrics, e.accuracy) or "accuracy –", "bold green"),
                f" loss {_fmt(e.loss)} {_fmt(e.duration_s, '{:.2f}')} s  trained: {who}{dropped}",
            )
        case ev.RoundFailed():
            return line((f"round {e.round} {_words(e.status)}", "red"), ": ", _words(e.reason))
        case ev.TaskError():
            # the participant's own code and message: its words, shown as written
            return line(
                f"  {short(e.peer_id)} could not do round {e.round}: ",
                (_words(e.code), "red"),
                ": ",
                _words(e.message),
            )
        case ev.Session():
            err = f": {_words(e.error)}" if e.error else ""
            idle = " (the round in flight has ended)" if e.idle else ""
            return line("session ", (e.status, _STATUS_STYLE.get(e.status, "white")), err, idle)
        case ev.Participant():
            if e.excluded is not None:
                state = "excluded by an operator" if e.excluded else "readmitted"
            else:
                state = "online" if e.online else "offline"
            return line(f"  participant {short(e.peer_id)} {state}")
        case ev.Alert():
            if e.change == AlertChange.RAISED:
                return line(
                    "  ",
                    (f"alert {e.severity}", SEVERITY_STYLE.get(e.severity, "white")),
                    " ",
                    _words(e.message),
                )
            return line(f"  alert {e.id} {e.alert_type} {_words(e.change)}")
        case ev.Action():
            peer = f" {short(e.peer_id)}" if e.peer_id else ""
            return line("  ", ("action", "yellow"), f" {e.action}{peer}: ", _words(e.reason))
        case ev.Quality():
            if e.health_score is None:
                return None
            return line(f"  health after round {e.round}: {e.health_score:.1f}")
        case ev.Lagged():
            return line(("  " + f"{e.dropped} events were dropped (slow terminal)", "yellow"))
    return None
