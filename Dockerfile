# One image for both roles: `docker build -t fednode:0.1.0 .` (or `make image`), then
#   docker run … fednode:0.1.0 run --role coordinator --listen 0.0.0.0:7700 …
#   docker run … fednode:0.1.0 run --role participant --coordinator ws://… …
#   docker run … fednode:0.1.0 fedctl …            (the operator's tool)
# The node's key, ledger and store live on the /data volume (FEDNODE_HOME=/data/node).
# docs/deploy.md says how compose and Kubernetes use it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment with the CPU torch wheel and fednode --------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# The same pin as the Makefile's TORCH_SPEC (tests/test_deploy.py keeps them equal), from
# the CPU index: a plain PyPI torch is a multi-GB CUDA build.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/fednode \
    && /opt/fednode/bin/pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
# What the distribution is made of, nothing else (.dockerignore keeps keys, ledgers and
# virtual environments out of the build context as well).
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY fednode ./fednode
COPY fedctl ./fedctl
COPY tui ./tui
RUN /opt/fednode/bin/pip install . \
    && /opt/fednode/bin/python -m compileall -q /opt/fednode

# --- runtime: the venv on a slim Python, as an unprivileged user ----------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
# A fixed UID/GID: Kubernetes' runAsNonRoot can check a number, volumes can be chowned to
# it ahead of time, and compose's named volumes take its ownership from /data and /shared.
ARG UID=10001
ARG GID=10001
RUN groupadd --system --gid "${GID}" fednode \
    && useradd --system --uid "${UID}" --gid "${GID}" --home-dir /home/fednode \
        --create-home --shell /usr/sbin/nologin fednode \
    && mkdir -p /data /shared \
    && chown "${UID}:${GID}" /data /shared \
    && chmod 0700 /data
COPY --from=builder /opt/fednode /opt/fednode
# Executable in git (mode 100755), so COPY keeps the bit without BuildKit's --chmod.
COPY deploy/docker/entrypoint.sh /usr/local/bin/fednode-entrypoint
COPY deploy/docker/healthcheck.py /usr/local/bin/fednode-healthcheck
ENV PATH=/opt/fednode/bin:${PATH} \
    HOME=/home/fednode \
    FEDNODE_HOME=/data/node \
    FEDCTL_HOME=/data/fedctl \
    FEDNODE_HEALTH=0.0.0.0:8080 \
    XDG_CACHE_HOME=/tmp/cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="fednode" \
      org.opencontainers.image.description="Federated learning between machines that do not trust each other: one image for coordinator and participants" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/deploy.md"
USER ${UID}:${GID}
WORKDIR /home/fednode
VOLUME ["/data"]
# 7700 websocket (coordinator), 9100 Prometheus metrics (coordinator), 8080 /livez and /readyz
EXPOSE 7700 9100 8080
# Alive = the health endpoint answers 200; a compose service that others wait for checks
# /readyz instead (deploy/compose/compose.yaml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["fednode-healthcheck", "/livez"]
ENTRYPOINT ["fednode-entrypoint"]
CMD ["--help"]
