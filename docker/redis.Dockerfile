# Redis for the local stack (docker-compose.local.yml) where the public redis image cannot be pulled: Debian's
# redis-server (7.0 in bookworm) on the same base as the service's images (scripts/base-image.sh). Runs as the
# `redis` user with its data (AOF) in /data, the volume docker-compose.yml mounts there.
ARG BASE_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
FROM ${BASE_IMAGE}
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    mkdir -p /data && chown redis:redis /data; \
    printf '%s\n' '#!/bin/sh' \
      '# no config file: listen for the compose network, as the public image does (protected mode would refuse it)' \
      'if [ "${1:-}" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
      'exec "$@"' >/usr/local/bin/redis-entrypoint; \
    chmod 755 /usr/local/bin/redis-entrypoint
WORKDIR /data
USER redis
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --retries=10 CMD ["redis-cli", "ping"]
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
# docker-compose.yml's command replaces this one (AOF on); data in the working directory, /data
CMD ["redis-server"]
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/supir-serve/supir-serve
LABEL org.opencontainers.image.title="supir-serve local Redis" org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" org.opencontainers.image.source="${SOURCE}"
