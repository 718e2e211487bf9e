"""The container image, the compose federation, the Helm chart and the kustomize bases, as
files: parsed, rendered and validated offline (docs/deploy.md).

What runs where: the Dockerfile and .dockerignore are parsed (there is no Docker daemon
here to build them); compose.yaml is parsed, and validated by `docker compose config` or
docker-compose 1.29 where one is installed; the kustomize bases are rendered by
`kubectl kustomize` and the chart by Helm's own Go engine through helm-python-sdk (no
`helm` binary needed), each skipped with its reason when absent; every rendered object is
validated against the Kubernetes schemas by kubernetes-validate (the ServiceMonitor, a
CRD it does not know, against a schema of its own below).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fednode.cli import parse_size

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
CHART = REPO / "deploy" / "helm" / "fednode"
KUSTOMIZE = REPO / "deploy" / "kustomize"
OVERLAY = KUSTOMIZE / "overlays" / "example"
HELM_EXAMPLES = REPO / "deploy" / "helm" / "examples"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion): pod-index labels.
K8S_VERSION = "1.28.0"
UID = 10001
MI = 1024**2
GI = 1024**3
# The issue's figures: a server with 512Mi-1Gi and 0.5-1 CPU, clients with 1-2Gi.
FIGURES = {
    "coordinator": {
        "requests": {"memory": 512 * MI, "cpu": 0.5},
        "limits": {"memory": GI, "cpu": 1},
    },
    "participant": {"requests": {"memory": GI}, "limits": {"memory": 2 * GI}},
}
SECRETISH = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


# --- the image --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[dict[str, Any]]:
    """Each FROM stage: its name, base image and instructions, ARG defaults resolved."""
    args: dict[str, str] = {}
    result: list[dict[str, Any]] = []
    for word, rest in dockerfile():
        if word == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        if word == "FROM":
            image, _, name = rest.partition(" AS ")
            result.append({"name": name.strip(), "image": image.strip(), "steps": []})
        elif result:
            result[-1]["steps"].append((word, rest))
    return result


def steps(stage: dict[str, Any], word: str) -> list[str]:
    return [rest for w, rest in stage["steps"] if w == word]


def test_image_is_multistage_nonroot_and_copies_no_secret() -> None:
    builder, runtime = stages()
    assert (builder["name"], runtime["name"]) == ("builder", "runtime")
    assert runtime["image"].startswith("python:3.11-slim")
    assert runtime["image"] == builder["image"]  # the venv's python path is the same in both
    # the CPU torch wheel, pinned as the Makefile pins it
    make_torch = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert make_torch is not None
    install = " ".join(steps(builder, "RUN"))
    assert f'pip install "{make_torch.group(1)}" --index-url' in install
    assert "https://download.pytorch.org/whl/cpu" in install
    # the runtime stage takes the venv from the builder and two scripts, nothing else
    copies = steps(runtime, "COPY")
    assert "--from=builder /opt/fednode /opt/fednode" in copies
    assert {c.split()[0] for c in copies if not c.startswith("--from")} == {
        "deploy/docker/entrypoint.sh",
        "deploy/docker/healthcheck.py",
    }
    # no stage copies the whole context or anything that looks like a key or a ledger
    for stage in (builder, runtime):
        for src in [s for c in steps(stage, "COPY") + steps(stage, "ADD") for s in c.split()[:-1]]:
            assert src not in {".", "./", "*"}, "the whole build context is copied"
            assert not re.search(r"\.key|\.db|\.venv|data/|\.fedctl|\.fednode", src), src
    assert not steps(runtime, "ADD") and not steps(builder, "ADD")
    for env in steps(runtime, "ENV") + steps(runtime, "ARG"):
        for name in re.findall(r"(\w+)=", env):
            assert not SECRETISH.search(name), f"{name} is set in the image"
    # a fixed unprivileged user, who owns the volume
    user = steps(runtime, "USER")[-1]
    assert user == f"{UID}:{UID}"
    assert f'chown "{UID}:{UID}" /data' in " ".join(steps(runtime, "RUN"))
    assert steps(runtime, "VOLUME") == ['["/data"]']
    env = " ".join(steps(runtime, "ENV"))
    assert "FEDNODE_HOME=/data/node" in env
    assert steps(runtime, "ENTRYPOINT") == ['["fednode-entrypoint"]']
    assert "fednode-healthcheck" in steps(runtime, "HEALTHCHECK")[0]
    assert '"/livez"' in steps(runtime, "HEALTHCHECK")[0]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"ARG VERSION={version}" in [f"ARG {a}" for a in steps(runtime, "ARG")]
    assert 'org.opencontainers.image.version="' in " ".join(steps(runtime, "LABEL"))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for these patterns: the last pattern that matches the path or one of
    its parent folders decides; `!` takes a path back in."""
    parts = path.split("/")
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").rstrip("/")
        candidates = {pat, pat.removeprefix("**/")}
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):  # at any depth
            prefixes += [
                "/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))
            ]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_dockerignore_keeps_keys_ledgers_and_venvs_out() -> None:
    patterns = dockerignore()
    for path in [
        ".venv/bin/python",
        ".git/config",
        "data/node/identity.key",
        "tests/test_e2e.py",
        "fednode/__pycache__/cli.cpython-311.pyc",
        "fednode/identity.key",
        "fednode/ledger.db",
        "fednode/ledger.db-wal",
        "fednode.egg-info/PKG-INFO",
        "deploy/helm/fednode/values.yaml",
        "deploy/docker/identity.key.retired-12D3KooW",
    ]:
        assert dockerignored(path, patterns), f"{path} would be in the build context"
    for path in ["pyproject.toml", "README.md", "fednode/cli.py", "protocol/identity.py"]:
        assert not dockerignored(path, patterns), f"{path} is left out of the build context"


def test_everything_the_image_copies_is_in_the_build_context() -> None:
    patterns = dockerignore()
    for stage in stages():
        for copy_args in steps(stage, "COPY"):
            if copy_args.startswith("--from"):
                continue
            for src in copy_args.split()[:-1]:
                assert (REPO / src).exists(), src
                files = (
                    [src]
                    if (REPO / src).is_file()
                    else [str(p.relative_to(REPO)) for p in (REPO / src).rglob("*.py")]
                )
                assert files and not any(dockerignored(f, patterns) for f in files), src
    for script in ("entrypoint.sh", "healthcheck.py"):  # COPY keeps the mode: no --chmod needed
        assert (REPO / "deploy" / "docker" / script).stat().st_mode & 0o111


# --- compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_compose_runs_a_coordinator_and_three_participants_from_one_image() -> None:
    services = compose()["services"]
    nodes = ["coordinator", "participant-1", "participant-2", "participant-3"]
    assert {s["image"] for s in services.values()} == {"${FEDNODE_IMAGE:-fednode:0.1.0}"}
    data_volumes = {}
    for name in nodes:
        svc = services[name]
        assert svc["command"][0] == "run"
        assert (
            f"--role={'coordinator' if name == 'coordinator' else 'participant'}" in svc["command"]
        )
        assert svc["cap_drop"] == ["ALL"] and svc["read_only"] is True
        assert "no-new-privileges:true" in svc["security_opt"]
        assert svc["init"] is True  # SIGTERM reaches fednode: a graceful stop
        mounts = {m: v for v, m in [v.split(":")[:2] for v in svc["volumes"]]}
        assert not any(v.startswith((".", "/")) for v in mounts.values())  # named volumes only
        data_volumes[name] = mounts["/data"]
    assert sorted(data_volumes.values()) == sorted(nodes)  # a volume of its own each
    assert set(compose()["volumes"]) >= set(nodes) | {"shared", "operator"}

    coord = services["coordinator"]
    # the operator's key is made first; its ID is what the coordinator takes orders from
    assert coord["depends_on"] == {"operator-key": {"condition": "service_completed_successfully"}}
    published = env_of(services["operator-key"])["FEDCTL_PEER_ID_FILE"]
    assert env_of(coord)["FEDNODE_OPERATOR_FILE"] == published
    assert all(p.startswith("127.0.0.1:") for p in coord["ports"])  # not on every interface
    assert coord["healthcheck"]["test"] == ["CMD", "fednode-healthcheck", "/readyz"]
    assert (
        parse_size(coord["mem_reservation"].upper()) == FIGURES["coordinator"]["requests"]["memory"]
    )
    assert parse_size(coord["mem_limit"].upper()) == FIGURES["coordinator"]["limits"]["memory"]
    coordinator_id = env_of(coord)["FEDNODE_PEER_ID_FILE"]
    datasets = []
    for k in (1, 2, 3):
        svc = services[f"participant-{k}"]
        assert svc["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
        assert env_of(svc)["FEDNODE_COORDINATOR_ID_FILE"] == coordinator_id
        assert env_of(svc)["FEDNODE_PEER_ID_FILE"] == f"/shared/participant-{k}.id"
        assert "--coordinator=ws://coordinator:7700" in svc["command"]
        datasets += [
            a.removeprefix("--dataset=") for a in svc["command"] if a.startswith("--dataset=")
        ]
        assert parse_size(svc["mem_limit"].upper()) == FIGURES["participant"]["limits"]["memory"]
        max_memory = next(a for a in svc["command"] if a.startswith("--max-memory="))
        assert parse_size(max_memory.split("=")[1]) <= parse_size(svc["mem_limit"].upper()) // 2
    assert datasets == ["digits:0/3", "digits:1/3", "digits:2/3"]
    # the operator's tools see the coordinator's ID and the session helper's files
    for tool in ("fedctl", "session"):
        assert env_of(services[tool])["FEDCTL_COORDINATOR_ID_FILE"] == coordinator_id
        assert services[tool]["profiles"] == ["tools"]
    assert services["session"]["entrypoint"] == ["/bin/sh", "/work/start-session.sh"]
    assert "./:/work:ro" in services["session"]["volumes"]
    assert (COMPOSE.parent / "start-session.sh").exists()
    spec = tomllib.loads((COMPOSE.parent / "spec.toml").read_text())
    assert spec["min_participants"] == 3 and spec["participants"] == []


def compose_cli() -> list[str]:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip(
        "neither the docker compose plugin nor docker-compose is installed "
        "(apt-get install docker-compose); compose.yaml was only parsed"
    )


def test_compose_file_validates() -> None:
    proc = subprocess.run(
        [*compose_cli(), "-f", str(COMPOSE), "--profile", "tools", "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=COMPOSE.parent,
    )
    assert proc.returncode == 0, proc.stderr


# --- Kubernetes: rendering and validation -----------------------------------------------


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it renders kustomize offline: kubectl kustomize)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def helm_render(values: dict[str, Any], name: str = "fednode") -> list[dict[str, Any]]:
    """The chart rendered by Helm's Go engine (helm-python-sdk binds Helm v4's SDK)."""
    helm = pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[helm]'"
    )
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name=name, namespace="fednode")
    return [
        d
        for path, text in sorted(out.items())
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((HELM_EXAMPLES / name).read_text())


# The ServiceMonitor fields the Prometheus Operator needs, checked here since
# kubernetes-validate knows only Kubernetes' own kinds, not this CRD.
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {
                    "type": "object",
                    "required": ["matchLabels"],
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}


def validate(docs: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (the dev extra)"
    )
    import jsonschema

    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
        else:  # strict: an unknown field (a typo) fails too
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def kinds(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize("path", ["base/coordinator", "base/participant", "overlays/example"])
def test_kustomize_renders_objects_the_kubernetes_schemas_accept(path: str) -> None:
    docs = kustomize(KUSTOMIZE / path)
    validate(docs)
    assert {d["kind"] for d in docs} >= {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] == "StatefulSet":
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


def quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"Ki": 1024, "Mi": MI, "Gi": GI, "m": 0.001}
    for unit, factor in units.items():
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def arg(container: dict[str, Any], name: str) -> str:
    return next(a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}="))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def check_security_facts(docs: list[dict[str, Any]]) -> None:
    """What must hold of any rendering, kustomize's or Helm's."""
    objs = kinds(docs)
    sets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}
    assert sets
    for sts, c in containers(docs):
        role = sts["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = sts["spec"]["template"]["spec"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert selects(sts["spec"]["selector"]["matchLabels"], labels)
        # non-root, as the image's user; nothing to escalate to; no API token
        psc, csc = pod["securityContext"], c["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == UID and psc["fsGroup"] == UID
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert csc["readOnlyRootFilesystem"] is True
        assert csc["allowPrivilegeEscalation"] is False and csc["privileged"] is False
        assert csc["capabilities"] == {"drop": ["ALL"]}
        assert pod["automountServiceAccountToken"] is False
        # the probes on the port fednode serves them on
        health = next(p for p in c["ports"] if p["name"] == "health")["containerPort"]
        assert arg(c, "health") == f"0.0.0.0:{health}"
        assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
        assert c["startupProbe"]["httpGet"]["path"] == "/livez"
        # the issue's figures
        res = c["resources"]
        for kind, figures in FIGURES[role].items():
            assert quantity(res[kind]["memory"]) == figures["memory"], (role, kind)
            if "cpu" in figures:
                assert quantity(res[kind]["cpu"]) == figures["cpu"], (role, kind)
        if role == "participant":  # psutil sees the node: the limit must come from us
            assert parse_size(arg(c, "max-memory")) <= quantity(res["limits"]["memory"]) / 2
        # keys and tokens come from Secrets, never as literal values in the manifest
        env = c.get("env", [])
        for var in env:
            if SECRETISH.search(var["name"]) and not var["name"].endswith(("_FILE", "_DIR")):
                assert "value" not in var, f"{var['name']} is inlined"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in c["volumeMounts"]:
            if mount["mountPath"].startswith("/secrets/"):
                assert mount.get("readOnly") is True
                assert volumes[mount["name"]]["secret"]["defaultMode"] == 0o400
        # $(VAR) in an env value expands only for a variable defined before it
        for i, var in enumerate(env):
            for ref in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                assert ref in [v["name"] for v in env[:i]], f"{var['name']} uses $({ref}) too early"
        for a in c["args"]:
            for ref in re.findall(r"\$\((\w+)\)", a):
                assert ref in [v["name"] for v in env], f"{a} uses an undefined $({ref})"
        # the data volume, claimed per pod, is where FEDNODE_HOME lives
        assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
        assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
        assert next(v["value"] for v in env if v["name"] == "FEDNODE_HOME").startswith("/data/")
        # a PodDisruptionBudget and a NetworkPolicy select exactly these pods
        name = sts["metadata"]["name"]
        pdb = objs[("PodDisruptionBudget", name)]
        assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        netpol = objs[("NetworkPolicy", name)]["spec"]
        assert netpol["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        assert netpol["policyTypes"] == ["Ingress"]
        if role == "participant":
            assert netpol["ingress"] == []  # a participant serves nothing
            continue
        ws, metrics = netpol["ingress"]
        assert ws["ports"] == [{"port": "websocket", "protocol": "TCP"}]
        assert ws["from"][0]["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "fednode",
            "app.kubernetes.io/component": "participant",
        }
        assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
        assert metrics["from"][0]["namespaceSelector"] and metrics["from"][0]["podSelector"]
        # the Services reach the container's named ports
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert arg(c, "listen") == f"0.0.0.0:{ports['websocket']}"
        assert arg(c, "metrics") == f"0.0.0.0:{ports['metrics']}"
        svc = objs[("Service", name)]
        assert svc["spec"]["ports"] == [
            {
                "name": "websocket",
                "port": ports["websocket"],
                "targetPort": "websocket",
                "protocol": "TCP",
            }
        ]
        assert selects(svc["spec"]["selector"], labels)
        metrics_svc = objs[("Service", f"{name}-metrics")]
        assert metrics_svc["spec"]["type"] == "ClusterIP"
        assert metrics_svc["spec"]["ports"][0]["targetPort"] == "metrics"
        monitor = objs.get(("ServiceMonitor", name))
        if monitor is not None:  # it finds the metrics Service's port
            assert selects(
                monitor["spec"]["selector"]["matchLabels"], metrics_svc["metadata"]["labels"]
            )
            assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
            assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert not [d for d in docs if d["kind"] == "Secret" and "stringData" in d]


def test_kustomize_example_is_locked_down_and_sized_from_the_figures() -> None:
    docs = kustomize(OVERLAY)
    check_security_facts(docs)
    objs = kinds(docs)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
        "fednode-example"
    }
    assert ("ServiceMonitor", "fednode-coordinator") in objs
    assert not [d for d in docs if d["kind"] == "Secret"]  # keys are never in the repository
    coord = objs[("StatefulSet", "fednode-coordinator")]
    part = objs[("StatefulSet", "fednode-participant")]
    assert coord["spec"]["replicas"] == 1 and part["spec"]["replicas"] == 3
    cenv = {v["name"]: v for v in coord["spec"]["template"]["spec"]["containers"][0]["env"]}
    penv = {v["name"]: v for v in part["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert re.fullmatch(r"12D3KooW\w{44}", cenv["FEDNODE_OPERATORS"]["value"])
    assert re.fullmatch(r"12D3KooW\w{44}", penv["FEDNODE_COORDINATOR_ID"]["value"])
    assert penv["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    for sts, secret in (
        (coord, "fednode-coordinator-identity"),
        (part, "fednode-participant-identity"),
    ):
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        assert volumes["identity"]["secret"]["secretName"] == secret


# --- the chart, and the chart and kustomize in step ---------------------------------------


def normalised(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Objects as compared across Helm and kustomize: without Helm's own labels and the
    namespace (Helm leaves it to the release, kustomize writes it), and the lists that
    kustomize's patches reorder sorted (patched items come first): volumes and their
    mounts, whose order means nothing, and env, whose order would matter for $(VAR) in a
    value, which check_security_facts checks separately on each rendering."""
    out = {}
    for doc in docs:
        d = copy.deepcopy(doc)
        d["metadata"].pop("namespace", None)
        for meta in [d["metadata"], d.get("spec", {}).get("template", {}).get("metadata", {})]:
            for label in HELM_ONLY_LABELS:
                meta.get("labels", {}).pop(label, None)
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        if "volumes" in pod:
            pod["volumes"] = sorted(pod["volumes"], key=lambda v: v["name"])
        for c in pod.get("containers", []):
            c["env"] = sorted(c.get("env", []), key=lambda v: v["name"])
            c["volumeMounts"] = sorted(c.get("volumeMounts", []), key=lambda v: v["mountPath"])
        out[(d["kind"], d["metadata"]["name"])] = d
    return out


def test_kustomize_bases_are_the_chart_rendered() -> None:
    """The tested path and the chart cannot drift: the coordinator base is the chart with
    its defaults, the example overlay the chart with deploy/helm/examples' values."""
    assert normalised(kustomize(KUSTOMIZE / "base" / "coordinator")) == normalised(helm_render({}))
    chart = helm_render(values_file("coordinator.yaml")) + helm_render(
        values_file("participant.yaml")
    )
    overlay = [d for d in kustomize(OVERLAY) if d["kind"] != "Namespace"]
    assert normalised(overlay) == normalised(chart)


def test_values_yaml_and_kustomize_base_agree() -> None:
    """Without Helm: the chart's values against the kustomize bases (ports, probe paths,
    resources, volumes, security contexts), which the chart renders."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = kustomize(KUSTOMIZE / "base" / "coordinator") + kustomize(
        KUSTOMIZE / "base" / "participant"
    )
    for sts, c in containers(docs):
        role = sts["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = sts["spec"]["template"]["spec"]
        assert c["resources"] == values[role]["resources"]
        assert pod["securityContext"] == values["podSecurityContext"]
        assert c["securityContext"] == values["securityContext"]
        claim = sts["spec"]["volumeClaimTemplates"][0]["spec"]
        assert claim["resources"]["requests"]["storage"] == values[role]["persistence"]["size"]
        assert claim["accessModes"] == values[role]["persistence"]["accessModes"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports.items() <= values["ports"].items()
        assert c["image"] == f"{values['image']['repository']}:0.1.0"
        assert arg(c, "log-level") == values["logLevel"]
        assert c["livenessProbe"]["periodSeconds"] == values["probes"]["liveness"]["periodSeconds"]
        if role == "participant":
            assert sts["spec"]["replicas"] == values["participant"]["replicas"]
            assert arg(c, "dataset") == values["participant"]["dataset"]
            assert arg(c, "max-memory") == values["participant"]["maxMemory"]
            assert arg(c, "coordinator") == values["participant"]["coordinatorUrl"]
    check_security_facts(docs)


def test_chart_values_are_checked_by_its_schema() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for name in ("coordinator.yaml", "participant.yaml"):
        merged = copy.deepcopy(defaults)
        for key, value in values_file(name).items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        jsonschema.validate(merged, schema)
    bad = [
        {"role": "participant"},  # no coordinator peer ID to pin
        {"coordinator": {**defaults["coordinator"], "operators": ["not-a-peer-id"]}},
        {"participant": {**defaults["participant"], "coordinatorUrl": "http://x:7700"}},
        {"colour": "blue"},  # a typo
    ]
    for change in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**defaults, **change}, schema)


def test_chart_renders_every_option_into_valid_locked_down_objects() -> None:
    peer = values_file("participant.yaml")["participant"]["coordinatorPeerId"]
    cases = [
        {},
        values_file("coordinator.yaml"),
        {
            "coordinator": {
                "tls": True,
                "identity": {"key": "AAAA"},
                "operatorKey": {"existingSecret": "ops"},
                "service": {"type": "LoadBalancer"},
            },
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
            "networkPolicy": {"websocketFrom": [{"ipBlock": {"cidr": "192.0.2.0/24"}}]},
        },
        {
            "role": "participant",
            "participant": {
                "replicas": 2,
                "coordinatorPeerId": peer,
                "identity": {"keys": ["AAAA", "BBBB"]},
                "joinToken": {"existingSecret": "invite"},
            },
        },
    ]
    for values in cases:
        docs = helm_render(values)
        validate(docs)
        check_security_facts(docs)
    objs = kinds(helm_render(cases[2]))
    # a key given in values becomes a Secret the pod mounts (and restarts on)
    sts = objs[("StatefulSet", "fednode-coordinator")]
    assert objs[("Secret", "fednode-coordinator-identity")]["data"] == {"identity.key": "AAAA"}
    pod = sts["spec"]["template"]
    assert "checksum/identity" in pod["metadata"]["annotations"]
    c = pod["spec"]["containers"][0]
    assert "--tls" in c["args"]
    env = {v["name"]: v.get("value") for v in c["env"]}
    assert env["FEDCTL_COORDINATOR"] == "wss://127.0.0.1:7700"
    assert env["FEDNODE_IDENTITY_DIR"] == "/secrets/identity"
    assert objs[("Service", "fednode-coordinator")]["spec"]["type"] == "LoadBalancer"
    assert objs[("Service", "fednode-coordinator-metrics")]["spec"]["type"] == "ClusterIP"
    ingress = objs[("NetworkPolicy", "fednode-coordinator")]["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": "192.0.2.0/24"}} in ingress
    part = kinds(helm_render(cases[3]))
    assert part[("Secret", "fednode-participant-identity")]["data"] == {
        "identity-0.key": "AAAA",
        "identity-1.key": "BBBB",
    }
    pod = part[("StatefulSet", "fednode-participant")]["spec"]["template"]["spec"]
    penv = pod["containers"][0]["env"]
    token = next(v for v in penv if v["name"] == "FEDNODE_JOIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "invite", "key": "join-token"}


def test_chart_lints_clean_and_refuses_a_participant_without_its_coordinator() -> None:
    helm = pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed: pip install -e '.[helm]'"
    )
    report = helm.lint(str(CHART), strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == [], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report
    with pytest.raises(helm.HelmError, match="coordinatorPeerId"):
        helm_render({"role": "participant"})
    # the chart's name for the objects of another organisation's release
    names = {d["metadata"]["name"] for d in helm_render(values_file("participant.yaml"), "org-b")}
    assert "org-b-fednode-participant" in names


def test_docs_name_every_entrypoint_variable() -> None:
    script = (REPO / "deploy" / "docker" / "entrypoint.sh").read_text()
    used = set(re.findall(r"\$\{?((?:FEDNODE|FEDCTL)_[A-Z_]+)", script)) - {"FEDCTL_KEY"}
    header = "\n".join(ln for ln in script.splitlines() if ln.startswith("#"))
    deploy_md = (REPO / "docs" / "deploy.md").read_text()
    for name in sorted(used):
        assert name in header, f"{name} is not described in the entrypoint's header"
        assert name in deploy_md, f"{name} is not in docs/deploy.md"
    # and every variable the manifests and compose set is one the entrypoint reads
    sets = set(
        re.findall(r"(?:name: |^\s+)((?:FEDNODE|FEDCTL)_[A-Z_]+)", COMPOSE.read_text(), re.M)
    )
    for path in list(CHART.rglob("*.yaml")) + list(KUSTOMIZE.rglob("*.yaml")):
        sets |= set(re.findall(r"name: ((?:FEDNODE|FEDCTL)_[A-Z_]+)", path.read_text()))
    fednode_reads = {"FEDNODE_HOME", "FEDCTL_HOME", "FEDCTL_COORDINATOR"}
    assert sets - fednode_reads <= used, sets - fednode_reads - used
