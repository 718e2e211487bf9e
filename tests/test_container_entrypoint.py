"""The image's entrypoint, healthcheck and compose wiring, run for real without Docker.

deploy/docker/entrypoint.sh is a POSIX sh script (this machine's /bin/sh is dash, as in
python:3.11-slim), so the tests run it as the container would, with its /data and /shared
pointed at temporary folders and fednode/fedctl from this virtual environment. The slow test
runs the compose federation's services as processes with the environment compose.yaml gives
them, and deploy/compose/start-session.sh drives a session to its end: what `docker compose
up` and `docker compose run --rm session` do, less the containers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedctl.demo import Processes, read_ready_line
from protocol.identity import Identity

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
COMPOSE_DIR = REPO / "deploy" / "compose"
BIN = str(Path(sys.executable).parent)


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """This process's environment without fednode's and fedctl's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDNODE_", "FEDCTL_", "POD_"))}
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        HOME=str(tmp),
        TMPDIR=str(tmp / "tmp"),
        FEDNODE_HOME=str(tmp / "node"),
        FEDCTL_HOME=str(tmp / "fedctl"),
        FEDNODE_HEALTH="",
    )
    env.update(extra)
    return env


def entrypoint(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def secret_key(folder: Path, name: str) -> Identity:
    """A key file as a Kubernetes Secret mounts it: readable by others (0644)."""
    folder.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate()
    ident.save(folder / name)
    (folder / name).chmod(0o644)
    return ident


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_missing_id_file_stops_the_container_with_its_name(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path, FEDNODE_WAIT_S="1", FEDNODE_COORDINATOR_ID_FILE=str(tmp_path / "none")
    )
    started = time.monotonic()
    proc = entrypoint("run", "--role", "participant", "--coordinator", "ws://127.0.0.1:9", env=env)
    assert proc.returncode == 2
    assert f"{tmp_path / 'none'} is missing or empty after 1 s" in proc.stderr
    assert "FEDNODE_COORDINATOR_ID_FILE" in proc.stderr
    assert time.monotonic() - started < 20
    # a coordinator with an empty operator file is refused the same way, not started open
    (tmp_path / "ops").write_text("# nobody yet\n\n")
    env = clean_env(tmp_path, FEDNODE_WAIT_S="0", FEDNODE_OPERATOR_FILE=str(tmp_path / "ops"))
    proc = entrypoint("run", "--role", "coordinator", env=env, timeout=20)
    assert proc.returncode == 2 and "FEDNODE_OPERATOR_FILE" in proc.stderr


def test_a_secret_key_is_installed_private_for_this_pod(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    keys = [secret_key(secrets, f"identity-{k}.key") for k in range(2)]
    peer_file = tmp_path / "shared" / "me.id"
    env = clean_env(
        tmp_path,
        FEDNODE_IDENTITY_DIR=str(secrets),
        POD_INDEX="1",
        FEDNODE_PEER_ID_FILE=str(peer_file),
    )
    # fednode refuses a participant without its coordinator before it imports torch: the
    # entrypoint's work is done by then
    proc = entrypoint("run", "--role", "participant", env=env)
    assert proc.returncode != 0 and "--coordinator" in proc.stderr + proc.stdout
    installed = tmp_path / "node" / "identity.key"
    assert installed.read_bytes() == (secrets / "identity-1.key").read_bytes()
    assert mode(installed) == 0o600 and mode(installed.parent) == 0o700
    assert peer_file.read_text() == keys[1].peer_id + "\n"
    assert mode(peer_file) == 0o644  # public: other containers read it
    # a new key in the Secret replaces the old one on the next start, and says so
    secret_key(secrets, "identity-1.key.new")
    (secrets / "identity-1.key.new").replace(secrets / "identity-1.key")
    del env["FEDNODE_PEER_ID_FILE"]
    proc = entrypoint("run", "--role", "participant", env=env)
    assert f"{installed} replaced" in proc.stderr
    assert installed.read_bytes() == (secrets / "identity-1.key").read_bytes()
    assert mode(installed) == 0o600
    # a pod whose key is not in the Secret does not start with a made-up one
    proc = entrypoint("run", "--role", "participant", env={**env, "POD_INDEX": "7"})
    assert proc.returncode == 2
    assert "holds no identity-7.key nor identity.key" in proc.stderr
    # without a Secret, the first start creates a key on the volume, later starts keep it
    (tmp_path / "fresh").mkdir()
    env = clean_env(tmp_path / "fresh")
    proc = entrypoint("run", "--role", "participant", env=env)
    assert "creating one" in proc.stderr
    created = tmp_path / "fresh" / "node" / "identity.key"
    first = created.read_bytes()
    assert mode(created) == 0o600
    proc = entrypoint("run", "--role", "participant", env=env)
    assert "creating one" not in proc.stderr and created.read_bytes() == first


def health_supported() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "fednode", "run", "--help"], capture_output=True, text=True
    ).stdout
    return "--health" in out


def healthcheck(path: str, health: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), path],
        env={**os.environ, "FEDNODE_HEALTH": health},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_coordinator_takes_its_operators_and_viewers_from_the_entrypoint(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    # compose's operator-key service: fedctl creates the key and publishes its peer ID
    op_env = clean_env(tmp_path, FEDCTL_PEER_ID_FILE=str(shared / "operator.id"))
    proc = entrypoint("fedctl", "whoami", env=op_env)
    assert proc.returncode == 0, proc.stderr
    operator = (shared / "operator.id").read_text().strip()
    assert operator == proc.stdout.strip()
    assert mode(tmp_path / "fedctl" / "operator.key") == 0o600
    viewer = secret_key(tmp_path / "viewer-secret", "operator.key")  # 0644, as mounted

    with_health = health_supported()
    env = clean_env(
        tmp_path,
        FEDNODE_OPERATOR_FILE=str(shared / "operator.id"),
        FEDNODE_VIEWERS=viewer.peer_id,
        FEDNODE_PEER_ID_FILE=str(shared / "coordinator.id"),
        # the image's default, which the entrypoint adds as --health (port 0: a free one)
        FEDNODE_HEALTH="127.0.0.1:0" if with_health else "",
    )
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "coordinator.log"
    with open(log, "wb") as fh:
        node = subprocess.Popen(
            ["sh", str(ENTRYPOINT), "run", "--role", "coordinator", "--listen", "127.0.0.1:0"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=fh,
            stdin=subprocess.DEVNULL,
        )
    try:
        ready = read_ready_line(node, "the coordinator", log)
        assert ready["peer_id"] == (shared / "coordinator.id").read_text().strip()
        fedctl_env = clean_env(
            tmp_path,
            FEDCTL_COORDINATOR=ready["url"],
            FEDCTL_COORDINATOR_ID_FILE=str(shared / "coordinator.id"),
        )
        spec = tmp_path / "spec.toml"
        spec.write_text('name = "t"\nrounds = 1\nmin_participants = 1\nparticipants = []\n')
        # the operator listed through FEDNODE_OPERATOR_FILE may create a session
        created = entrypoint("fedctl", "session", "create", str(spec), "--json", env=fedctl_env)
        assert json.loads(created.stdout)["ok"] is True, created.stdout + created.stderr
        # the viewer (its key handed in as a Secret file) may read, and not write
        viewer_env = {
            **fedctl_env,
            "FEDCTL_KEY_FILE": str(tmp_path / "viewer-secret" / "operator.key"),
        }
        listed = entrypoint("fedctl", "session", "list", "--json", env=viewer_env)
        assert json.loads(listed.stdout)["ok"] is True, listed.stdout + listed.stderr
        refused = entrypoint("fedctl", "session", "create", str(spec), "--json", env=viewer_env)
        assert "viewer" in json.loads(refused.stdout)["error"]["message"]
        if with_health:
            port = ready["health"].rsplit(":", 1)[1].split("/")[0]
            for path in ("/livez", "/readyz"):
                check = healthcheck(path, f"0.0.0.0:{port}")
                assert check.returncode == 0, check.stdout
        # SIGTERM reaches fednode itself (exec): a graceful stop, exit 0
        node.send_signal(signal.SIGTERM)
        assert node.wait(30) == 0, log.read_text()[-2000:]
        if with_health:
            assert healthcheck("/livez", f"0.0.0.0:{port}").returncode == 1
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        assert node.stdout is not None
        node.stdout.close()


def test_healthcheck_fails_with_a_reason_when_nothing_answers(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        check = healthcheck("/readyz", f"0.0.0.0:{port}")
    assert check.returncode == 1
    assert f"http://127.0.0.1:{port}/readyz" in check.stdout
    assert healthcheck("/livez", "").returncode == 1


# --- the compose federation, as processes ----------------------------------------------


def localise(
    service: dict[str, Any], root: Path, url: str = ""
) -> tuple[list[str], dict[str, str]]:
    """A compose service's command and environment with its container paths under root:
    /shared (the shared volume), /data (its own volume), /work (this folder), the compose
    network's names and fixed ports replaced by loopback ones."""
    volumes = dict(v.split(":")[:2][::-1] for v in service.get("volumes", []))
    paths = {
        "/shared": str(root / "shared"),
        "/work": str(COMPOSE_DIR),
        "/data": str(root / volumes.get("/data", "none")),
    }

    def fix(text: str) -> str:
        text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)  # compose's ${VAR:-default}
        for inside, outside in paths.items():
            text = re.sub(rf"(?<![\w/]){re.escape(inside)}(?=/|$)", outside, text)
        text = re.sub(r"0\.0\.0\.0:\d+", "127.0.0.1:0", text)
        return text.replace("ws://coordinator:7700", url)

    env = {k: fix(str(v)) for k, v in (service.get("environment") or {}).items()}
    env.setdefault("FEDNODE_HOME", paths["/data"] + "/node")  # the image's defaults
    env.setdefault("FEDCTL_HOME", paths["/data"] + "/fedctl")
    command = [fix(a) for a in [*service.get("entrypoint", []), *service.get("command", [])]]
    return command, env


@pytest.mark.slow
def test_compose_federation_runs_a_session_to_its_end(tmp_path: Path) -> None:
    services = yaml.safe_load((COMPOSE_DIR / "compose.yaml").read_text())["services"]
    root = tmp_path
    (root / "shared").mkdir()
    (root / "logs").mkdir()
    procs = Processes(root / "logs")

    def start(name: str, url: str = "", stdout: bool = False) -> subprocess.Popen[bytes]:
        command, env = localise(services[name], root, url)
        fh = open(root / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - closed by stop_all
        procs.logs.append(fh)
        proc = subprocess.Popen(
            ["sh", str(ENTRYPOINT), *command],
            env=clean_env(root, **env),
            stdout=subprocess.PIPE if stdout else fh,
            stderr=fh,
            stdin=subprocess.DEVNULL,
        )
        procs.procs[name] = proc
        return proc

    try:
        assert start("operator-key").wait(60) == 0
        coordinator = start("coordinator", stdout=True)
        ready = read_ready_line(coordinator, "the coordinator", root / "logs" / "coordinator.log")
        for k in (1, 2, 3):
            start(f"participant-{k}", ready["url"])
        spec = root / "spec.toml"
        spec.write_text((COMPOSE_DIR / "spec.toml").read_text().replace("rounds = 5", "rounds = 2"))
        command, env = localise(services["session"], root, ready["url"])
        assert command[:2] == ["/bin/sh", str(COMPOSE_DIR / "start-session.sh")]
        session = subprocess.run(
            ["sh", command[1], str(spec)],
            # the script's /shared, where the container has its shared volume
            env=clean_env(root, **env, FEDNODE_SHARED=str(root / "shared")),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert session.returncode == 0, session.stdout[-3000:] + session.stderr[-3000:]
        assert "3 participants listed" in session.stdout
        assert re.search(r"completed\s+2 rounds\s+3 participants", session.stdout), session.stdout
    finally:
        procs.stop_all()
