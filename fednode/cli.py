"""`fednode`: one process per machine (init, id, run, cid)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fednode.files import PRIVATE_UMASK
from fednode.home import NodeHome
from fednode.output import emit_json, fail, plain, run, stderr, stdout
from fednode.uploads import MAX_UPLOAD_MIB, MAX_UPLOADS, ROUND_RAM_MIB, UploadSlots
from protocol.errors import FednodeError
from protocol.identity import public_key_from_peer_id
from protocol.modelspec import default_max_params, format_size

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from fednode.attacks import Attack, Probe
    from fednode.data import DatasetRef
    from fednode.health import Health
    from fednode.noisy_reports import ReportPrivacy
    from fednode.participant import Limits
    from fednode.schema import Schema
    from protocol.identity import Identity

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="A fednode node: coordinator or participant of federated sessions.",
)

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="node directory (default $FEDNODE_HOME or ~/.fednode)"),
]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


@app.command()
def init(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Create the node's identity (Ed25519, mode 0600) and data directory."""
    home = NodeHome(data_dir)

    def go() -> dict[str, object]:
        ident, created = home.init()
        return {"peer_id": ident.peer_id, "created": created, "data_dir": str(home.root)}

    run(as_json, go, lambda r: stdout.print(r["peer_id"]))


@app.command("id")
def show_id(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Print the node's peer ID (12D3KooW…)."""
    home = NodeHome(data_dir)
    run(as_json, lambda: {"peer_id": home.identity().peer_id}, lambda r: stdout.print(r["peer_id"]))


@app.command("rotate-key")
def rotate_key(data_dir: DataDir = None, as_json: Json = False) -> None:
    """Replace the node's key; the old key signs the new one so peers can follow.

    Peers that knew the old peer ID accept the new key in the handshake (the node presents
    its rotation chain), and specs or operator lists naming the old ID keep working. Stop the
    node first: a running node keeps its key until restarted.
    """
    home = NodeHome(data_dir)

    def go() -> dict[str, object]:
        home.lock()  # refuse while the node runs on this directory
        try:
            old, new = home.rotate_key()
        finally:
            home.unlock()
        return {
            "peer_id": new.peer_id,
            "previous_peer_id": old.peer_id,
            "chain_length": len(home.chain()),
        }

    run(as_json, go, lambda r: stdout.print(f"{r['previous_peer_id']} -> {r['peer_id']}"))


@app.command()
def backup(
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="the file to write (gzip; a name ending .tar: not)"),
    ],
    data_dir: DataDir = None,
    with_keys: Annotated[
        bool,
        typer.Option(
            "--with-keys", help="include the node's private key: the file then holds a secret"
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
    as_json: Json = False,
) -> None:
    """Back up the node: its ledger (SQLite's online backup: the node may be running), its
    content store's blocks (each verified) and, with --with-keys, its identity key."""
    from fednode.backup import create_backup

    def human(r: dict[str, Any]) -> None:
        stdout.print(
            plain(
                f"wrote {r['path']} ({r['size']:,} bytes): ledger (schema "
                f"{r['schema_version']}), {r['blocks']:,} blocks, {r['pins']:,} pins, "
                f"{'with' if r['with_keys'] else 'without'} the identity key"
            )
        )
        for d in r["damaged"]:
            stderr.print(plain(f"left out: block {d['block']}: {d['error']}", "yellow"))
        if r["with_keys"]:
            stderr.print(
                plain(
                    f"{r['path']} holds the node's private key: keep it as secret as the "
                    "key itself (mode 0600, encrypted at rest, never beside the node)",
                    "bold yellow",
                )
            )

    run(
        as_json,
        lambda: create_backup(NodeHome(data_dir).root, output, with_keys=with_keys, force=force),
        human,
    )


@app.command()
def restore(
    file: Annotated[Path, typer.Argument(help="the backup file (`fednode backup`)")],
    data_dir: DataDir = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="replace a non-empty --data-dir (its contents are moved aside)"
        ),
    ] = False,
    as_json: Json = False,
) -> None:
    """Restore a backup into a node directory: every member checked first (names, types,
    sizes, hashes, CIDs, the ledger), then all of it or nothing."""
    from fednode.backup import restore_backup

    def human(r: dict[str, Any]) -> None:
        stdout.print(
            plain(
                f"restored {r['data_dir']}: ledger (schema {r['schema_version']}, "
                f"{r['events']:,} events), {r['blocks']:,} blocks, {r['pins']:,} pins"
            )
        )
        if r["replaced"]:
            stderr.print(plain(f"the previous contents are in {r['replaced']}"))
        if not r["with_keys"]:
            stderr.print(
                plain(
                    f"no identity key in the backup: copy the node's identity.key (mode 0600) "
                    f"into {r['data_dir']}, or `fednode init --data-dir {r['data_dir']}` for "
                    "a new identity (a new peer ID)",
                    "yellow",
                )
            )

    run(
        as_json,
        lambda: restore_backup(file, NodeHome(data_dir).root, force=force),
        human,
    )


@app.command()
def cid(
    path: Path,
    cid_version: Annotated[
        int, typer.Option("--cid-version", help="0 (dag-pb leaves, Qm…) or 1 (raw leaves, bafy…)")
    ] = 1,
    as_json: Json = False,
) -> None:
    """The CID of a file, as `ipfs add -Q --only-hash [--cid-version=1]` prints it."""
    from protocol.cid import file_cid

    def go() -> dict[str, object]:
        if cid_version not in (0, 1):
            raise FednodeError(f"--cid-version {cid_version}: use 0 or 1", code="USAGE")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FednodeError(f"cannot read {path}: {exc.strerror}", code="USAGE") from None
        return {"cid": file_cid(data, cid_version=cid_version), "size": len(data)}

    run(as_json, go, lambda r: stdout.print(r["cid"]))


@app.command()
def fingerprint(
    factory: Annotated[str, typer.Argument(help='the model\'s factory, "package.module:function"')],
    args: Annotated[
        str, typer.Option("--args", help="the factory's keyword arguments, a JSON object")
    ] = "{}",
    as_json: Json = False,
) -> None:
    """Build a python model from local code and print its fingerprint, the line to paste under
    a spec's [model] (kind = "python"). Runs the factory named here, on this machine."""
    import json

    from protocol import fingerprint as fp

    def go() -> dict[str, object]:
        fp.check_factory(factory, "FACTORY")
        try:
            kwargs = fp.check_args(json.loads(args), "--args")
        except json.JSONDecodeError as exc:
            raise FednodeError(f"--args is not JSON: {exc}", code="USAGE") from None
        from fednode import factories

        found = factories.fingerprint_of(factories.call(factory, kwargs))
        return {
            "factory": factory,
            "args": kwargs,
            "fingerprint": fp.to_spec(found),
            "tensors": len(found),
            "params": fp.values(found),
            "toml": fp.to_toml(found),
        }

    run(
        as_json,
        go,
        lambda r: stdout.print(r["toml"], markup=False, highlight=False, soft_wrap=True),
    )


def _hostport(listen: str, option: str = "--listen") -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise FednodeError(
            f"{option} {listen!r} is not HOST:PORT",
            code="USAGE",
            hint="for example --listen 127.0.0.1:7700 (port 0 picks a free one)",
        )
    return host, int(port)


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, option: str = "--max-memory") -> int:
    """'4G', '512M', '1.5GiB', '1048576' -> bytes (K, M, G, T are powers of 1024)."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise FednodeError(
            f"{option} {text!r} is not a size",
            code="USAGE",
            hint="give bytes or a number with K, M, G or T (powers of 1024), e.g. 4G or 512M",
        )
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if n < 1:
        raise FednodeError(f"{option} {text!r} is not a positive size", code="USAGE")
    return n


def _default_memory() -> int:
    """What fednode.participant.default_max_memory gives, without importing torch here."""
    import psutil

    from protocol.modelspec import default_max_memory

    return default_max_memory(psutil.virtual_memory().total)


def _probe(scale: float, claim: int) -> Probe:
    from fednode.attacks import Probe

    return Probe(scale, claim)


def _red_team(kind: str, role: str) -> Attack | None:
    """``--attack KIND`` (fednode.attacks), a participant's only: a UsageError otherwise."""
    if not kind:
        return None
    from fednode.attacks import parse
    from protocol.errors import UsageError

    if role != "participant":
        raise UsageError(
            f"--attack {kind!r} is for a participant; a {role} does not attack",
            hint="start the attacking node with --role participant --attack KIND",
        )
    return parse(kind)


def _participant_limits(max_params: int | None, max_memory: str, max_train_s: float) -> Limits:
    """The participant's limits: the options given, this machine's defaults for the rest
    (the parameter default follows --max-memory when only that is given)."""
    from fednode.participant import Limits

    return Limits.for_machine(
        max_params=max_params,
        max_memory=parse_size(max_memory) if max_memory else None,
        max_train_s=max_train_s,
    )


def _start_schema(spec_file: Path | None) -> Schema | None:
    """The data schema of `fednode run --spec FILE` (a SpecError if the spec is invalid)."""
    if spec_file is None:
        return None
    from fednode.schema import Schema
    from protocol import spec

    return Schema.from_spec(spec.load(spec_file))


def _start_report_privacy(spec_file: Path | None) -> ReportPrivacy | None:
    """`fednode run --spec FILE` with [privacy] noisy_reports: how the data report is
    released (fednode.noisy_reports); None without --spec or without noisy reports."""
    if spec_file is None:
        return None
    from fednode.noisy_reports import ReportPrivacy
    from protocol import spec

    return ReportPrivacy.of_spec(spec.load(spec_file))


@app.command("run")
def run_node(
    role: Annotated[str, typer.Option(help="coordinator or participant")],
    data_dir: DataDir = None,
    listen: Annotated[str, typer.Option(help="coordinator: HOST:PORT")] = "127.0.0.1:7700",
    operator: Annotated[
        list[str] | None,
        typer.Option(help="coordinator: peer ID allowed to drive sessions (repeatable)"),
    ] = None,
    viewer: Annotated[
        list[str] | None,
        typer.Option(help="coordinator: peer ID allowed to read only (repeatable)"),
    ] = None,
    coordinator: Annotated[
        str, typer.Option(help="participant: ws://HOST:PORT or wss://HOST:PORT (--tls coordinator)")
    ] = "",
    coordinator_id: Annotated[
        str, typer.Option(help="participant: the coordinator's peer ID")
    ] = "",
    dataset: Annotated[
        str,
        typer.Option(
            help="participant: digits:K/N, csv:/path, parquet:/path, npz:/path, idx:/dir "
            "(MNIST IDX files) or images:/dir (a subfolder of PNG/JPEG per class)"
        ),
    ] = "digits:0/1",
    spec_file: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="participant: a session spec (TOML or JSON) whose [data] schema the data must "
            "match; checked at start, before registering (each task checks its own spec too)",
        ),
    ] = None,
    allow_model: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-model",
            help='a python model factory ("package.module:function") this node may build for '
            'a spec with model.kind = "python" (repeatable); installed fednode.models entry '
            "points are allowed too; any other factory a spec names is refused "
            "(MODEL_NOT_ALLOWED) before it is imported",
        ),
    ] = None,
    join_token: Annotated[str, typer.Option(help="participant: an invite token")] = "",
    threads: Annotated[int, typer.Option(help="torch threads for training")] = 1,
    device: Annotated[
        str,
        typer.Option(
            help="where training and evaluation run: auto (a GPU when torch sees one), cpu, "
            "cuda, cuda:N or mps; weights on the wire stay float32 safetensors"
        ),
    ] = "cpu",
    train_delay: Annotated[
        float,
        typer.Option(
            help="participant: seconds to wait before each training (testing)", hidden=True
        ),
    ] = 0.0,
    poison_round: Annotated[
        int,
        typer.Option(
            help="participant: in this round, send weights scaled by a large negative factor "
            "(testing rollback)",
            hidden=True,
        ),
    ] = 0,
    attack_scale: Annotated[
        float,
        typer.Option(
            help="participant: every round, multiply the trained weights by this (testing the "
            "aggregation bounds; 0 = off)",
            hidden=True,
        ),
    ] = 0.0,
    attack_claim: Annotated[
        int,
        typer.Option(
            help="participant: every round, claim this many examples (testing the aggregation "
            "bounds; 0 = off)",
            hidden=True,
        ),
    ] = 0,
    attack: Annotated[
        str,
        typer.Option(
            "--attack",
            help="participant: red-team the federation by misbehaving every round: sign_flip, "
            "scale:F, gaussian:SIGMA, label_flip, constant:V or free_rider (docs/robustness.md); "
            "the coordinator is told nothing",
        ),
    ] = "",
    nan_round: Annotated[
        int,
        typer.Option(
            help="coordinator: this round's aggregate becomes NaN (testing rollback)", hidden=True
        ),
    ] = 0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
    handshake_timeout: Annotated[
        float, typer.Option(help="coordinator: seconds per handshake step")
    ] = 10.0,
    max_pending: Annotated[
        int, typer.Option(help="coordinator: connections allowed to be authenticating at once")
    ] = 64,
    max_uploads: Annotated[
        int,
        typer.Option(
            min=1,
            help="coordinator: updates on their way at once; a participant whose update is "
            "ready waits for a grant (docs/scale.md)",
        ),
    ] = MAX_UPLOADS,
    max_upload_mib: Annotated[
        int,
        typer.Option(
            min=1,
            help="coordinator: the most MiB of updates on their way at once (one larger "
            "update still goes, alone)",
        ),
    ] = MAX_UPLOAD_MIB,
    round_ram_mib: Annotated[
        int,
        typer.Option(
            min=0,
            help="coordinator: a plain round keeps up to this many MiB of updates in memory, "
            "the rest in an unlinked file of the node's folder (0: always on disk; "
            "docs/scale.md)",
        ),
    ] = ROUND_RAM_MIB,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="coordinator: serve wss:// with a certificate bound "
            "to the node's key (clients check the peer ID, not a CA)",
        ),
    ] = False,
    rate_limit: Annotated[
        float, typer.Option(help="coordinator: messages/s per connection (bursts of twice)")
    ] = 200.0,
    sla: Annotated[
        Path | None,
        typer.Option(help="coordinator: SLA thresholds (JSON; docs/quality.md), else defaults"),
    ] = None,
    heartbeat: Annotated[
        float,
        typer.Option(
            min=0.05, max=300, help="coordinator: heartbeat and ping interval asked of peers (s)"
        ),
    ] = 5.0,
    metrics: Annotated[
        str,
        typer.Option(
            help="coordinator: serve Prometheus metrics on HOST:PORT (e.g. 127.0.0.1:9100; "
            "docs/monitoring.md lists them)"
        ),
    ] = "",
    health: Annotated[
        str,
        typer.Option(
            help="serve liveness and readiness probes on HOST:PORT: GET /livez and /readyz, "
            "503 with the failing checks when not ready (docs/monitoring.md; port 0 picks a "
            "free one, printed in the JSON line as health)"
        ),
    ] = "",
    max_params: Annotated[
        int | None,
        typer.Option(
            "--max-params",
            min=1,
            help="participant: decline a session whose model has more parameters than this "
            "(LIMIT_PARAMS). Default: the --max-memory budget / 48 bytes, what a parameter costs "
            "at most outside secure aggregation (4 bytes for each of 12 copies: weights, "
            "gradients, two Adam moments, three step temporaries, the load copy, and four "
            "copies of the model the node holds); "
            f"{default_max_params(_default_memory()):,} on this machine",
            show_default=False,
        ),
    ] = None,
    max_memory: Annotated[
        str,
        typer.Option(
            "--max-memory",
            help="participant: decline a session whose local training needs more memory than "
            "this (LIMIT_MEMORY), e.g. 4G, 512M or a number of bytes (K/M/G/T are powers of "
            "1024). Default: half of this machine's RAM (psutil), since the estimate is a "
            f"floor and the machine has other work: {format_size(_default_memory())} here",
            show_default=False,
        ),
    ] = "",
    max_train_seconds: Annotated[
        float,
        typer.Option(
            "--max-train-seconds",
            min=0,
            help="participant: seconds of local training per round before it is cancelled "
            "(TRAIN_DEADLINE); the round's own deadline applies as well. 0 = only the round's "
            "deadline. Default: one hour, so that a session cannot take this machine's CPU "
            "for a day per round (round_timeout_s goes to 86400)",
        ),
    ] = 3600.0,
    max_epsilon: Annotated[
        float | None,
        typer.Option(
            "--max-epsilon",
            min=0.001,
            help="participant: the most ε (record-level, at the session's δ) local DP-SGD "
            "may spend on this node's data over all sessions (kept per --dataset in this "
            "node's ledger); a round that would pass it is declined (LIMIT_EPSILON). "
            "Default: no limit of its own (each session's privacy.target_epsilon still "
            "applies)",
            show_default=False,
        ),
    ] = None,
    ipfs_api: Annotated[
        str,
        typer.Option(
            "--ipfs-api",
            help="keep models in the local IPFS daemon with this RPC API "
            "(/ip4/127.0.0.1/tcp/5001 or http://127.0.0.1:5001) instead of DATA_DIR/store",
        ),
    ] = "",
) -> None:
    """Serve as coordinator or participant until SIGINT/SIGTERM.

    On start it prints one JSON line on stdout ({"event": "listening" | "started", ...});
    logs go to stderr.
    """
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    home = NodeHome(data_dir)
    try:
        if role not in ("coordinator", "participant"):
            raise FednodeError(f"--role {role!r}: use coordinator or participant", code="USAGE")
        red_team = _red_team(attack, role)
        health_at = _hostport(health, "--health") if health else None
        ident = home.identity()
        home.lock()
        for pid in (operator or []) + (viewer or []):
            public_key_from_peer_id(pid)
        if role == "participant":
            if not coordinator or not coordinator_id:
                raise FednodeError(
                    "a participant needs --coordinator and --coordinator-id", code="USAGE"
                )
            public_key_from_peer_id(coordinator_id)
        import torch

        torch.set_num_threads(max(1, threads))
        from fednode import training

        dev = training.use_device(device)
        from fednode import factories

        factories.allow(allow_model or [])
        logging.getLogger("fednode").info("training and evaluation on %s", dev)
        if role == "coordinator":
            from fednode import session
            from fednode.quality import SLA, load_sla

            session.NAN_ROUND = nan_round

            host, port = _hostport(listen)
            metrics_at = _hostport(metrics, "--metrics") if metrics else None
            sla_obj = load_sla(sla) if sla is not None else SLA()
            asyncio.run(
                _run_coordinator(
                    home,
                    ident,
                    host,
                    port,
                    {
                        "operators": set(operator or []),
                        "viewers": set(viewer or []),
                        "handshake_timeout_s": handshake_timeout,
                        "max_pending_handshakes": max_pending,
                        "chain": home.chain(),
                        "rate_limit": rate_limit,
                        "sla": sla_obj,
                        "heartbeat_s": heartbeat,
                        "uploads": UploadSlots(max_uploads, max_upload_mib * 1024 * 1024),
                        "round_ram_mib": round_ram_mib,
                    },
                    tls,
                    metrics_at,
                    ipfs_api=ipfs_api,
                    health_at=health_at,
                )
            )
        else:
            from fednode.data import parse_dataset_spec

            ref = parse_dataset_spec(dataset)
            schema = _start_schema(spec_file)
            report_privacy = _start_report_privacy(spec_file)
            limits = _participant_limits(max_params, max_memory, max_train_seconds)
            asyncio.run(
                _run_participant(
                    home,
                    ident,
                    coordinator,
                    coordinator_id,
                    ref,
                    join_token,
                    train_delay,
                    poison_round,
                    ipfs_api=ipfs_api,
                    limits=limits,
                    probe=_probe(attack_scale, attack_claim),
                    schema=schema,
                    attack=red_team,
                    max_epsilon=max_epsilon,
                    report_privacy=report_privacy,
                    health_at=health_at,
                )
            )
    except FednodeError as err:
        fail(err, as_json=False)
    finally:
        home.unlock()


LOCK_WAIT_S = 0.5


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _run_coordinator(
    home: NodeHome,
    ident: Identity,
    host: str,
    port: int,
    options: dict[str, Any],
    tls: bool,
    metrics_at: tuple[str, int] | None = None,
    ipfs_api: str = "",
    health_at: tuple[str, int] | None = None,
) -> None:
    from fednode.coordinator import Coordinator
    from fednode.ledger import Ledger
    from fednode.store import open_store

    stop = _stop_event()
    # Probes answer from the start (not ready) to the end (stopping), around everything else.
    health = await _start_health(health_at, home.ledger_path, {"accepting": False})
    store = open_store(home.store_root, ipfs_api)
    # A short lock wait: the event loop must never stall on another process's lock;
    # fednode.storage_guard pauses sessions through a longer one.
    with Ledger(home.ledger_path, busy_timeout_s=LOCK_WAIT_S) as ledger:
        coord = Coordinator(ident, ledger, store, **options)
        ssl = None
        if tls:
            from fednode.tls import server_context

            ssl = server_context(ident, home.root)  # a fresh certificate on every start
        metrics_url = ""
        if metrics_at is not None:  # before serving: a resumed session's first events count
            from fednode.metrics import Exporter

            exporter = Exporter(*metrics_at)
            exporter.load(ledger)
            exporter.watch(lambda: len(coord.peers), lambda: coord.guard.healthy)
            coord.events.tap(exporter.on_event)
            coord.monitor.metrics = exporter
            metrics_url = exporter.url
        server = await coord.serve(host, port, ssl)
        bound = server.sockets[0].getsockname()
        if health is not None:
            health.checks = lambda: {
                "accepting": server.is_serving() and not coord.stopping,
                "storage": coord.guard.healthy,
            }
        emit_json(
            {
                "event": "listening",
                "url": f"{'wss' if tls else 'ws'}://{bound[0]}:{bound[1]}",
                "peer_id": ident.peer_id,
                "ledger": str(home.ledger_path),
                "metrics": metrics_url,
                "health": health.url if health is not None else "",
            }
        )
        if not options["operators"]:
            logging.getLogger("fednode").warning(
                "no --operator given: nobody can create or start sessions"
            )
        await stop.wait()
        if health is not None:  # readiness says so first, then the node winds down
            health.stopping = True
        # Rounds in flight recorded aborted, sessions left live: the next start resumes them.
        await coord.shutdown()
        await coord.monitor.stop()
        await coord.guard.stop()
        server.close()
        await server.wait_closed()
        if coord.monitor.metrics is not None:
            coord.monitor.metrics.close()
    if health is not None:
        await health.close()


async def _start_health(
    at: tuple[str, int] | None, ledger: Path, checks: dict[str, bool]
) -> Health | None:
    """The probe server of ``--health`` (fednode.health), not ready (``checks``) until the
    node replaces its checks; None without ``--health``."""
    if at is None:
        return None
    from fednode.health import Health

    health = Health(ledger, lambda: dict(checks))
    try:
        await health.start(*at)
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise FednodeError(
            f"--health {at[0]}:{at[1]}: cannot listen: {exc.strerror or exc}",
            code="USAGE",
            hint="give a free port on one of this machine's addresses (port 0 picks one)",
        ) from None
    return health


async def _run_participant(
    home: NodeHome,
    ident: Identity,
    url: str,
    coordinator_id: str,
    ref: DatasetRef,
    join_token: str,
    train_delay: float,
    poison_round: int = 0,
    ipfs_api: str = "",
    limits: Limits | None = None,
    probe: Probe | None = None,
    schema: Schema | None = None,
    attack: Attack | None = None,
    max_epsilon: float | None = None,
    report_privacy: ReportPrivacy | None = None,
    health_at: tuple[str, int] | None = None,
) -> None:
    from fednode.ledger import Ledger
    from fednode.participant import Participant
    from fednode.store import open_store

    stop = _stop_event()
    health = await _start_health(health_at, home.ledger_path, {"joined": False})
    store = open_store(home.store_root, ipfs_api)
    with Ledger(home.ledger_path) as ledger:
        node = Participant(
            ident,
            ledger,
            store,
            url=url,
            coordinator_id=coordinator_id,
            dataset=ref,
            join_token=join_token,
            train_delay_s=train_delay,
            poison_round=poison_round,
            chain=home.chain(),
            limits=limits,
            probe=probe,
            schema=schema,
            attack=attack,
            max_epsilon=max_epsilon,
            report_privacy=report_privacy,
        )
        if schema is not None:  # --spec: data that does not match never registers
            await asyncio.to_thread(node.check_data)
        if attack is not None:
            from fednode.attacks import announce

            announce(attack, ledger)
        lim = node.limits
        emit_json(
            {
                "event": "started",
                "peer_id": ident.peer_id,
                "coordinator": url,
                "health": health.url if health is not None else "",
                "limits": {
                    "max_params": lim.max_params,
                    "max_memory": lim.max_memory,
                    "max_train_s": lim.max_train_s,
                    "max_epsilon": max_epsilon,
                },
                **({"attack": str(attack)} if attack is not None else {}),
            }
        )
        if health is not None:
            health.checks = lambda: {"joined": node.joined}
        await _until_stopped(node.run(stop), stop, health)


async def _until_stopped(
    work: Coroutine[Any, Any, Any], stop: asyncio.Event, health: Health | None
) -> Any:
    """Run ``work`` (it ends once ``stop`` is set); readiness turns 503 as soon as ``stop``
    is set, while ``work`` winds down, and the probe server closes last."""

    async def flag() -> None:
        await stop.wait()
        if health is not None:
            health.stopping = True

    flagger = asyncio.create_task(flag())
    try:
        return await work
    finally:
        flagger.cancel()
        if health is not None:
            health.stopping = True
            await health.close()


@app.command("prometheus-config")
def prometheus_config(
    targets: Annotated[
        list[str], typer.Argument(help="HOST:PORT of each coordinator's --metrics address")
    ],
    interval: Annotated[int, typer.Option(min=1, max=3600, help="seconds between scrapes")] = 15,
    job: Annotated[str, typer.Option(help="the job label of the scraped series")] = "fednode",
    rules: Annotated[
        list[str] | None,
        typer.Option(
            "--rules",
            help="a rule file for Prometheus to load, as its path there (repeatable), e.g. "
            "the alert rules of deploy/prometheus/alerts.yml",
        ),
    ] = None,
) -> None:
    """Print a prometheus.yml that scrapes these coordinators' --metrics endpoints
    (docs/monitoring.md). It is JSON, which Prometheus reads as YAML."""
    from fednode.metrics import scrape_config

    try:
        for target in targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise FednodeError(
                    f"TARGET {target!r} is not HOST:PORT",
                    code="USAGE",
                    hint="the address a coordinator serves --metrics on, e.g. 10.0.0.5:9100",
                )
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}", job):
            raise FednodeError(
                f"--job {job!r} is not a job name",
                code="USAGE",
                hint="letters, digits, _ . - (at most 64), starting with a letter or _",
            )
    except FednodeError as err:
        fail(err, as_json=False)
    sys.stdout.write(scrape_config(targets, interval_s=interval, job=job, rules=rules or []))


@app.command("swarm")
def swarm(
    participants: Annotated[
        int, typer.Option("--participants", help="how many virtual participants (1 to 10,000)")
    ],
    coordinator: Annotated[str, typer.Option(help="ws://HOST:PORT or wss://HOST:PORT")],
    coordinator_id: Annotated[str, typer.Option(help="the coordinator's peer ID")],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="the swarm's directory: virtual-K/ (key, ledger) per participant, store/, "
            "peers.txt (default $FEDNODE_HOME/swarm or ~/.fednode/swarm)",
        ),
    ] = None,
    dataset: Annotated[
        str, typer.Option(help="digits: virtual participant K holds shard digits:K/N")
    ] = "digits",
    partition: Annotated[
        str,
        typer.Option(
            help="the partition this swarm's shards are for (iid, dirichlet, ...): a session "
            "whose data.partition differs is declined; default: whatever the session says",
        ),
    ] = "",
    workers: Annotated[
        int, typer.Option(min=1, help="trainings at once in this process (one torch thread each)")
    ] = 1,
    join_token: Annotated[str, typer.Option(help="an invite token, used by every one")] = "",
    store: Annotated[
        str,
        typer.Option(
            help="shared: one content store for the swarm (a round's model is fetched once "
            "and read from disk by the others); own: one per participant (each fetches)",
        ),
    ] = "shared",
    max_dialing: Annotated[
        int,
        typer.Option(
            min=1, help="handshakes in flight at once (keep below the coordinator's --max-pending)"
        ),
    ] = 32,
    ray_address: Annotated[
        str,
        typer.Option(
            "--ray",
            help="spread the participants over Ray actors: local (a Ray instance on this "
            "machine), auto (the running cluster) or the head's ADDRESS; needs the ray "
            "extra (pip install 'fednode[ray]')",
        ),
    ] = "",
    actors: Annotated[
        int,
        typer.Option(
            min=0,
            help="with --ray: how many actors, each hosting an equal group (default 0: one "
            "per CPU of the Ray cluster, at most --participants)",
        ),
    ] = 0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "warning",
    health: Annotated[
        str,
        typer.Option(
            help="serve liveness and readiness probes on HOST:PORT (GET /livez, /readyz): "
            "ready once every virtual participant is admitted (docs/monitoring.md); not "
            "with --ray",
        ),
    ] = "",
) -> None:
    """Run N participant identities in one process, each with its own key, connection,
    ledger and shard; they share one torch and train --workers at a time.

    On start it prints one JSON line on stdout ({"event": "started", "peer_ids": [...],
    "peers_file": ...}); on SIGINT/SIGTERM it stops them all and prints {"event":
    "stopped", ...}. Logs go to stderr. With --ray the participants run in Ray actors, a
    group each, and the driver prints the same lines (docs/scale.md, "Ray").
    """
    from fednode.home import default_home
    from fednode.swarm import SwarmConfig

    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = Path(data_dir).expanduser() if data_dir else default_home() / "swarm"
    config = SwarmConfig(
        root=root,
        participants=participants,
        url=coordinator,
        coordinator_id=coordinator_id,
        dataset=dataset,
        partition=partition,
        workers=workers,
        join_token=join_token,
        store=store,
        dial_slots=max_dialing,
    )
    lock = NodeHome(root)
    try:
        config.check()
        public_key_from_peer_id(coordinator_id)
        health_at = _hostport(health, "--health") if health else None
        if health_at is not None and (ray_address or actors):
            raise FednodeError(
                "--health is not served by a swarm on Ray: its participants run in the actors",
                code="USAGE",
                hint="probe the Ray cluster itself, or run the swarm without --ray",
            )
        if ray_address or actors:
            ray_swarm = _ray_swarm(participants, ray_address, actors)
            lock.lock()
            out = sys.stdout
            # Ray prints its processes' lines (raylet warnings, actors' output) on the
            # driver's stdout; they go to stderr, and stdout keeps its JSON lines only.
            with contextlib.redirect_stdout(sys.stderr):
                result = asyncio.run(
                    _run_ray_swarm(ray_swarm, config, ray_address, actors, log_level, out)
                )
            emit_json(result, out)
            if result["actors_failed"]:  # the others ran on; the exit status still says so
                raise typer.Exit(1)
            return
        from fednode.swarm import raise_fd_limit

        raise_fd_limit(participants)  # before torch and the ledgers take their files
        lock.lock()
        import torch

        torch.set_num_threads(1)  # --workers trainings share the cores, one thread each
        emit_json(asyncio.run(_run_swarm(config, health_at)))
    except FednodeError as err:
        fail(err, as_json=False)
    finally:
        lock.unlock()


def _ray_swarm(participants: int, address: str, actors: int) -> Any:
    """fednode.ray_swarm, once ``--ray`` and ``--actors`` are checked; it imports ray, an
    optional extra, so nothing else of fednode imports it."""
    from fednode.swarm import split_groups
    from protocol.errors import UsageError

    if not address:
        raise UsageError(
            f"--actors {actors}: only with --ray", hint="add --ray local, auto or ADDRESS"
        )
    if actors:
        split_groups(participants, actors)  # refused before Ray starts, not after
    try:
        from fednode import ray_swarm
    except ImportError as err:
        raise UsageError(
            f"--ray {address}: ray is not installed ({err})",
            hint="install the extra: pip install 'fednode[ray]'",
        ) from err
    return ray_swarm


async def _run_ray_swarm(
    ray_swarm: Any, config: Any, address: str, actors: int, log_level: str, out: Any
) -> dict[str, Any]:
    from fednode import swarm

    stop = _stop_event()

    def ready(peer_ids: list[str], placed: dict[str, Any]) -> None:
        peers = swarm.write_peers(config.root, peer_ids)
        for g in placed["groups"]:  # for whoever reads the log; the JSON line has it too
            print(
                f"ray: actor {g['actor']} hosts virtual-{g['first']}.."
                f"virtual-{g['first'] + g['count'] - 1} on {g['node']} (pid {g['pid']}, "
                f"{g['rss_mib']:.0f} MiB)",
                file=sys.stderr,
                flush=True,
            )
        emit_json(
            {
                "event": "started",
                "participants": len(peer_ids),
                "coordinator": config.url,
                "peer_ids": peer_ids,
                "peers_file": str(peers),
                "workers": config.workers,
                "store": config.store,
                "build_s": placed["startup_s"],
                "ray": placed,
            },
            out,
        )

    return await ray_swarm.run(config, address, actors, log_level, stop, ready)


async def _run_swarm(config: Any, health_at: tuple[str, int] | None = None) -> dict[str, Any]:
    import time

    from fednode import swarm, virtual

    stop = _stop_event()
    t0 = time.perf_counter()
    built = virtual.build(config)  # in the loop's thread: SQLite connections stay in theirs
    try:
        # The ledger check probes virtual-0's ledger: every one is on the swarm's disk.
        health = await _start_health(health_at, built.nodes[0].ledger.path, {"joined": False})
        if health is not None:
            health.checks = lambda: {"joined": all(node.joined for node in built.nodes)}
        peers = swarm.write_peers(config.root, built.peer_ids)
        emit_json(
            {
                "event": "started",
                "participants": len(built.nodes),
                "coordinator": config.url,
                "peer_ids": built.peer_ids,
                "peers_file": str(peers),
                "workers": config.workers,
                "store": config.store,
                "build_s": round(time.perf_counter() - t0, 3),
                "health": health.url if health is not None else "",
            }
        )
        return await _until_stopped(built.run(stop), stop, health)
    finally:
        built.close()


def main() -> None:
    # Everything a node writes (ledger, store, logs, keys) is its operator's alone: files
    # 0600 and folders 0700 by construction, whatever the shell's umask.
    os.umask(PRIVATE_UMASK)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
