"""Human output of session summaries and live events (rich)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fedctl.output import stdout

_STATUS_STYLE = {
    "completed": "green",
    "running": "cyan",
    "paused": "yellow",
    "failed": "red",
    "stopped": "magenta",
    "created": "white",
}


def short(peer_id: str) -> str:
    return "…" + peer_id[-6:]


def _fmt(v: float | None, pattern: str = "{:.4f}") -> str:
    return "–" if v is None else pattern.format(v)


def print_summary(s: dict[str, Any]) -> None:
    style = _STATUS_STYLE.get(s["status"], "white")
    stdout.print(
        f"session [bold]{s['session_id']}[/]  [{style}]{s['status']}[/]  "
        f"{s['rounds_completed']} rounds  {s['participants']} participants  "
        f"{s['strategy']}  secure aggregation: {'on' if s['secure_aggregation'] else 'off'}"
    )
    t = Table("round", "accuracy", "loss", "participants", "seconds")
    for h in s["history"]:
        t.add_row(
            str(h["round"]),
            _fmt(h["accuracy"]),
            _fmt(h["loss"]),
            str(h["participants"]),
            _fmt(h["duration_s"], "{:.2f}"),
        )
    if s["history"]:
        stdout.print(t)
    stdout.print(
        f"final accuracy [bold]{_fmt(s['final_accuracy'])}[/]  loss "
        f"{_fmt(s['final_loss'])}  dropped {s['dropped']}  "
        f"{_fmt(s['duration_s'], '{:.1f}')} s  up {s['bytes_up']:,} B  "
        f"down {s['bytes_down']:,} B"
    )
    stdout.print(f"model  {s['model_cid'] or '–'}")
    stdout.print(f"ledger {s['ledger']}")


def session_line(kind: str, data: dict[str, Any], rounds: int) -> str | None:
    """One line of live progress for an event, or None for events not worth a line."""
    if kind == "round_started":
        return (
            f"round {data['round']}/{rounds} started: {len(data['selected'])} participants selected"
        )
    if kind == "update_received":
        return (
            f"  {short(data['participant'])} trained round {data['round']}: "
            f"{data['samples']} examples, loss {data['loss']:.4f}, {data['train_s']:.2f} s "
            f"({data['received']}/{data['selected']})"
        )
    if kind == "round_completed":
        who = ", ".join(short(p) for p in data["participants"])
        dropped = f", dropped {len(data['dropped'])}" if data["dropped"] else ""
        return (
            f"[bold]round {data['round']}/{rounds}[/] accuracy "
            f"[bold green]{data['accuracy']:.4f}[/] loss {data['loss']:.4f} "
            f"{data['duration_s']:.2f} s  trained: {who}{dropped}"
        )
    if kind == "round_failed":
        return f"[red]round {data['round']} {data['status']}[/]: {data['reason']}"
    if kind == "session":
        style = _STATUS_STYLE.get(data["status"], "white")
        err = f": {data['error']}" if data.get("error") else ""
        return f"session [{style}]{data['status']}[/]{err}"
    if kind == "participant":
        if "excluded" in data:
            state = "excluded by an operator" if data["excluded"] else "readmitted"
        else:
            state = "online" if data.get("online") else "offline"
        return f"  participant {short(data['peer_id'])} {state}"
    if kind == "alert":
        style = _SEVERITY_STYLE.get(data.get("severity", ""), "white")
        change = data.get("change", "raised")
        if change == "raised":
            return f"  [{style}]alert {data.get('severity')}[/] {data.get('message', '')}"
        return f"  alert {data.get('id')} {data.get('alert_type')} {change}"
    if kind == "action":
        peer = f" {short(data['peer_id'])}" if data.get("peer_id") else ""
        return f"  [yellow]action[/] {data.get('action')}{peer}: {data.get('reason', '')}"
    if kind == "quality":
        health = data.get("health_score")
        return None if health is None else f"  health after round {data['round']}: {health:.1f}"
    if kind == "lagged":
        return f"  [yellow]{data.get('dropped', 0)} events were dropped (slow terminal)[/]"
    return None


_SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "dim"}
