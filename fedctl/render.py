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
from protocol import text

# How much of one peer-written message a live line shows; the whole text is in --json.
LINE_TEXT = 300

_STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "paused": "yellow",
    "failed": "red",
    "stopped": "magenta",
    "created": "white",
}
_SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "dim"}


def short(peer_id: Any) -> str:
    return "…" + text.clean(str(peer_id))[-6:]


def _fmt(v: float | None, pattern: str = "{:.4f}") -> str:
    return "–" if v is None else pattern.format(v)


def _words(v: Any) -> str:
    """A peer-written phrase for a live line: cleaned and cut to LINE_TEXT."""
    return text.clean("" if v is None else str(v), LINE_TEXT)


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
    t = Table("round", "accuracy", "loss", "participants", "seconds")
    for h in s["history"]:
        t.add_row(
            plain(h["round"]),
            plain(_fmt(h["accuracy"])),
            plain(_fmt(h["loss"])),
            plain(h["participants"]),
            plain(_fmt(h["duration_s"], "{:.2f}")),
        )
    if s["history"]:
        out.append(t)
    out.append(
        line(
            "final accuracy ",
            (_fmt(s["final_accuracy"]), "bold"),
            f"  loss {_fmt(s['final_loss'])}  dropped {s['dropped']}  "
            f"{_fmt(s['duration_s'], '{:.1f}')} s  up {s['bytes_up']:,} B  "
            f"down {s['bytes_down']:,} B",
        )
    )
    out.append(line("model  ", s["model_cid"] or "–"))
    out.append(line("ledger ", str(s["ledger"])))
    return out


def print_summary(s: dict[str, Any]) -> None:
    for renderable in summary_lines(s):
        stdout.print(renderable)


def session_line(kind: str, data: dict[str, Any], rounds: int) -> Text | None:
    """One line of live progress for an event, or None for events not worth a line.

    A watcher must outlive whatever a coordinator pushes: an event of a known kind whose
    data is not what that kind carries gets a plain line saying so, never an exception.
    """
    try:
        return _session_line(kind, data, rounds)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return line((f"  {_words(kind)} event with unexpected data", "dim"))


def _session_line(kind: str, data: dict[str, Any], rounds: int) -> Text | None:
    if kind == "round_started":
        return line(
            f"round {data['round']}/{rounds} started: {len(data['selected'])} participants selected"
        )
    if kind == "update_received":
        return line(
            f"  {short(data['participant'])} trained round {data['round']}: "
            f"{data['samples']} examples, loss {data['loss']:.4f}, {data['train_s']:.2f} s "
            f"({data['received']}/{data['selected']})"
        )
    if kind == "round_completed":
        who = ", ".join(short(p) for p in data["participants"])
        dropped = f", dropped {len(data['dropped'])}" if data["dropped"] else ""
        return line(
            (f"round {data['round']}/{rounds}", "bold"),
            " accuracy ",
            (f"{data['accuracy']:.4f}", "bold green"),
            f" loss {data['loss']:.4f} {data['duration_s']:.2f} s  trained: {who}{dropped}",
        )
    if kind == "round_failed":
        return line(
            (f"round {data['round']} {data['status']}", "red"), ": ", _words(data["reason"])
        )
    if kind == "task_error":
        # the participant's own code and message: its words, shown as written
        return line(
            f"  {short(data['peer_id'])} could not do round {data['round']}: ",
            (_words(data.get("code")), "red"),
            ": ",
            _words(data.get("message")),
        )
    if kind == "session":
        status = str(data["status"])
        err = f": {_words(data['error'])}" if data.get("error") else ""
        return line("session ", (status, _STATUS_STYLE.get(status, "white")), err)
    if kind == "participant":
        if "excluded" in data:
            state = "excluded by an operator" if data["excluded"] else "readmitted"
        else:
            state = "online" if data.get("online") else "offline"
        return line(f"  participant {short(data['peer_id'])} {state}")
    if kind == "alert":
        severity = str(data.get("severity") or "")
        change = data.get("change", "raised")
        if change == "raised":
            return line(
                "  ",
                (f"alert {severity}", _SEVERITY_STYLE.get(severity, "white")),
                " ",
                _words(data.get("message", "")),
            )
        return line(f"  alert {data.get('id')} {data.get('alert_type')} {change}")
    if kind == "action":
        peer = f" {short(data['peer_id'])}" if data.get("peer_id") else ""
        return line(
            "  ",
            ("action", "yellow"),
            f" {data.get('action')}{peer}: ",
            _words(data.get("reason", "")),
        )
    if kind == "quality":
        health = data.get("health_score")
        if health is None:
            return None
        return line(f"  health after round {data['round']}: {health:.1f}")
    if kind == "lagged":
        return line(
            ("  " + f"{data.get('dropped', 0)} events were dropped (slow terminal)", "yellow")
        )
    return None
