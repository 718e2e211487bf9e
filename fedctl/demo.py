"""`fedctl demo`: a real federation on this machine.

A coordinator and N participants run as separate `fednode` processes on 127.0.0.1, each
with its own data directory, key and ledger; fedctl drives them over the admin channel as
an operator, exactly as across machines. Every process started here is stopped on the way
out (normal end, error or Ctrl-C), and, on Linux, also if fedctl itself is killed: the
children ask the kernel for SIGTERM when their parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedctl.client import AdminClient, Target, call, operator_identity
from fedctl.output import line, stderr, stdout
from fedctl.render import session_line
from fednode.api import NodeHome, default_home, parse_attack, private_dir
from protocol import events
from protocol import spec as specmod
from protocol.errors import FednodeError, UsageError
from protocol.lifecycle import is_terminal
from protocol.operations import Op

READY_TIMEOUT_S = 60.0
JOIN_TIMEOUT_S = 120.0
_MARKER = ".fednode-demo"
# Participants that --drop will kill are slowed by this much, so the kill lands while the
# round they were selected for is still waiting on them.
DROP_DELAY_S = 2.0
MAX_PROCESSES = 32  # participants as processes of their own (each imports torch)
SWARM_WORKERS = 2  # --swarm: trainings at once in the swarm process


@dataclass
class DemoOptions:
    participants: int = 3
    rounds: int = 10
    spec_path: Path | None = None
    secure: bool = False
    drop: int = 0
    attackers: int = 0  # the last N participants run with `fednode run --attack ATTACK`
    attack: str = ""
    strategy: str = ""  # aggregation.strategy, over the defaults or --spec ("" = as is)
    partition: str = ""  # data.partition, likewise
    codec: str = ""  # compression.codec, likewise
    downlink: str = ""  # compression.downlink, likewise
    workdir: Path | None = None
    swarm: bool = False  # the participants as one `fednode swarm` process
    key: Path | None = None
    as_json: bool = False


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Processes:
    """Every child process the demo started; ``stop_all`` ends them all."""

    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: list[IO[bytes]] = field(default_factory=list)
    killed: set[str] = field(default_factory=set)

    def start(
        self, name: str, args: list[str], *, pipe_stdout: bool = False
    ) -> subprocess.Popen[bytes]:
        fh = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        self.logs.append(fh)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fednode", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else fh,
            stderr=fh,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        self.procs[name] = proc
        return proc

    def start_coordinator(
        self,
        home: NodeHome,
        operator_id: str,
        *extra: str,
        listen: str = "127.0.0.1:0",
        name: str = "coordinator",
    ) -> dict[str, Any]:
        """A coordinator (by default on a free loopback port); returns its ready line (url,
        peer_id). ``listen`` and ``name`` let a test restart it where participants look."""
        proc = self.start(
            name,
            [
                "run",
                "--role",
                "coordinator",
                "--listen",
                listen,
                "--data-dir",
                str(home.root),
                "--operator",
                operator_id,
                *extra,
            ],
            pipe_stdout=True,
        )
        return read_ready_line(proc, "the coordinator", self.log_dir / f"{name}.log")

    def start_participant(
        self, name: str, home: NodeHome, ready: dict[str, Any], dataset: str, *extra: str
    ) -> None:
        self.start(
            name,
            [
                "run",
                "--role",
                "participant",
                "--coordinator",
                ready["url"],
                "--coordinator-id",
                ready["peer_id"],
                "--data-dir",
                str(home.root),
                "--dataset",
                dataset,
                *extra,
            ],
        )

    def start_swarm(
        self, root: Path, ready: dict[str, Any], participants: int, *extra: str, name: str = "swarm"
    ) -> dict[str, Any]:
        """`fednode swarm`: ``participants`` virtual participants in one process, their
        homes under ``root``; returns its ready line (peer_ids, peers_file)."""
        proc = self.start(
            name,
            [
                "swarm",
                "--participants",
                str(participants),
                "--coordinator",
                ready["url"],
                "--coordinator-id",
                ready["peer_id"],
                "--data-dir",
                str(root),
                *extra,
            ],
            pipe_stdout=True,
        )
        return read_ready_line(proc, "the swarm", self.log_dir / f"{name}.log")

    def kill(self, name: str) -> None:
        self.killed.add(name)
        self.procs[name].kill()

    def stop_all(self, grace_s: float = 5.0) -> None:
        self.killed.update(self.procs)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for fh in self.logs:
            fh.close()


def read_ready_line(proc: subprocess.Popen[bytes], name: str, log: Path) -> dict[str, Any]:
    """The JSON line a node prints on stdout once it listens; fails with its log if it dies."""
    box: list[bytes] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(READY_TIMEOUT_S)
    line = box[0] if box else b""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise FednodeError(
            f"{name} did not start (exit code {proc.poll()}):\n{tail}",
            code="NODE_START_FAILED",
            hint=f"see {log}",
        ) from None


def _prepare_workdir(workdir: Path | None) -> Path:
    root = workdir or default_home() / "demo"
    if root.exists() and any(root.iterdir()):
        if not (root / _MARKER).exists():
            raise FednodeError(
                f"{root} is not empty and not a demo directory",
                code="USAGE",
                hint="choose another --workdir",
            )
        shutil.rmtree(root)
    private_dir(root)  # the demo nodes' homes, keys and ledgers
    (root / _MARKER).write_text("made by fedctl demo; wiped by the next demo\n")
    (root / "logs").mkdir()
    return root


def build_spec(opts: DemoOptions) -> dict[str, Any]:
    if opts.spec_path is not None:
        raw = specmod.load(opts.spec_path)
    else:
        raw = specmod.defaults()
        raw["rounds"] = opts.rounds
        raw["min_participants"] = opts.participants - opts.drop
        raw["name"] = "demo"
        if opts.secure:
            raw["aggregation"]["secure"] = True
    if opts.strategy:  # validated with the rest: an unknown name is SPEC_INVALID
        raw["aggregation"]["strategy"] = opts.strategy
    if opts.spec_path is None:
        _assume_attackers(raw, opts)
    if opts.partition:
        raw["data"]["partition"] = opts.partition
    for key in ("codec", "downlink"):
        if getattr(opts, key):
            raw.setdefault("compression", {})[key] = getattr(opts, key)
    return specmod.validate(raw)


def _assume_attackers(raw: dict[str, Any], opts: DemoOptions) -> None:
    """Sized for --attackers, as an operator would size a session for the attackers it
    fears (never told who they are): outlier detection quarantines them, so a round must go
    on with the honest alone (min_participants), and a robust strategy is told how many may
    attack (Krum's and Bulyan's num_malicious, the trimmed mean's beta), within what the
    honest participants allow (Krum: 2f + 3 updates, Bulyan: 4f + 3, beta < 0.5)."""
    n, f = opts.participants - opts.drop, opts.attackers
    if not f:
        return
    honest = max(1, n - f)
    agg = raw["aggregation"]
    raw["min_participants"] = honest
    if agg["strategy"] in ("krum", "multikrum"):
        agg["num_malicious"] = max(0, min(f, (honest - 3) // 2))
    elif agg["strategy"] == "bulyan":
        agg["num_malicious"] = max(0, min(f, (honest - 3) // 4))
    elif agg["strategy"] == "trimmed_mean":
        agg["beta"] = min(0.49, (f + 0.5) / n)  # cuts int(beta·n) = f from each end


def check_attack(opts: DemoOptions) -> None:
    """--attackers and --attack go together, and leave at least one honest participant."""
    if opts.attackers and not opts.attack:
        raise UsageError(
            f"--attackers {opts.attackers} needs --attack KIND", hint="e.g. --attack sign_flip"
        )
    if opts.attack and not opts.attackers:
        raise UsageError(
            f"--attack {opts.attack!r} needs --attackers N (how many participants attack)"
        )
    if opts.attackers >= opts.participants:
        raise UsageError(
            f"--attackers {opts.attackers} leaves no honest participant of {opts.participants}",
            hint="use fewer attackers than --participants",
        )
    if opts.attack:
        parse_attack(opts.attack)  # a bad KIND fails here, before any process starts


def check_swarm(opts: DemoOptions) -> None:
    """Past MAX_PROCESSES participants only as a swarm; a swarm's participants share one
    process, so none of them can be killed (--drop) or started to attack (--attackers)."""
    if not opts.swarm and opts.participants > MAX_PROCESSES:
        raise UsageError(
            f"--participants {opts.participants}: at most {MAX_PROCESSES} as processes",
            hint="add --swarm to run them as virtual participants of one process (up to 1000)",
        )
    if opts.swarm and (opts.drop or opts.attackers):
        raise UsageError(
            "--swarm runs every participant in one process: --drop and --attackers need "
            "processes of their own",
            hint="leave out --swarm, or --drop and --attackers",
        )


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    check_swarm(opts)
    if opts.drop >= opts.participants:
        raise FednodeError(
            f"--drop {opts.drop} leaves no participant of {opts.participants}",
            code="USAGE",
            hint="drop fewer than --participants",
        )
    check_attack(opts)
    spec = build_spec(opts)  # a bad spec fails here, before any process starts
    root = _prepare_workdir(opts.workdir)
    operator = operator_identity(opts.key)
    procs = Processes(root / "logs")
    try:
        coord_home = NodeHome(root / "coordinator")
        coord_id, _ = coord_home.init()
        ready = procs.start_coordinator(coord_home, operator.peer_id)
        target = Target(ready["url"], coord_id.peer_id, opts.key)
        # The session first, then an invite for exactly N participants: they join with it.
        sid = call(target, Op.SESSION_CREATE, spec=spec)["session_id"]
        token = call(
            target, Op.INVITE_CREATE, session_id=sid, uses=opts.participants, expires_s=3600.0
        )["token"]
        names = []
        attackers = []  # peer IDs: the coordinator is not told; the summary says who they were
        if opts.swarm:
            procs.start_swarm(
                root / "swarm",
                ready,
                opts.participants,
                "--join-token",
                token,
                "--workers",
                str(SWARM_WORKERS),
            )
        for k in range(0 if opts.swarm else opts.participants):
            home = NodeHome(root / f"participant-{k}")
            ident, _ = home.init()
            name = f"participant-{k}"
            extra = ["--join-token", token]
            if k >= opts.participants - opts.drop:
                extra += ["--train-delay", str(DROP_DELAY_S)]
            if k >= opts.participants - opts.attackers:
                extra += ["--attack", opts.attack]
                attackers.append(ident.peer_id)
            procs.start_participant(name, home, ready, f"digits:{k}/{opts.participants}", *extra)
            names.append(name)
        out = stderr if opts.as_json else stdout
        out.print(
            line(
                f"coordinator {coord_id.peer_id} at {ready['url']}; "
                f"{opts.participants} participants{' in one swarm' if opts.swarm else ''}; "
                f"nodes in {root}"
            )
        )
        if attackers:
            out.print(
                line(
                    (f"attackers ({opts.attack}): ", "bold yellow"),
                    ", ".join(attackers),
                    ("  (the coordinator is not told)", "dim"),
                )
            )
        summary = asyncio.run(
            _drive(target, sid, spec, opts, procs, names[len(names) - opts.drop :])
        )
        # what the coordinator found by itself: the peers its outlier detection quarantined
        alerts = call(target, Op.ALERTS_LIST, status="all", session_id=sid)["alerts"]
        found = sorted({a["entity_id"] for a in alerts if a["alert_type"] == "quarantined"})
        return {**summary, "attack": opts.attack, "attackers": attackers, "quarantined": found}
    finally:
        procs.stop_all()


async def _drive(
    target: Target,
    sid: str,
    spec: dict[str, Any],
    opts: DemoOptions,
    procs: Processes,
    to_drop: list[str],
) -> dict[str, Any]:
    """Run the session; fail at once if a node process dies that the demo did not kill."""
    main = asyncio.create_task(_session(target, sid, spec, opts, procs, to_drop))
    try:
        while True:
            # A watchdog, not synchronisation: it only turns a crashed child into an error.
            done, _ = await asyncio.wait({main}, timeout=0.25)
            if done:
                return main.result()
            for name, proc in procs.procs.items():
                if name not in procs.killed and proc.poll() is not None:
                    raise FednodeError(
                        f"{name} exited with code {proc.returncode} during the demo",
                        code="NODE_DIED",
                        hint=f"see {procs.log_dir / (name + '.log')}",
                    )
    finally:
        main.cancel()
        with contextlib.suppress(BaseException):
            await main


async def _session(
    target: Target,
    sid: str,
    spec: dict[str, Any],
    opts: DemoOptions,
    procs: Processes,
    to_drop: list[str],
) -> dict[str, Any]:
    out = stderr if opts.as_json else stdout
    async with AdminClient(target) as client:
        snap = (await client.call(Op.SUBSCRIBE))["snapshot"]
        online = {p["peer_id"] for p in snap["participants"] if p["online"]}
        try:
            async with asyncio.timeout(JOIN_TIMEOUT_S):
                while len(online) < opts.participants:
                    ev = await client.events.get()
                    if ev is None:
                        raise FednodeError("the coordinator went away", code="DISCONNECTED")
                    joined = events.parse_event(ev.kind, ev.data)
                    if isinstance(joined, events.Participant) and joined.online is not None:
                        (online.add if joined.online else online.discard)(joined.peer_id)
        except TimeoutError:
            raise FednodeError(
                f"only {len(online)} of {opts.participants} participants "
                f"joined within {JOIN_TIMEOUT_S:.0f} s",
                code="JOIN_TIMEOUT",
                hint="see the participant logs in the demo directory",
            ) from None
        await client.call(Op.SESSION_START, session_id=sid)
        rounds = spec["rounds"]
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=out,
            transient=True,
        ) as bar:
            task = bar.add_task("rounds", total=rounds)
            async for ev in client.stream():
                if ev.session_id not in ("", sid):
                    continue
                shown = session_line(ev.kind, ev.data, rounds)  # rich Text: never markup
                if shown is not None:
                    bar.console.print(shown)
                event = events.parse_event(ev.kind, ev.data)
                if isinstance(event, events.RoundStarted) and event.round == 2 and to_drop:
                    for name in to_drop:
                        procs.kill(name)
                        bar.console.print(line((f"killed {name} during round 2", "yellow")))
                    to_drop = []
                if isinstance(event, events.RoundCompleted):
                    bar.update(task, completed=event.round)
                if isinstance(event, events.Session) and is_terminal(event.status):
                    break
        return await client.call(Op.SESSION_STATUS, session_id=sid)
