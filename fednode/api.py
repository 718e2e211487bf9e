"""What fedctl and the dashboard (tui) may use of fednode: this module, and nothing else.

Everything the clients share with a node's wire is in ``protocol/`` (messages, events,
admin operations, the lifecycle, alerts); a client reaches a running node only through the
authenticated protocol. What remains is here, in three groups; nothing else of fednode is
API, and tests/test_imports.py holds fedctl/ and tui/ to that.

The client side of the transport (fedctl.client):
    ``dial(url, identity, server_peer_id, …) -> Connection``: open a websocket, run the
    handshake as a client and return the signed-envelope ``Connection`` (``send``,
    ``recv``, ``messages``, ``close``).

A stopped node's files, read offline (``fedctl ledger verify``, ``fedctl report
--data-dir``, ``fedctl model get --data-dir``, the demo's directories):
    ``NodeHome`` (a node's data directory: identity, ledger and store paths, the lock a
    running node holds), ``default_home`` (``$FEDNODE_HOME`` or ``~/.fednode``),
    ``Ledger`` (open a ledger file; ``verify_chain``, ``summary``, …), ``BlockStore`` (the
    content store on disk: ``get`` a model by CID, every block verified),
    ``build_report`` (the data of a session report, from a ledger).

The privacy audit (``fedctl audit privacy``): ``audit_inputs`` (what it needs of a stopped
coordinator's ledger; online: admin ``audit.inputs``), ``privacy_audit`` (run it:
fednode.audit_session.run_audit, which imports torch, so only when called) and
``record_audit_offline`` (keep its figures in a stopped coordinator's ledger).

A participant's attacks (``fedctl demo --attack``): ``parse_attack`` checks a `fednode run
--attack KIND` value before any node starts (fednode.attacks.parse: a UsageError).

Conventions the two CLIs share:
    ``private_dir`` and ``PRIVATE_UMASK`` (folders 0700, files 0600); the output
    conventions of fednode.output (``emit_json``, ``fail``, ``run``, ``plain``, ``line``,
    ``stdout``, ``stderr``, ``USAGE_ERRORS``).
"""

from __future__ import annotations

from typing import Any

from fednode.attacks import parse as parse_attack
from fednode.files import PRIVATE_UMASK, private_dir
from fednode.home import NodeHome, default_home
from fednode.ledger import Ledger
from fednode.output import USAGE_ERRORS, emit_json, fail, line, plain, run, stderr, stdout
from fednode.reporting import audit_inputs, build_report
from fednode.store import BlockStore
from fednode.transport import EVENT_STREAM_RATE, Connection, dial


def privacy_audit(inputs: dict[str, Any], model: bytes, **options: Any) -> dict[str, Any]:
    """fednode.audit_session.run_audit, imported on first use (it needs torch)."""
    from fednode.audit_session import run_audit

    return run_audit(inputs, model, **options)


def record_audit_offline(ledger: Ledger, session_id: str, record: dict[str, Any]) -> int:
    """fednode.audit_session.record_offline: an ``audit`` event in a stopped node's ledger."""
    from fednode.audit_session import record_offline

    return record_offline(ledger, session_id, record)


__all__ = [
    "EVENT_STREAM_RATE",
    "PRIVATE_UMASK",
    "USAGE_ERRORS",
    "BlockStore",
    "Connection",
    "Ledger",
    "NodeHome",
    "audit_inputs",
    "build_report",
    "default_home",
    "dial",
    "emit_json",
    "fail",
    "line",
    "parse_attack",
    "plain",
    "privacy_audit",
    "private_dir",
    "record_audit_offline",
    "run",
    "stderr",
    "stdout",
]
