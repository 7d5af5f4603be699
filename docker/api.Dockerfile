# The API image: FastAPI + the torch-free corner of supir_core. No torch, no model weights. It also runs the light
# webhooks worker (`celery -A worker.webhooks`, docker-compose.yml). Every dependency is pinned with its hashes in
# constraints/api.lock (scripts/locks.sh). Runs as uid 10001 and with a read-only root file system; it writes only
# under /tmp (a tmpfs or emptyDir: PROMETHEUS_MULTIPROC_DIR, the beat schedule).
#
# BASE_IMAGE: the same base as docker/worker.Dockerfile (see there; scripts/base-image.sh picks or makes it).
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# --- dependencies: a venv at /opt/venv from the lock alone (this layer is rebuilt only when the lock changes) ---
FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# the lock, and the certificates in scripts/images.sh's ignored folder .docker-build/certs (extra CA certificates for a TLS-intercepting proxy,
# trusted by pip in this stage only; absent on a plain `docker compose build`)
COPY constraints/api.lock .docker-build/cert[s] /tmp/build/
RUN set -eu; \
    cat /etc/ssl/certs/ca-certificates.crt > /tmp/build/ca.pem; \
    for c in /tmp/build/*.crt; do [ -f "$c" ] && cat "$c" >> /tmp/build/ca.pem; done; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --cert /tmp/build/ca.pem --require-hashes --no-deps --only-binary :all: \
        -r /tmp/build/api.lock; \
    rm -rf /tmp/build

# --- the image: the venv, then the code (a code change rebuilds only the layers from here) ---
FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 XDG_CACHE_HOME=/tmp/cache
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin supir
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY supir_core ./supir_core
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
# the project itself, offline (its dependencies are the lock's, above); byte-compiled here, as the root is read-only
RUN pip install ".[api]" --no-deps --no-index --no-build-isolation --quiet && rm -rf build ./*.egg-info \
    && python -c "import api.app, worker.webhooks" && ! python -c "import torch" 2>/dev/null

USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["python", "-m", "api.server", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--proxy-headers"]
# last, so a new revision changes only the image's metadata
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/supir-serve/supir-serve
LABEL org.opencontainers.image.title="supir-serve API" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
