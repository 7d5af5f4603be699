# The worker image: Celery + supir_core + torch. TORCH_FLAVOUR picks the lock: `cuda` (default, for GPU boxes:
# PyPI's Linux torch, whose wheels carry the CUDA runtime; the host's driver comes in through the NVIDIA container
# toolkit) or `cpu` (the CPU build of the same torch, for `make stack` and laptops). Python and torch are the
# versions the tests run (tests/deploy/test_deploy_policies.py keeps them equal to constraints/cpu.txt and the test
# interpreter); every other package is pinned with its hashes in constraints/worker-<flavour>.lock (scripts/locks.sh).
# Weights are not inside: mount them read-only at /models and point SUPIR_SDXL_CHECKPOINT / SUPIR_CHECKPOINT there.
# Runs as uid 10001 and with a read-only root file system; it writes only under /tmp (a tmpfs or emptyDir).
#
# BASE_IMAGE: the same base as docker/api.Dockerfile. Default: the public python:3.11-slim-bookworm, pinned by
# digest (re-pin with `docker pull python:3.11-slim-bookworm && docker inspect --format '{{index .RepoDigests 0}}'
# python:3.11-slim-bookworm`). Any Debian bookworm image with python3 (3.11) and python3-venv works:
# scripts/base-image.sh makes one from Debian packages where no registry can be reached.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

# --- dependencies: a venv at /opt/venv from the lock alone (this layer is rebuilt only when the lock changes) ---
FROM ${BASE_IMAGE} AS deps
ARG TORCH_FLAVOUR=cuda
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# The lock, and what scripts/images.sh puts in the ignored folder .docker-build (absent on a plain `docker compose
# build`): certs/*.crt, extra CA certificates for a TLS-intercepting proxy, trusted by pip in this stage only, and
# wheels/, local wheels the lock pins by hash (the CPU torch). Neither reaches the final image.
COPY constraints/worker-${TORCH_FLAVOUR}.lock .docker-build/cert[s] /tmp/build/
COPY constraints/worker-${TORCH_FLAVOUR}.lock .docker-build/wheel[s] /tmp/build/wheels/
RUN set -eu; \
    cat /etc/ssl/certs/ca-certificates.crt > /tmp/build/ca.pem; \
    for c in /tmp/build/*.crt; do [ -f "$c" ] && cat "$c" >> /tmp/build/ca.pem; done; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --cert /tmp/build/ca.pem --require-hashes --no-deps --only-binary :all: \
        --find-links /tmp/build/wheels -r "/tmp/build/worker-${TORCH_FLAVOUR}.lock"; \
    /opt/venv/bin/python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(v != '${TORCH_VERSION}' and f'torch {v}, not ${TORCH_VERSION}')"; \
    rm -rf /tmp/build

# --- the image: the venv, then the code (a code change rebuilds only the layers from here) ---
FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf \
    XDG_CACHE_HOME=/tmp/cache NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin supir
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md ./
COPY supir_core ./supir_core
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
# the project itself, offline (its dependencies are the lock's, above); byte-compiled here, as the root is read-only
RUN pip install ".[worker]" --no-deps --no-index --no-build-isolation --quiet && rm -rf build ./*.egg-info \
    && supir --help >/dev/null

USER 10001:10001
VOLUME ["/models"]
ENV SUPIR_WORKER_HEALTH_PORT=8081 SUPIR_WORKER_METRICS_PORT=9100
EXPOSE 9100 8081
HEALTHCHECK --interval=30s --timeout=3s --start-period=300s --retries=3 CMD ["python", "-m", "worker.health"]
# one process per GPU: the pool process loads the weights after the fork; its queues follow SUPIR_WORKER_VARIANTS
CMD ["celery", "-A", "worker.tasks", "worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
# last, so a new revision changes only the image's metadata
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/supir-serve/supir-serve
LABEL org.opencontainers.image.title="supir-serve worker" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
