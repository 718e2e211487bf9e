"""`fedctl`: the operator CLI. Every command has --help; every report takes --json.

Human output prints what the coordinator answered as literal text (fedctl.output.plain and
line build rich ``Text``): names, messages and datasets are other machines' words, and a
table cell given as a plain str would be parsed as rich markup.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from fedctl.client import AdminClient, Target, call, operator_identity
from fedctl.output import emit_json, fail, line, plain, run, stderr, stdout
from fedctl.render import SEVERITY_STYLE, metrics_text, print_summary, session_line
from fednode.api import PRIVATE_UMASK
from protocol import spec as specmod
from protocol.errors import FednodeError
from protocol.events import Session as SessionEvent
from protocol.events import parse_event
from protocol.lifecycle import is_terminal
from protocol.operations import Op

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Drive and watch fednode sessions."
)
session_app = typer.Typer(no_args_is_help=True, help="Create and run training sessions.")
participants_app = typer.Typer(no_args_is_help=True, help="Participants seen by the coordinator.")
model_app = typer.Typer(
    no_args_is_help=True, help="Global model versions, by CID; a spec's model described."
)
ledger_app = typer.Typer(no_args_is_help=True, help="A node's SQLite ledger (offline).")
alerts_app = typer.Typer(no_args_is_help=True, help="Quality and security alerts.")
quality_app = typer.Typer(no_args_is_help=True, help="Measured quality scores.")
app.add_typer(session_app, name="session")
app.add_typer(alerts_app, name="alerts")
app.add_typer(quality_app, name="quality")
app.add_typer(participants_app, name="participants")
app.add_typer(model_app, name="model")
app.add_typer(ledger_app, name="ledger")
audit_app = typer.Typer(no_args_is_help=True, help="Privacy audits of a session's model.")
app.add_typer(audit_app, name="audit")
export_app = typer.Typer(no_args_is_help=True, help="A session into other tools (MLflow).")
app.add_typer(export_app, name="export")

Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
# report, privacy: read a stopped coordinator's ledger instead of asking a running one
OfflineLedger = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", help="read the coordinator's ledger offline (e.g. after `fedctl demo`)"
    ),
]


class Globals:
    json = False
    target = Target("", "", None)


G = Globals()


@app.callback()
def main_options(
    coordinator: Annotated[
        str, typer.Option(envvar="FEDCTL_COORDINATOR", help="the coordinator's ws://HOST:PORT")
    ] = "",
    coordinator_id: Annotated[
        str, typer.Option(envvar="FEDCTL_COORDINATOR_ID", help="the coordinator's peer ID")
    ] = "",
    key: Annotated[
        Path | None,
        typer.Option(envvar="FEDCTL_KEY", help="operator key (default ~/.fedctl/operator.key)"),
    ] = None,
    as_json: Json = False,
) -> None:
    G.json = as_json
    G.target = Target(coordinator, coordinator_id, key)


def _json(flag: bool) -> bool:
    return flag or G.json


@app.command()
def whoami(as_json: Json = False) -> None:
    """The operator's peer ID (the key is created on first use, mode 0600)."""
    run(
        _json(as_json),
        lambda: {"peer_id": operator_identity(G.target.key).peer_id},
        lambda r: stdout.print(plain(r["peer_id"])),
    )


@app.command()
def demo(
    participants: Annotated[
        int,
        typer.Option(
            min=1,
            max=1000,
            help="how many participants: up to 32 processes, or up to 1000 with --swarm",
        ),
    ] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=1000)] = 10,
    spec: Annotated[
        Path | None, typer.Option(help="a session spec to run instead of the defaults")
    ] = None,
    secure_aggregation: Annotated[bool, typer.Option("--secure-aggregation")] = False,
    drop: Annotated[int, typer.Option(help="kill this many participants after round 1")] = 0,
    attackers: Annotated[
        int,
        typer.Option(
            min=0,
            help="the last N participants attack (fednode run --attack); fewer than "
            "--participants; the coordinator is not told, the summary names them",
        ),
    ] = 0,
    attack: Annotated[
        str,
        typer.Option(
            help="what the attackers do: sign_flip, scale:F, gaussian:SIGMA, label_flip, "
            "constant:V or free_rider"
        ),
    ] = "",
    strategy: Annotated[
        str,
        typer.Option(help="the spec's aggregation.strategy (e.g. fedavg, fedprox)"),
    ] = "",
    partition: Annotated[
        str,
        typer.Option(
            help="the spec's data.partition: iid, stratified, sequential, dirichlet, "
            "label_skew or group"
        ),
    ] = "",
    codec: Annotated[
        str,
        typer.Option(
            help="the spec's compression.codec: identity, fp16, bf16, quantize, topk, "
            "topk+quantize or randk (docs/compression.md)"
        ),
    ] = "",
    downlink: Annotated[
        str, typer.Option(help="the spec's compression.downlink: full, delta or delta_fp16")
    ] = "",
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="where the nodes keep their data (default $FEDNODE_HOME/demo, wiped first)"
        ),
    ] = None,
    swarm: Annotated[
        bool,
        typer.Option(
            "--swarm",
            help="run the participants as one `fednode swarm` process (virtual participants, "
            "each with its own key, connection and ledger) instead of one process each",
        ),
    ] = False,
    as_json: Json = False,
) -> None:
    """Run a coordinator and N participants as local processes, one session, the summary."""
    from fedctl.demo import DemoOptions, run_demo

    opts = DemoOptions(
        participants=participants,
        rounds=rounds,
        spec_path=spec,
        secure=secure_aggregation,
        drop=drop,
        attackers=attackers,
        attack=attack,
        strategy=strategy,
        partition=partition,
        codec=codec,
        downlink=downlink,
        workdir=workdir,
        swarm=swarm,
        key=G.target.key,
        as_json=_json(as_json),
    )
    run(opts.as_json, lambda: run_demo(opts), print_summary)


@app.command()
def invite(
    session: Annotated[str, typer.Option("--session", help="the session to invite to")],
    expires: Annotated[str, typer.Option(help="lifetime: 90s, 15m, 24h, 7d")] = "24h",
    uses: Annotated[int, typer.Option(help="how many distinct participants may use it")] = 1,
    as_json: Json = False,
) -> None:
    """A join token (signed by the coordinator) for participants' --join-token."""
    from protocol.tokens import parse_duration

    def go() -> dict[str, Any]:
        return call(
            G.target,
            Op.INVITE_CREATE,
            session_id=session,
            expires_s=parse_duration(expires),
            uses=uses,
        )

    run(_json(as_json), go, lambda r: stdout.print(plain(r["token"]), soft_wrap=True))


# --- sessions ------------------------------------------------------------------------


@session_app.command("init")
def session_init(
    file: Annotated[Path | None, typer.Argument(help="where to write; stdout if omitted")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing file")] = False,
    as_json: Json = False,
) -> None:
    """Write a complete, commented session spec (every field, its default, its range)."""
    text = specmod.template()

    def go() -> dict[str, Any]:
        if file is None:
            return {"spec": text}
        if file.exists() and not force:
            raise FednodeError(f"{file} exists", code="USAGE", hint="pass --force to overwrite")
        file.write_text(text)
        return {"path": str(file)}

    def human(r: dict[str, Any]) -> None:
        if file is None:
            sys.stdout.write(text)
        else:
            stderr.print(line("wrote ", str(file)))

    run(_json(as_json), go, human)


@session_app.command("create")
def session_create(spec: Path, as_json: Json = False) -> None:
    """Validate a spec (TOML or JSON) and create the session; prints its session_id."""

    def go() -> dict[str, Any]:
        checked = specmod.load(spec)  # refuse bad specs before dialling anyone
        return call(G.target, Op.SESSION_CREATE, spec=checked)

    run(_json(as_json), go, lambda r: stdout.print(plain(r["session_id"])))


def _action(action: str, session_id: str, as_json: bool) -> None:
    run(
        _json(as_json),
        lambda: call(G.target, f"session.{action}", session_id=session_id),
        lambda r: stdout.print(line(f"{r['session_id']}: {r['status']}")),
    )


@session_app.command("start")
def session_start(session_id: str, as_json: Json = False) -> None:
    """Start a created session."""
    _action("start", session_id, as_json)


@session_app.command("stop")
def session_stop(session_id: str, as_json: Json = False) -> None:
    """Stop a session; the round in flight is recorded as aborted."""
    _action("stop", session_id, as_json)


@session_app.command("pause")
def session_pause(session_id: str, as_json: Json = False) -> None:
    """Pause after the round in flight."""
    _action("pause", session_id, as_json)


@session_app.command("resume")
def session_resume(session_id: str, as_json: Json = False) -> None:
    """Resume a paused session."""
    _action("resume", session_id, as_json)


@session_app.command("rollback")
def session_rollback(
    session_id: str,
    to_round: Annotated[
        int, typer.Option("--to-round", min=0, help="the round whose model the next round uses")
    ],
    as_json: Json = False,
) -> None:
    """Go back to an earlier round's model (running or paused session; between rounds)."""

    def human(r: dict[str, Any]) -> None:
        when = "now" if r["applied"] else "before the next round"
        stdout.print(
            line(f"{r['session_id']}: back to round {r['to_round']}'s model {r['to_cid']} ({when})")
        )

    run(
        _json(as_json),
        lambda: call(G.target, Op.SESSION_ROLLBACK, session_id=session_id, round=to_round),
        human,
    )


@session_app.command("status")
def session_status(session_id: str, as_json: Json = False) -> None:
    """State, rounds, participants, the task's metrics and the per-round history."""
    run(
        _json(as_json),
        lambda: call(G.target, Op.SESSION_STATUS, session_id=session_id),
        print_summary,
    )


@session_app.command("list")
def session_list(as_json: Json = False) -> None:
    """Every session the coordinator knows."""

    def human(r: dict[str, Any]) -> None:
        t = Table("session", "name", "status", "round", "participants", "metrics")
        for s in r["sessions"]:
            acc = metrics_text(s.get("metrics"), s["accuracy"])
            t.add_row(
                plain(s["session_id"]),
                plain(s["name"]),
                plain(s["status"]),
                plain(f"{s['round']}/{s['rounds']}"),
                plain(s["participants"]),
                plain(acc),
            )
        stdout.print(t)

    run(_json(as_json), lambda: call(G.target, Op.SESSION_LIST), human)


@session_app.command("watch")
def session_watch(session_id: str, as_json: Json = False) -> None:
    """Live progress until the session ends (JSON lines with --json)."""
    as_json = _json(as_json)

    async def go() -> dict[str, Any]:
        async with AdminClient(G.target) as client:
            snap = (await client.call(Op.SUBSCRIBE, session_id=session_id))["snapshot"]
            status = snap["session"]["status"]
            if as_json:
                emit_json({"kind": "snapshot", "session_id": session_id, "data": snap})
            else:
                stderr.print(
                    line(
                        f"watching {session_id}: {status}, round "
                        f"{snap['session']['rounds_completed']}/{snap['session']['rounds']}"
                    )
                )
            if is_terminal(status):
                return snap["session"]
            async for ev in client.stream():
                if as_json:
                    emit_json(
                        {"kind": ev.kind, "session_id": session_id, "ts": ev.ts, "data": ev.data}
                    )
                else:
                    text = session_line(ev.kind, ev.data, snap["session"]["rounds"])
                    if text is not None:
                        stdout.print(text)
                event = parse_event(ev.kind, ev.data)
                if isinstance(event, SessionEvent) and is_terminal(event.status):
                    return await client.call(Op.SESSION_STATUS, session_id=session_id)
            raise FednodeError("the coordinator went away", code="DISCONNECTED")

    def wrapped() -> dict[str, Any]:
        return asyncio.run(go())

    if as_json:  # streaming: lines were printed already; only errors remain
        try:
            wrapped()
        except FednodeError as err:
            fail(err, True)
        return
    run(False, wrapped, print_summary)


# --- participants, models, ledger -------------------------------------------------------


@participants_app.command("list")
def participants_list(
    sort: Annotated[
        str, typer.Option(help="peer_id, score, last_seen, rounds, latency or uptime")
    ] = "peer_id",
    desc: Annotated[bool, typer.Option("--desc", help="largest first")] = False,
    limit: Annotated[int, typer.Option(min=1, help="rows on this page")] = 100,
    offset: Annotated[int, typer.Option(min=0, help="rows to skip (the next page)")] = 0,
    online: Annotated[bool, typer.Option("--online", help="only the peers connected now")] = False,
    status: Annotated[
        str | None, typer.Option(help="only this status: active, alerted or excluded")
    ] = None,
    as_json: Json = False,
) -> None:
    """Peers seen: online or not, quality score, latency, last seen; a page at a time, with
    a summary of all of them."""
    args: dict[str, Any] = {"sort": sort, "desc": desc, "limit": limit, "offset": offset}
    if online:
        args["online"] = True
    if status is not None:
        args["status"] = status

    def human(r: dict[str, Any]) -> None:
        stdout.print(participants_table(r["participants"]))
        stdout.print(participants_summary(r))

    run(_json(as_json), lambda: call(G.target, Op.PARTICIPANTS_LIST, **args), human)


def participants_summary(r: dict[str, Any]) -> Text:
    """'rows 1-100 of 1,000 · seen 1,000, online 998 · active 990, alerted 8, excluded 2 ·
    score min 41.0, median 82.1, max 97.3'."""
    n, first, s = len(r["participants"]), r.get("offset", 0) + 1, r.get("summary") or {}
    parts = [f"rows {first}-{first + n - 1} of {r.get('total', n):,}" if n else "no rows"]
    if s:
        parts.append(f"seen {s['seen']:,}, online {s['online']:,}")
        parts.append(", ".join(f"{k} {v:,}" for k, v in sorted(s["status"].items())))
        if s.get("score"):
            sc = s["score"]
            parts.append(
                f"score min {sc['min']:.1f}, median {sc['median']:.1f}, max {sc['max']:.1f}"
            )
    return plain(" · ".join(p for p in parts if p), "dim")


def participants_table(rows: list[dict[str, Any]]) -> Table:
    t = Table(
        "peer", "dataset", "online", "status", "score", "uptime", "latency", "rounds", "last seen"
    )
    for p in rows:
        status = str(p["status"])
        t.add_row(
            plain(p["peer_id"]),
            plain(p.get("dataset")),  # what the participant declared: its words, literally
            plain("yes", "green") if p["online"] else plain("no", "red"),
            plain(status, "red" if status in ("excluded", "alerted") else ""),
            plain(_fmt(p.get("quality_score"), "{:.1f}")),
            plain(_fmt(p.get("uptime"), "{:.1f} %")),
            plain(_fmt(p.get("latency_ms"), "{:.1f} ms")),
            plain(p.get("rounds_completed") or 0),
            plain(_clock(p["last_seen"])),
        )
    return t


def _fmt(value: Any, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _clock(ts: Any) -> str:
    """HH:MM:SS (UTC) of a unix time; "" for none or for a value that is not a time."""
    from datetime import UTC, datetime

    if not ts or isinstance(ts, bool) or not isinstance(ts, int | float):
        return ""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return ""


def alerts_table(rows: list[dict[str, Any]]) -> Table:
    t = Table("id", "severity", "type", "entity", "status", "since", "message")
    for a in rows:
        sev = str(a["severity"])
        t.add_row(
            plain(a["id"]),
            plain(sev, SEVERITY_STYLE.get(sev, "")),
            plain(a["alert_type"]),
            plain(a["entity_id"]),
            plain(a["status"]),
            plain(_clock(a["created_at"])),
            plain(a["message"]),  # may quote a peer's words (security violations)
        )
    return t


@alerts_app.command("list")
def alerts_list(
    severity: Annotated[
        str, typer.Option(help="only these severities: critical, high, medium, low (comma list)")
    ] = "",
    status: Annotated[
        str, typer.Option(help="active (open + acknowledged), open, acknowledged, resolved, all")
    ] = "active",
    session: Annotated[str, typer.Option(help="only alerts of this session")] = "",
    as_json: Json = False,
) -> None:
    """Quality and security alerts, newest first (active ones by default)."""
    wanted = [s.strip().lower() for s in severity.split(",") if s.strip()]

    def human(r: dict[str, Any]) -> None:
        stdout.print(alerts_table(r["alerts"]) if r["alerts"] else plain("no alerts"))

    run(
        _json(as_json),
        lambda: call(G.target, Op.ALERTS_LIST, severity=wanted, status=status, session_id=session),
        human,
    )


@alerts_app.command("ack")
def alerts_ack(alert_id: int, as_json: Json = False) -> None:
    """Acknowledge an alert (a critical one then no longer keeps its peer out of rounds)."""
    run(
        _json(as_json),
        lambda: call(G.target, Op.ALERTS_ACK, alert_id=alert_id),
        lambda r: stdout.print(line(f"alert {r['alert']['id']}: {r['alert']['status']}")),
    )


@quality_app.command("session")
def quality_session(session_id: str, as_json: Json = False) -> None:
    """The session's health score and its parts, per round."""

    def human(r: dict[str, Any]) -> None:
        t = Table(
            "round",
            "health",
            "convergence",
            "participants",
            "integrity",
            "network",
            "security",
            "privacy",
            "retention",
            "stability",
        )
        for q in r["rounds"]:
            t.add_row(
                plain(q["round"]),
                *(
                    plain(_fmt(q[key], "{:.1f}"))
                    for key in (
                        "health_score",
                        "convergence",
                        "participant_quality",
                        "data_integrity",
                        "network_efficiency",
                        "security_score",
                        "privacy_compliance",
                        "participant_retention",
                        "model_stability",
                    )
                ),
            )
        stdout.print(t)
        health = r["health_score"]
        stdout.print(line(f"health {_fmt(health, '{:.1f}') or 'not measured yet'}"))

    run(_json(as_json), lambda: call(G.target, Op.QUALITY_SESSION, session_id=session_id), human)


def _report_data(session_id: str, data_dir: Path | None) -> dict[str, Any]:
    """The session report's data: from the coordinator, or from its ledger read offline
    (``--data-dir``, e.g. after `fedctl demo`)."""
    if data_dir is None:
        return call(G.target, Op.REPORT, session_id=session_id)
    from fednode.api import Ledger, NodeHome, build_report

    path = NodeHome(data_dir).ledger_path
    if not path.exists():
        raise FednodeError(f"no ledger at {path}", code="NOT_FOUND")
    with Ledger(path) as ledger:
        return build_report(ledger, session_id)


@app.command()
def report(
    session_id: str,
    format: Annotated[str, typer.Option("--format", help="text, json or html")] = "text",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="file to write")] = None,
    data_dir: OfflineLedger = None,
    as_json: Json = False,
) -> None:
    """The session report: summary, accuracy and loss per round, quality, peers, alerts."""
    from fedctl.report import render_html, render_text

    if format not in ("text", "json", "html"):
        fail(
            FednodeError(
                f"--format {format!r} is not one of text, json, html",
                code="USAGE",
                hint="for example --format html -o report.html",
            ),
            _json(as_json),
        )
        return

    def go() -> dict[str, Any]:
        rep = _report_data(session_id, data_dir)
        if format == "json":
            text = json.dumps(rep, indent=2, sort_keys=True)
        elif format == "html":
            text = render_html(rep)
        else:
            text = render_text(rep)
        if output is not None:
            output.write_text(text, encoding="utf-8")
            return {"path": str(output), "format": format, "bytes": len(text.encode())}
        return {"format": format, "report": rep, "text": text}

    def human(r: dict[str, Any]) -> None:
        if output is not None:
            stderr.print(line(f"wrote {r['bytes']:,} bytes ({r['format']}) to {r['path']}"))
        else:
            sys.stdout.write(r["text"] + ("" if r["text"].endswith("\n") else "\n"))

    run(_json(as_json), go, human)


@app.command()
def privacy(
    session_id: str,
    data_dir: OfflineLedger = None,
    as_json: Json = False,
) -> None:
    """What local DP-SGD has spent: per participant ε, δ, noise multiplier, sample rate,
    steps, accountant and its own --max-epsilon; the session's ε (the largest)."""

    def go() -> dict[str, Any]:
        rep = _report_data(session_id, data_dir)
        return {"session_id": session_id, **(rep.get("privacy") or {})}

    def human(r: dict[str, Any]) -> None:
        target = _fmt(r.get("target_epsilon"), "{:g}") or "-"
        stdout.print(
            line(
                f"privacy.mode {r.get('mode', 'none')}, target ε {target} at δ "
                f"{_fmt(r.get('delta'), '{:g}') or '-'}; session ε "
                f"{_fmt(r.get('epsilon'), '{:.3f}') or 'none reported'}"
            )
        )
        t = Table(
            "peer_id",
            "epsilon",
            "delta",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "accountant",
            "max_epsilon",
            "spent_epsilon",
        )
        for p in r.get("participants") or []:
            t.add_row(
                plain(p.get("peer_id")),
                plain(_fmt(p.get("epsilon"), "{:.3f}")),
                plain(_fmt(p.get("delta"), "{:g}")),
                plain(_fmt(p.get("noise_multiplier"), "{:.4f}")),
                plain(_fmt(p.get("sample_rate"), "{:.4f}")),
                plain(_fmt(p.get("steps"), "{}")),
                plain(p.get("accountant") or ""),
                plain(_fmt(p.get("max_epsilon"), "{:g}")),
                plain(_fmt(p.get("spent_epsilon"), "{:.3f}")),
            )
        stdout.print(t)
        for d in r.get("declined") or []:
            who = f"round {d.get('round')}: {d.get('peer_id')} declined: {d.get('message')}"
            stdout.print(line(who))

    run(_json(as_json), go, human)


def _exclusion(op: str, peer_id: str, reason: str, as_json: bool) -> None:
    run(
        _json(as_json),
        lambda: call(G.target, op, peer_id=peer_id, reason=reason),
        lambda r: stdout.print(
            line(f"{r['participant']['peer_id']}: {r['participant']['status']}")
        ),
    )


@participants_app.command("exclude")
def participants_exclude(
    peer_id: str,
    reason: Annotated[str, typer.Option(help="why, for the ledger")] = "",
    as_json: Json = False,
) -> None:
    """Keep a participant out of every session's selection until it is readmitted."""
    _exclusion(Op.PARTICIPANTS_EXCLUDE, peer_id, reason, as_json)


@participants_app.command("readmit")
def participants_readmit(peer_id: str, as_json: Json = False) -> None:
    """Let an excluded participant be selected again."""
    _exclusion(Op.PARTICIPANTS_READMIT, peer_id, "", as_json)


@model_app.command("describe")
def model_describe(spec: Path, as_json: Json = False) -> None:
    """Validate a spec (TOML or JSON) and print its model: each layer's output shape and
    parameters, then the totals. Needs no node."""
    from protocol import modelspec
    from protocol.modelspec import format_size

    def go() -> dict[str, Any]:
        checked = specmod.load(spec)
        model = {k: checked["model"][k] for k in modelspec.MODEL_KEYS}
        return modelspec.describe(model, checked["training"])

    def human(r: dict[str, Any]) -> None:
        stdout.print(line(f"kind {r['kind']}, task {r['task']}, input shape {r['input_shape']}"))
        if "tensors" in r:  # a python model: its fingerprint's tensors, nothing imported
            stdout.print(line(f"factory {r['factory']}, args {r['args']}"))
            t = Table("tensor", "dtype", "shape", "parameters")
            for tensor in r["tensors"]:
                t.add_row(
                    plain(tensor["name"]),
                    plain(tensor["dtype"]),
                    plain(str(tensor["shape"])),
                    plain(f"{tensor['params']:,}"),
                )
        else:
            t = Table("index", "type", "output shape", "parameters")
        for layer in r["layers"]:
            t.add_row(
                plain(layer["index"]),
                plain(layer["type"]),
                plain(str(layer["output_shape"])),
                plain(f"{layer['params']:,}"),
            )
        stdout.print(t)
        stdout.print(
            line(
                f"parameters {r['params']:,} ({format_size(r['bytes'])} as float32); training "
                f"memory at batch_size {r['batch_size']}: {format_size(r['training_memory'])} "
                f"+ {r['data_bytes_per_example']:,} bytes per local example"
            )
        )

    run(_json(as_json), go, human)


@model_app.command("list")
def model_list(session_id: str, as_json: Json = False) -> None:
    """Every round's global model of a session: round, CID, parent, metrics, size, status."""

    def human(r: dict[str, Any]) -> None:
        t = Table("round", "cid", "parent", "metrics", "size", "status")
        style = {"current": "green", "rolled_back": "red"}
        for m in r["models"]:
            acc = metrics_text(m.get("metrics"), m["accuracy"])
            parent = "…" + str(m["parent_cid"])[-8:] if m.get("parent_cid") else ""
            status = str(m.get("status", "")).replace("_", " ")
            if m.get("rolled_back_to") is not None:
                status += f" (to round {m['rolled_back_to']})"
            t.add_row(
                plain(m["round"]),
                plain(m["cid"]),
                plain(parent),
                plain(acc),
                plain(f"{m['size']:,}"),
                plain(status, style.get(str(m.get("status")), "")),
            )
        stdout.print(t)

    run(_json(as_json), lambda: call(G.target, Op.MODEL_LIST, session_id=session_id), human)


def _offline_store(data_dir: Path) -> Any:
    """A stopped node's embedded store, read in place (what `--data-dir` means for models)."""
    from fednode.api import BlockStore, NodeHome

    return BlockStore(NodeHome(data_dir).store_root)


@model_app.command("get")
def model_get(
    cid: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="file to write")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="read from this node's store offline instead of asking the coordinator"),
    ] = None,
    as_json: Json = False,
) -> None:
    """Fetch a model by CID, verify its hash, and write it (safetensors)."""
    from protocol.cid import file_cid
    from protocol.errors import CIDError

    def go() -> dict[str, Any]:
        if data_dir is not None:
            data = _offline_store(data_dir).get(cid)
        else:
            data = call(G.target, Op.MODEL_GET, cid=cid)["data"]
        if file_cid(data) != cid:
            raise CIDError(f"the bytes received do not hash to {cid}")
        output.write_bytes(data)
        return {"cid": cid, "path": str(output), "size": len(data)}

    run(
        _json(as_json),
        go,
        lambda r: stderr.print(line(f"wrote {r['size']:,} bytes to {r['path']}")),
    )


@model_app.command("export")
def model_export(
    cid: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="the CAR file to write")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="read from this node's store offline instead of asking the coordinator"),
    ] = None,
    as_json: Json = False,
) -> None:
    """Write a model's whole DAG as a CAR v1 file (`ipfs dag import` takes it), verified."""
    from protocol.car import encode_car, walk_dag
    from protocol.cid import Block, normalize_cid, unixfs_file_size, verify_block
    from protocol.errors import CIDError

    def go() -> dict[str, Any]:
        root = normalize_cid(cid)
        if data_dir is not None:
            blocks = list(walk_dag(root, _offline_store(data_dir).get_block))
        else:
            reply = call(G.target, Op.MODEL_EXPORT, cid=root)
            try:
                got = {normalize_cid(b["cid"]): bytes(b["data"]) for b in reply["blocks"]}
            except (KeyError, TypeError) as exc:
                raise FednodeError(
                    f"malformed model.export reply: {exc}", code="BAD_REPLY"
                ) from None

            def block(key: str) -> bytes:  # trust nothing: the DAG must be whole and verify
                if key not in got:
                    raise CIDError(f"the coordinator's export of {root} lacks block {key}")
                verify_block(key, got[key])
                return got[key]

            blocks = [Block(b.cid, b.data) for b in walk_dag(root, block)]
        car = encode_car(root, blocks)
        output.write_bytes(car)
        return {
            "cid": root,
            "path": str(output),
            "blocks": len(blocks),
            "size": len(car),
            "file_size": unixfs_file_size(root, blocks[0].data),
        }

    run(
        _json(as_json),
        go,
        lambda r: stderr.print(
            line(f"wrote {r['blocks']} blocks ({r['size']:,} bytes) to {r['path']}")
        ),
    )


@ledger_app.command("verify")
def ledger_verify(
    data_dir: Annotated[Path | None, typer.Option(help="the node's directory")] = None,
    as_json: Json = False,
) -> None:
    """Check the ledger's event hash chain (offline, on the node's data dir)."""
    from fednode.api import Ledger, NodeHome

    def go() -> dict[str, Any]:
        path = NodeHome(data_dir).ledger_path
        if not path.exists():
            raise FednodeError(f"no ledger at {path}", code="NOT_FOUND")
        with Ledger(path) as ledger:
            ok, bad = ledger.verify_chain()
            count = ledger.event_count()
        if not ok:
            raise FednodeError(
                f"the ledger's hash chain breaks at event {bad}",
                code="LEDGER_TAMPERED",
                hint="the ledger was edited outside fednode; keep a copy",
            )
        return {"ledger": str(path), "events": count, "intact": True}

    run(
        _json(as_json),
        go,
        lambda r: stdout.print(
            line(("intact", "green"), f": {r['events']} events in {r['ledger']}")
        ),
    )


@export_app.command("mlflow")
def export_mlflow(
    session_id: str,
    tracking_uri: Annotated[
        str,
        typer.Option(
            "--tracking-uri",
            envvar="MLFLOW_TRACKING_URI",
            help="the MLflow tracking store: http(s)://HOST:PORT, sqlite:///PATH, file:PATH",
        ),
    ],
    experiment: Annotated[
        str, typer.Option(help="the MLflow experiment (created if missing)")
    ] = "fednode",
    artifact_location: Annotated[
        str,
        typer.Option(help="where a new experiment keeps its artifacts (default: the store's own)"),
    ] = "",
    data_dir: OfflineLedger = None,
    as_json: Json = False,
) -> None:
    """A session as one MLflow run: the spec as parameters, each round's metrics (step =
    the round), the model as an artifact with its CID as a tag. Needs `fednode[mlflow]`."""
    from fedctl.mlflow_export import check_session_id, export_run
    from protocol.cid import file_cid
    from protocol.errors import CIDError

    def go() -> dict[str, Any]:
        check_session_id(session_id)
        rep = _report_data(session_id, data_dir)
        cid = rep["session"].get("model_cid")
        model = None
        if cid:
            if data_dir is not None:
                model = _offline_store(data_dir).get(cid)
            else:
                model = bytes(call(G.target, Op.MODEL_GET, cid=cid)["data"])
            if file_cid(model) != cid:
                raise CIDError(f"the model's bytes do not hash to {cid}")
        return export_run(
            rep,
            model,
            tracking_uri=tracking_uri,
            experiment=experiment,
            artifact_location=artifact_location,
            source="ledger" if data_dir is not None else "coordinator",
            coordinator=G.target.coordinator_id if data_dir is None else "",
        )

    def human(r: dict[str, Any]) -> None:
        stdout.print(
            line(
                f"run {r['run_id']} in experiment {r['experiment']} ({r['tracking_uri']}): "
                f"{r['params']} params, {r['rounds']} rounds ({r['metrics']} metric points), "
                f"{len(r['artifacts'])} artifacts"
            )
        )
        for key in r["truncated"]:
            stderr.print(line(f"param {key} was cut to MLflow's limit; fednode/spec.json has it"))

    run(_json(as_json), go, human)


@audit_app.command("privacy")
def audit_privacy(
    session_id: str,
    members: Annotated[
        str,
        typer.Option(
            help="the members' training data, comma-separated sources as the participants' "
            "--dataset (default: the datasets the contributors registered, if digits shards)"
        ),
    ] = "",
    nonmembers: Annotated[
        str,
        typer.Option(
            help="held-out data of the same distribution, never trained on (default: the "
            "spec's data.dataset, for digits the test split)"
        ),
    ] = "",
    shadows: Annotated[int, typer.Option(min=2, max=64, help="shadow models to train")] = 8,
    max_eval: Annotated[
        int, typer.Option(min=0, help="at most this many members (and non-members); 0 = all")
    ] = 0,
    seed: Annotated[int, typer.Option(min=0, help="seed of the sampling and shadows")] = 0,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="a stopped coordinator's directory: read and record offline"),
    ] = None,
    as_json: Json = False,
) -> None:
    """Membership-inference audit of the session's model (shadow models and LiRA): AUC,
    attack accuracy, TPR at 0.1 % and 1 % FPR; kept in the ledger, shown by `fedctl report`."""
    from fednode.api import privacy_audit

    def go() -> dict[str, Any]:
        options: dict[str, Any] = {
            "members": [m.strip() for m in members.split(",") if m.strip()] or None,
            "nonmembers": nonmembers.strip(),
            "shadows": shadows,
            "max_eval": max_eval,
            "seed": seed,
        }
        if data_dir is not None:
            from fednode.api import (
                BlockStore,
                Ledger,
                NodeHome,
                audit_inputs,
                record_audit_offline,
            )

            home = NodeHome(data_dir)
            if not home.ledger_path.exists():
                raise FednodeError(f"no ledger at {home.ledger_path}", code="NOT_FOUND")
            home.lock()  # refuses while the node runs: its ledger is its own to write
            try:
                with Ledger(home.ledger_path) as ledger:
                    inputs = audit_inputs(ledger, session_id)
                    model = _audited_model(inputs, BlockStore(home.store_root).get)
                    record = privacy_audit(inputs, model, **options)
                    record_audit_offline(ledger, session_id, record)
            finally:
                home.unlock()
        else:
            inputs = call(G.target, Op.AUDIT_INPUTS, session_id=session_id)
            model = _audited_model(
                inputs, lambda cid: call(G.target, Op.MODEL_GET, cid=cid)["data"]
            )
            record = privacy_audit(inputs, model, **options)
            call(G.target, Op.AUDIT_RECORD, session_id=session_id, audit=record)
        return {"session_id": session_id, **record}

    def human(r: dict[str, Any]) -> None:
        stdout.print(
            line(
                f"model {r['model_cid']}: {r['members']} members ({r['members_data']}) against "
                f"{r['nonmembers']} non-members ({r['nonmembers_data']}), "
                f"{r['shadow_models']} shadow models"
            )
        )
        t = Table("attack", "AUC", "accuracy", "TPR @ 0.1 % FPR", "TPR @ 1 % FPR")
        for name, f in r["attacks"].items():
            t.add_row(
                plain(name),
                plain(f"{f['auc']:.3f}"),
                plain(f"{f['accuracy']:.3f}"),
                plain(f"{f['tpr_at_0_1pct_fpr']:.3f}"),
                plain(f"{f['tpr_at_1pct_fpr']:.3f}"),
            )
        stdout.print(t)
        stdout.print(
            line(
                f"model accuracy on members {r['member_accuracy']:.3f}, on non-members "
                f"{r['nonmember_accuracy']:.3f}; smallest FPR measurable {r['fpr_floor']:.4f}"
            )
        )

    run(_json(as_json), go, human)


def _audited_model(inputs: dict[str, Any], get: Any) -> bytes:
    """The session's current model, its bytes checked against its CID."""
    from protocol.cid import file_cid
    from protocol.errors import CIDError

    cid = inputs.get("model_cid")
    if not cid:
        raise FednodeError(f"session {inputs['session_id']} has no model yet", code="BAD_STATE")
    data = bytes(get(cid))
    if file_cid(data) != cid:
        raise CIDError(f"the bytes received do not hash to {cid}")
    return data


@app.command()
def dashboard(
    session: Annotated[
        str | None, typer.Option("--session", help="open this session's screen directly")
    ] = None,
) -> None:
    """The live Textual dashboard: sessions, rounds, participants, alerts, events."""

    def go() -> dict[str, Any]:
        from tui.app import DashboardApp
        from tui.source import AdminSource

        G.target.check()  # a missing --coordinator is a usage error, before any screen
        DashboardApp(AdminSource(G.target), session_id=session).run()
        return {}

    run(False, go)


def main() -> None:
    # fedctl writes the operator's key, reports and the demo's node homes: its user's alone.
    os.umask(PRIVATE_UMASK)
    app()


if __name__ == "__main__":
    main()
