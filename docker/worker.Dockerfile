# The GPU worker image: Python and torch at the versions the tests run (tests/test_deploy_policies.py keeps them
# equal to constraints/cpu.txt and the test interpreter), a CUDA build of torch (its wheels carry the CUDA runtime;
# the host's driver comes in through the NVIDIA container toolkit), supir_core and the Celery worker.
# Weights are not inside: mount them read-only at /models and point SUPIR_SDXL_CHECKPOINT / SUPIR_CHECKPOINT there.
FROM python:3.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HOME=/tmp/hf \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin supir
WORKDIR /app
COPY pyproject.toml README.md ./
COPY constraints ./constraints
COPY supir_core ./supir_core
COPY jobs ./jobs
COPY api ./api
COPY worker ./worker
RUN pip install -c constraints/cpu.txt ".[worker]"

USER 10001
VOLUME ["/models"]
ENV SUPIR_WORKER_HEALTH_PORT=8081 SUPIR_WORKER_METRICS_PORT=9100
EXPOSE 9100 8081
HEALTHCHECK --interval=30s --timeout=3s --start-period=300s --retries=3 CMD ["python", "-m", "worker.health"]
# one process per GPU: the pool process loads the weights after the fork; its queues follow SUPIR_WORKER_VARIANTS
CMD ["celery", "-A", "worker.tasks", "worker", "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
