# An S3 API for the local stack (docker-compose.local.yml) where MinIO's image cannot be pulled: moto's server
# (`moto_server`, in-memory, no authentication checks) in a venv from constraints/s3.lock (hashes), on the same base
# as the service's images. For trying the stack and its test only: its objects are gone when it stops.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${BASE_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
COPY constraints/s3.lock .docker-build/cert[s] /tmp/build/
RUN set -eu; \
    cat /etc/ssl/certs/ca-certificates.crt > /tmp/build/ca.pem; \
    for c in /tmp/build/*.crt; do [ -f "$c" ] && cat "$c" >> /tmp/build/ca.pem; done; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --cert /tmp/build/ca.pem --require-hashes --no-deps --only-binary :all: \
        -r /tmp/build/s3.lock; \
    rm -rf /tmp/build

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin s3
COPY --from=deps /opt/venv /opt/venv
USER 10001:10001
EXPOSE 9000
HEALTHCHECK --interval=5s --timeout=3s --retries=20 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/', timeout=2)"]
CMD ["moto_server", "--host", "0.0.0.0", "--port", "9000"]
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/supir-serve/supir-serve
LABEL org.opencontainers.image.title="supir-serve local S3 (moto)" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" org.opencontainers.image.source="${SOURCE}"
